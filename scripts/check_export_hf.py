#!/usr/bin/env python3
"""Loads a `lazarus ckpt export-hf` directory with Hugging Face transformers and runs a forward.

For people who have torch and transformers installed (`pip install torch transformers`);
not run in CI. Usage:

    lazarus ckpt export-hf runs/default --out /tmp/hf
    python3 scripts/check_export_hf.py /tmp/hf [--tokens 0,1,2,3]

Checks that the model loads without missing or unexpected weights (lm_head is tied to wte,
so it is expected to be absent from the file), that lm_head shares wte's storage, and prints
the logits' shape, (1, T, vocab_size), with a few values and the greedy next token.
"""

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="directory written by `lazarus ckpt export-hf --out`")
    parser.add_argument(
        "--tokens",
        default=None,
        help="comma-separated token ids (default: the first min(4, n_positions) ids)",
    )
    args = parser.parse_args()

    try:
        import torch
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        print(f"error: {e}; install them with `pip install torch transformers`", file=sys.stderr)
        return 2

    model, info = GPT2LMHeadModel.from_pretrained(args.model_dir, output_loading_info=True)
    model.eval()
    cfg = model.config
    problems = {k: v for k, v in info.items() if v and k != "missing_keys"}
    # Only the tied head (and non-persistent attention buffers) may be absent from the file.
    tolerated = ("lm_head.weight", ".attn.bias", ".attn.masked_bias")
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(tolerated)]
    if missing:
        problems["missing_keys"] = missing
    if problems:
        print(f"error: loading {args.model_dir}: {problems}", file=sys.stderr)
        return 1
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        print("error: lm_head is not tied to transformer.wte", file=sys.stderr)
        return 1

    if args.tokens:
        ids = [int(t) for t in args.tokens.split(",")]
    else:
        ids = list(range(min(4, cfg.n_positions, cfg.vocab_size)))
    if any(i < 0 or i >= cfg.vocab_size for i in ids) or len(ids) > cfg.n_positions:
        print(
            f"error: tokens must be below vocab_size {cfg.vocab_size} and at most "
            f"n_positions {cfg.n_positions} long",
            file=sys.stderr,
        )
        return 2

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    params = sum(p.numel() for p in model.parameters())
    print(
        f"loaded {args.model_dir}: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} "
        f"channels, vocab {cfg.vocab_size}, n_positions {cfg.n_positions}; {params} parameters"
    )
    print(f"tokens {ids}")
    print(f"logits shape {tuple(logits.shape)}")
    print(f"logits[0, -1, :5] {logits[0, -1, :5].tolist()}")
    print(f"greedy next token {int(logits[0, -1].argmax())}")
    if not torch.isfinite(logits).all():
        print("error: the logits are not all finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
