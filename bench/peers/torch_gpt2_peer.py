#!/usr/bin/env python3
"""Training throughput of GPT-2 in plain PyTorch, the peer of `lazarus-bench gpu`.

A GPT-2 (by default 124M: 12 layers, 12 heads, 768 channels, vocabulary 50257 padded to 50304,
T=1024, tied embedding and head, GELU with the tanh approximation, pre-norm blocks) is trained
with AdamW on uniformly random tokens for `--warmup` + `--steps` steps; the timed steps are the
last `--steps`. Each step is: forward with the loss, backward, gradient-norm clipping at 1.0,
AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1 on matrices only, as Lazarus's defaults; the
fused implementation on CUDA), zeroing the gradients. Attention is
`scaled_dot_product_attention` (PyTorch's flash kernel on a GPU), which is what plain PyTorch
code uses today.

`--dtype bf16` runs forward and loss under bf16 autocast with f32 weights and optimizer state;
`--dtype f32` keeps everything in f32 with PyTorch's default full-precision f32 matmuls (TF32
off). `--compile` wraps the model (forward, loss and, through AOTAutograd, backward) in
torch.compile; compilation happens in the first warm-up step.

Reported: the median step time over the timed steps (each timed with torch.cuda.synchronize on
a GPU) and tokens/s = batch * seq / median; on a GPU also MFU = tokens/s * FLOPs per token over
the device's dense bf16 tensor peak (also for f32 runs, so the two are comparable), where FLOPs
per token = 6 N + 12 L C T (N every parameter, the tied embedding counted once, padded rows
and position embedding included; attention's 12 L C T as in PaLM's appendix B), the same count
as Lazarus's live stats. One JSON object goes to stdout as the last line; progress goes to
stderr.

Usage: torch_gpt2_peer.py [--device cuda|cpu] [--dtype bf16|f32] [--compile] [--batch B]
                          [--seq T] [--steps N] [--warmup W] [--layers L] [--heads NH]
                          [--channels C] [--peak-tflops P] [--seed S]
"""

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

GPT2_VOCAB = 50257
# Rows of the embedding are padded to a multiple of this, as Lazarus and llm.c do: matmuls over
# a vocabulary of 50304 = 393 * 128 run on full tensor-core tiles.
VOCAB_PAD_MULTIPLE = 128
# Dense bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s, matched in this order
# against the device name (the PCIe H100 must be tested before the SXM one).
PEAKS_TFLOPS = (
    ("H100 PCIe", "H100 PCIe dense bf16", 756.0),
    ("H100", "H100 SXM dense bf16", 989.4),
    ("H200", "H200 dense bf16", 989.4),
    ("A100", "A100 dense bf16", 312.0),
)
LR = 1e-3
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0


def log(msg):
    print(f"torch gpt2 peer: {msg}", file=sys.stderr, flush=True)


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, channels, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.attn_proj = nn.Linear(channels, channels)
        self.ln2 = nn.LayerNorm(channels)
        self.fc = nn.Linear(channels, 4 * channels)
        self.fc_proj = nn.Linear(4 * channels, channels)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        # (B, T, C) -> (B, NH, T, C / NH) for the attention kernel.
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class Gpt2(nn.Module):
    """GPT-2 returning the mean cross-entropy of `targets`, so torch.compile sees the loss too."""

    def __init__(self, layers, heads, channels, vocab_padded, block_size):
        super().__init__()
        self.wte = nn.Embedding(vocab_padded, channels)
        self.wpe = nn.Embedding(block_size, channels)
        self.blocks = nn.ModuleList(Block(channels, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(channels)
        self.init_weights(layers)

    def init_weights(self, layers):
        # GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 L), zero
        # biases. The throughput does not depend on it, but a sane start keeps the loss finite.
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = 0.02
            if name.endswith("attn_proj.weight") or name.endswith("fc_proj.weight"):
                std /= math.sqrt(2 * layers)
            nn.init.normal_(p, mean=0.0, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, tokens, targets):
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        # The head is the embedding matrix itself (tied), over the padded vocabulary.
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (T)")
    p.add_argument("--steps", type=int, default=20, help="timed steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile included)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--channels", type=int, default=768)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak for MFU (default: a known GPU's dense bf16 peak)",
    )
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    for name in ("batch", "seq", "steps", "layers", "heads", "channels"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must not be negative")
    if args.channels % args.heads != 0:
        p.error(f"--channels {args.channels} is not a multiple of --heads {args.heads}")
    return args


def padded_vocab(vocab):
    return (vocab + VOCAB_PAD_MULTIPLE - 1) // VOCAB_PAD_MULTIPLE * VOCAB_PAD_MULTIPLE


def flops_per_token(params, layers, channels, seq):
    return 6 * params + 12 * layers * channels * seq


def peak_of(device_name, override):
    """The peak (TFLOP/s) and where it comes from, or (None, reason)."""
    if override is not None:
        return override, "--peak-tflops"
    for key, source, tflops in PEAKS_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops, f"{source} ({tflops} TFLOP/s, data sheet)"
    return None, f"no known peak for {device_name!r}; pass --peak-tflops"


def make_optimizer(model, device):
    # Decay matrices only (embeddings and linear weights), as Lazarus does (rank >= 2).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": other, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=1e-8, fused=fused)
    return opt, fused


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args, device):
    """Runs the steps; returns the model's parameter count, step times (s) and losses."""
    vocab_padded = padded_vocab(GPT2_VOCAB)
    model = Gpt2(args.layers, args.heads, args.channels, vocab_padded, args.seq).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt, fused = make_optimizer(model, device)
    step_fn = torch.compile(model) if args.compile else model
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    autocast = torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"
    )
    times, losses = [], []
    total = args.warmup + args.steps
    for i in range(total):
        # Random tokens of the real vocabulary, made on the device so no host copy is timed.
        window = torch.randint(
            0, GPT2_VOCAB, (args.batch, args.seq + 1), device=device, generator=gen
        )
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = step_fn(window[:, :-1], window[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t0
        losses.append(loss.detach())
        if i >= args.warmup:
            times.append(dt)
        if i == 0 or i + 1 == args.warmup or (i + 1) % 10 == 0 or i + 1 == total:
            log(f"step {i + 1}/{total}: {dt * 1e3:.1f} ms, loss {loss.item():.4f}")
    return params, fused, times, [x.item() for x in losses]


def main(argv):
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        log("CUDA is not available to this torch")
        return 2
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or "cpu"
    log(f"torch {torch.__version__} on {device_name}, {args.dtype}, compile={args.compile}")
    params, fused, times, losses = train(args, device)
    median_s = statistics.median(times)
    tokens_per_s = args.batch * args.seq / median_s
    fpt = flops_per_token(params, args.layers, args.channels, args.seq)
    if device.type == "cuda":
        peak, peak_source = peak_of(device_name, args.peak_tflops)
    else:
        peak = args.peak_tflops
        peak_source = "--peak-tflops" if peak else "none on a CPU"
    model_tflops = tokens_per_s * fpt / 1e12
    out = {
        "peer": "pytorch-gpt2",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "compile": args.compile,
        "fused_adamw": fused,
        "layers": args.layers,
        "heads": args.heads,
        "channels": args.channels,
        "vocab": GPT2_VOCAB,
        "vocab_padded": padded_vocab(GPT2_VOCAB),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "params": params,
        "flops_per_token": fpt,
        "ms_per_step_median": median_s * 1e3,
        "tokens_per_s": tokens_per_s,
        "model_tflops": model_tflops,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "mfu": model_tflops / peak if peak else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "max_memory_allocated_bytes": (
            torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ),
        "step_ms": [t * 1e3 for t in times],
        "runtime_s": time.perf_counter() - t_start,
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
