//! Export of a checkpoint's weights as a Hugging Face GPT-2 model directory
//! (`model.safetensors` + `config.json`, loadable by `GPT2LMHeadModel.from_pretrained`).
//!
//! This is where the differences between our flat layout and Hugging Face's are known:
//! names get the `transformer.` prefix; linear weights, stored (OC, C) here, become Conv1D
//! weights (C, OC); `wte` loses the rows of the padded vocabulary, (Vp, C) -> (V, C); and there
//! is no `lm_head.weight`, because the output head is tied to `wte`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use lazarus_checkpoint::{Dtype, Manifest, OpenCheckpoint, COMMITTED_FILE};
use rayon::prelude::*;
use serde_json::json;

use crate::config::{ModelConfig, GPT2_VOCAB};
use crate::error::{Result, TrainError};
use crate::layout::Layout;
use crate::state::{TrainingState, PARAMS};

/// The weights file of an exported model.
pub const HF_WEIGHTS_FILE: &str = "model.safetensors";

/// The configuration file of an exported model.
pub const HF_CONFIG_FILE: &str = "config.json";

/// Suffixes of the linear weights that Hugging Face's GPT-2 stores as Conv1D, (C, OC).
const CONV1D_WEIGHTS: [&str; 4] = [
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
];

/// Columns of the source handled together by one transposition task: one 64-byte cache line.
const TRANSPOSE_TILE: usize = 16;

/// One tensor of the exported model, in Hugging Face's name, shape and orientation.
#[derive(Debug, Clone, PartialEq)]
pub struct HfTensor {
    /// Hugging Face name, e.g. `transformer.h.0.attn.c_attn.weight`.
    pub name: String,
    /// Shape in Hugging Face's orientation, e.g. (C, 3C) for `c_attn.weight`.
    pub shape: Vec<usize>,
    /// Row-major f32 values.
    pub data: Vec<f32>,
}

/// What [`export_hf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSummary {
    /// The checkpoint's step.
    pub step: u64,
    /// The model shape that was exported.
    pub model: ModelConfig,
    /// `out_dir/model.safetensors`.
    pub weights: PathBuf,
    /// `out_dir/config.json`.
    pub config: PathBuf,
    /// Number of tensors written.
    pub tensors: usize,
    /// Number of parameters written (with the unpadded vocabulary).
    pub params: usize,
    /// Size of the weights file in bytes.
    pub weights_bytes: u64,
}

/// Writes the weights of checkpoint `ckpt` (whose every shard holding `params` must be open)
/// as a Hugging Face GPT-2 model into `out_dir` (created if absent; earlier exported files are
/// replaced). `state` is the checkpoint's training state, which gives the model shape.
pub fn export_hf(
    ckpt: &OpenCheckpoint,
    state: &TrainingState,
    out_dir: &Path,
) -> Result<ExportSummary> {
    let model = state.model;
    model.validate()?;
    let layout = Layout::gpt2(&model);
    check_checkpoint(ckpt, state, &layout)?;
    let tensors = hf_tensors(&model, |range| read_params(ckpt, range))?;
    fs::create_dir_all(out_dir)
        .map_err(|e| TrainError::io("creating export directory", out_dir, e))?;
    let weights = out_dir.join(HF_WEIGHTS_FILE);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|t| (t.name.as_str(), t)),
        Some(metadata),
        &weights,
    )
    .map_err(|e| match e {
        safetensors::SafeTensorError::IoError(e) => TrainError::io("writing", &weights, e),
        other => TrainError::io(
            "writing",
            &weights,
            std::io::Error::other(other.to_string()),
        ),
    })?;
    let config = out_dir.join(HF_CONFIG_FILE);
    let mut text =
        serde_json::to_string_pretty(&hf_config(&model)).expect("a JSON value serializes");
    text.push('\n');
    fs::write(&config, text).map_err(|e| TrainError::io("writing", &config, e))?;
    let weights_bytes = fs::metadata(&weights)
        .map_err(|e| TrainError::io("reading the size of", &weights, e))?
        .len();
    Ok(ExportSummary {
        step: ckpt.manifest().step,
        model,
        weights,
        config,
        tensors: tensors.len(),
        params: tensors.iter().map(|t| t.data.len()).sum(),
        weights_bytes,
    })
}

/// The model's tensors in Hugging Face's names and orientation, in layout order. `read` returns
/// the f32 values of an element range of the flat parameter buffer (our layout,
/// [`Layout::gpt2`]); it is asked only for the rows that are exported.
pub fn hf_tensors(
    model: &ModelConfig,
    mut read: impl FnMut(Range<usize>) -> Result<Vec<f32>>,
) -> Result<Vec<HfTensor>> {
    let layout = Layout::gpt2(model);
    let mut out = Vec::with_capacity(layout.tensors.len());
    for t in &layout.tensors {
        let name = format!("transformer.{}", t.name);
        let tensor = if t.name == "wte.weight" {
            // Rows V..Vp only pad the logits to a friendly width; Hugging Face's model has V rows.
            let (v, c) = (model.vocab, model.channels);
            assert_eq!(t.shape, [model.padded_vocab, c], "wte is (Vp, C)");
            let data = read(t.offset..t.offset + v * c)?;
            HfTensor {
                name,
                shape: vec![v, c],
                data,
            }
        } else if CONV1D_WEIGHTS.iter().any(|s| t.name.ends_with(s)) {
            let [oc, c] = t.shape[..] else {
                panic!("linear weight `{}` must be 2-D, is {:?}", t.name, t.shape);
            };
            let data = transpose(&read(t.range())?, oc, c);
            HfTensor {
                name,
                shape: vec![c, oc],
                data,
            }
        } else {
            HfTensor {
                name,
                shape: t.shape.clone(),
                data: read(t.range())?,
            }
        };
        assert_eq!(
            tensor.data.len(),
            tensor.shape.iter().product::<usize>(),
            "read returned the wrong number of elements for `{}`",
            tensor.name
        );
        out.push(tensor);
    }
    Ok(out)
}

/// The `config.json` of a Hugging Face GPT-2 model of shape `model`. The model is tied, uses
/// GELU with the tanh approximation (`gelu_new`), LayerNorm eps 1e-5, and no dropout. Both
/// `bos_token_id` and `eos_token_id` are the last token id, V - 1: for GPT-2's vocabulary
/// (50257) that is `<|endoftext|>` (50256), as in Hugging Face's own GPT-2 configs; other
/// vocabularies (byte-level data, say) have no special token, and V - 1 is at least a valid id.
pub fn hf_config(model: &ModelConfig) -> serde_json::Value {
    let special = model.vocab.saturating_sub(1);
    debug_assert!(model.vocab != GPT2_VOCAB || special == 50256);
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model.vocab,
        "n_positions": model.block_size,
        "n_ctx": model.block_size,
        "n_embd": model.channels,
        "n_layer": model.layers,
        "n_head": model.heads,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "use_cache": true,
        "bos_token_id": special,
        "eos_token_id": special,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
    })
}

/// Refuses a checkpoint whose parameters this build cannot interpret: a layout hash that is not
/// the one of the state's model shape, or a `params` array of another length or dtype.
pub(crate) fn check_checkpoint(
    ckpt: &OpenCheckpoint,
    state: &TrainingState,
    layout: &Layout,
) -> Result<()> {
    let manifest = ckpt.manifest();
    let at = ckpt.dir().join(COMMITTED_FILE);
    let hash = layout.hash();
    if state.layout_hash != hash || manifest.layout_hash != hash {
        return Err(bad(format!(
            "`{}`: layout hash {} (training state {}) is not {hash}, the hash of the GPT-2 layout of its model shape in this build; export it with the lazarus version that wrote it",
            at.display(),
            manifest.layout_hash,
            state.layout_hash
        )));
    }
    let Some((dtype, total)) = params_array(manifest) else {
        return Err(bad(format!(
            "`{}` lists no flat array `{PARAMS}`: this is not a checkpoint of the trainer's parameters",
            at.display()
        )));
    };
    if dtype != Dtype::F32 || total != layout.total as u64 {
        return Err(bad(format!(
            "`{}`: flat array `{PARAMS}` holds {total} {} elements, the model shape needs {} F32 elements",
            at.display(),
            dtype.as_str(),
            layout.total
        )));
    }
    Ok(())
}

/// Dtype and length of the flat parameter array, as the manifest records them.
fn params_array(manifest: &Manifest) -> Option<(Dtype, u64)> {
    manifest
        .shards
        .iter()
        .find_map(|s| s.tensors.get(PARAMS))
        .and_then(|r| Some((r.dtype, r.flat?.total)))
}

/// An unusable checkpoint. (Reported as a configuration error until the trainer's error type
/// has a variant for exports.)
fn bad(detail: String) -> TrainError {
    TrainError::Export(detail)
}

/// Elements `range` of the checkpoint's flat parameter array.
pub(crate) fn read_params(ckpt: &OpenCheckpoint, range: Range<usize>) -> Result<Vec<f32>> {
    let mut bytes = vec![0u8; range.len() * 4];
    ckpt.read_flat(PARAMS, range.start as u64, &mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The transpose of `src`, a row-major (rows, cols) matrix: a row-major (cols, rows) matrix.
/// Each task writes `TRANSPOSE_TILE` output rows while reading the source a cache line per row.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(
        src.len(),
        rows * cols,
        "transpose: src must be (rows, cols)"
    );
    let mut out = vec![0.0f32; src.len()];
    if src.is_empty() {
        return out;
    }
    out.par_chunks_mut(TRANSPOSE_TILE * rows)
        .enumerate()
        .for_each(|(tile, block)| {
            let c0 = tile * TRANSPOSE_TILE;
            let width = block.len() / rows;
            for (r, row) in src.chunks_exact(cols).enumerate() {
                for (j, &x) in row[c0..c0 + width].iter().enumerate() {
                    block[j * rows + r] = x;
                }
            }
        });
    out
}

impl safetensors::View for &HfTensor {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Little-endian bytes, made one tensor at a time while the file is written.
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            layers: 2,
            heads: 2,
            channels: 8,
            vocab: 10,
            padded_vocab: 128,
            block_size: 4,
        }
    }

    /// A parameter buffer whose element i holds i, so every value names its flat index.
    fn indexed(model: &ModelConfig) -> Vec<f32> {
        (0..Layout::gpt2(model).total).map(|i| i as f32).collect()
    }

    #[test]
    fn transpose_of_odd_shapes_round_trips() {
        for (rows, cols) in [(1, 1), (3, 5), (17, 33), (40, 16), (2, 0)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(&src, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        t[c * rows + r],
                        src[r * cols + c],
                        "({rows}, {cols}) at ({r}, {c})"
                    );
                }
            }
            assert_eq!(transpose(&t, cols, rows), src);
        }
    }

    #[test]
    fn tensors_are_named_shaped_and_oriented_like_hugging_face() {
        let m = tiny();
        let (c, l) = (m.channels, Layout::gpt2(&m));
        let params = indexed(&m);
        let ts = hf_tensors(&m, |r| Ok(params[r].to_vec())).unwrap();
        assert_eq!(ts.len(), 2 + 12 * m.layers + 2);
        let get = |n: &str| {
            ts.iter()
                .find(|t| t.name == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        let wte = get("transformer.wte.weight");
        assert_eq!(wte.shape, [m.vocab, c]);
        assert_eq!(wte.data, params[l.wte.start..l.wte.start + m.vocab * c]);
        assert_eq!(get("transformer.wpe.weight").shape, [m.block_size, c]);
        for (suffix, oc, ic) in [
            ("attn.c_attn.weight", 3 * c, c),
            ("attn.c_proj.weight", c, c),
            ("mlp.c_fc.weight", 4 * c, c),
            ("mlp.c_proj.weight", c, 4 * c),
        ] {
            let ours = l.get(&format!("h.1.{suffix}")).unwrap();
            let hf = get(&format!("transformer.h.1.{suffix}"));
            assert_eq!(hf.shape, [ic, oc], "{suffix}");
            // HF Conv1D computes x @ W with W (in, out): W[i][o] is our row o, column i.
            for (i, o) in [
                (0, 0),
                (ic - 1, 0),
                (0, oc - 1),
                (ic / 2, oc / 3),
                (ic - 1, oc - 1),
            ] {
                assert_eq!(
                    hf.data[i * oc + o],
                    params[ours.offset + o * ic + i],
                    "{suffix} [{i}][{o}]"
                );
            }
        }
        let bias = get("transformer.h.0.attn.c_attn.bias");
        assert_eq!(
            (bias.shape.as_slice(), bias.data[0]),
            ([3 * c].as_slice(), params[l.blocks[0].qkv_b.start])
        );
        assert_eq!(get("transformer.ln_f.bias").data, params[l.lnf_b.clone()]);
        assert!(ts.iter().all(|t| !t.name.contains("lm_head")));
    }

    #[test]
    fn config_describes_a_tied_gpt2() {
        let cfg = hf_config(&tiny());
        assert_eq!(cfg["model_type"], "gpt2");
        assert_eq!(cfg["architectures"][0], "GPT2LMHeadModel");
        assert_eq!(cfg["vocab_size"], 10);
        assert_eq!(
            (
                cfg["n_layer"].as_u64(),
                cfg["n_head"].as_u64(),
                cfg["n_embd"].as_u64()
            ),
            (Some(2), Some(2), Some(8))
        );
        assert_eq!(cfg["n_positions"], 4);
        assert_eq!(cfg["tie_word_embeddings"], true);
        assert_eq!(cfg["activation_function"], "gelu_new");
        assert!(cfg["n_inner"].is_null());
        assert_eq!(cfg["eos_token_id"], 9);
        let gpt2 = hf_config(&ModelConfig {
            vocab: GPT2_VOCAB,
            padded_vocab: 50304,
            ..tiny()
        });
        assert_eq!(
            (gpt2["bos_token_id"].as_u64(), gpt2["eos_token_id"].as_u64()),
            (Some(50256), Some(50256))
        );
    }
}
