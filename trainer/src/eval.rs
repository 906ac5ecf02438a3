//! A checkpoint's weights, and their loss on held-out data: validation loss in nats per token,
//! bits per token and bits per byte (`lazarus eval`; `lazarus sample --checkpoint`).
//!
//! Bits per byte divide the bits of the evaluated targets by the bytes of text they stand for.
//! For byte-level data (vocabulary <= 256) a token is one byte. For GPT-2 tokens each token's
//! byte length comes from the BPE vocabulary (tiktoken's r50k_base, embedded), and
//! `<|endoftext|>`, a document separator rather than text, counts zero bytes. Other
//! vocabularies have no byte mapping, and bits per byte are not reported.

use crate::config::{TrainConfig, GPT2_VOCAB, STAGES_DIR};
use crate::data::{DataSource, GPT2_EOT};
use crate::error::{Result, TrainError};
use crate::export::{check_checkpoint, read_params};
use crate::layout::Layout;
use crate::model::Gpt;
use crate::run::CHECKPOINTS_DIR;
use crate::sample::Weights;
use crate::snapshot::state_of;
use crate::state::TrainingState;
use crate::train::files;
use lazarus_checkpoint::{discover_committed, open_verified};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A committed checkpoint's weights, read and verified.
pub struct LoadedCheckpoint {
    pub weights: Weights,
    pub state: TrainingState,
    /// The step directory.
    pub dir: PathBuf,
    /// The stage it belongs to, in a run with stages.
    pub stage: Option<String>,
}

fn config_of(run_dir: &Path) -> Result<TrainConfig> {
    let path = run_dir.join(files::CONFIG);
    if !path.exists() {
        return Err(TrainError::Config(format!(
            "{} is not a run directory (no {}): give the --run-dir of a `lazarus train`",
            run_dir.display(),
            files::CONFIG
        )));
    }
    TrainConfig::from_toml_file(&path)
}

/// The checkpoint folder to read: `run_dir/checkpoints`, or in a run with stages that of
/// `stage`, by default the last stage that has committed a checkpoint.
pub fn checkpoint_root(run_dir: &Path, stage: Option<&str>) -> Result<(PathBuf, Option<String>)> {
    let cfg = config_of(run_dir)?;
    let root_of = |name: &str| run_dir.join(STAGES_DIR).join(name).join(CHECKPOINTS_DIR);
    if cfg.stages.is_empty() {
        if let Some(name) = stage {
            return Err(TrainError::Config(format!(
                "--stage {name}: {} is a run without stages",
                run_dir.display()
            )));
        }
        return Ok((run_dir.join(CHECKPOINTS_DIR), None));
    }
    if let Some(name) = stage {
        cfg.stage_index(name)?;
        return Ok((root_of(name), Some(name.to_string())));
    }
    for s in cfg.stages.iter().rev() {
        if !discover_committed(&root_of(&s.name))?.is_empty() {
            return Ok((root_of(&s.name), Some(s.name.clone())));
        }
    }
    Err(TrainError::Resume(format!(
        "no stage of {} has a committed checkpoint yet",
        run_dir.display()
    )))
}

/// Reads the weights of checkpoint `step` (default: the newest committed one) of `run_dir`,
/// with every shard verified.
pub fn load_checkpoint(
    run_dir: &Path,
    stage: Option<&str>,
    step: Option<u64>,
) -> Result<LoadedCheckpoint> {
    let (root, stage) = checkpoint_root(run_dir, stage)?;
    let committed = discover_committed(&root)?;
    let found = match step {
        None => committed.first(),
        Some(s) => committed.iter().find(|(_, m)| m.step == s),
    };
    let Some((dir, manifest)) = found else {
        let steps: Vec<String> = committed
            .iter()
            .rev()
            .map(|(_, m)| m.step.to_string())
            .collect();
        let have = if steps.is_empty() {
            "there are none".to_string()
        } else {
            format!("committed steps: {}", steps.join(", "))
        };
        let which = step.map_or("committed checkpoint".into(), |s| {
            format!("committed checkpoint of step {s}")
        });
        return Err(TrainError::Resume(format!(
            "no {which} in {}; {have}",
            root.display()
        )));
    };
    let state = state_of(manifest)?;
    let all: Vec<usize> = (0..manifest.world_size).collect();
    let ckpt = open_verified(dir, manifest, &all)?;
    state.model.validate()?;
    let layout = Layout::gpt2(&state.model);
    check_checkpoint(&ckpt, &state, &layout)?;
    let params = read_params(&ckpt, 0..layout.total)?;
    Ok(LoadedCheckpoint {
        weights: Weights {
            model: state.model,
            params,
        },
        state,
        dir: dir.clone(),
        stage,
    })
}

/// Bytes of text each token id stands for, or `None` for a vocabulary without a byte mapping.
pub fn token_bytes(vocab: usize) -> Option<Vec<u32>> {
    if vocab <= 256 {
        return Some(vec![1; vocab]);
    }
    if vocab != GPT2_VOCAB {
        return None;
    }
    let bpe = tiktoken_rs::r50k_base_singleton();
    let table = (0..vocab as u32)
        .map(|id| match id {
            id if id == u32::from(GPT2_EOT) => 0,
            id => bpe.decode_bytes(&[id]).map_or(0, |b| b.len() as u32),
        })
        .collect();
    Some(table)
}

/// What an evaluation measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    /// Mean cross-entropy of the targets, in nats per token.
    pub loss: f64,
    pub bits_per_token: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_token: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_byte: Option<f64>,
    /// Windows (sequences) evaluated, of `seq` targets each.
    pub windows: usize,
    pub seq: usize,
    pub tokens: u64,
}

/// Evaluates `w` on the first `max_windows` (default: all) windows of the validation split of
/// `data` at sequence length `seq`, `batch` sequences per forward pass, in order. With the
/// training's batch and `val_batches * batch` windows this is the loop's own validation loss.
pub fn evaluate(
    w: &Weights,
    data: &Path,
    seq: usize,
    batch: usize,
    max_windows: Option<usize>,
) -> Result<EvalReport> {
    let m = &w.model;
    if seq == 0 || seq > m.block_size || batch == 0 {
        return Err(TrainError::Config(format!(
            "eval needs 1 <= seq <= {} (the model's block size) and a positive batch; got seq {seq}, batch {batch}",
            m.block_size
        )));
    }
    let src = DataSource::open(data, seq)?;
    if src.vocab > m.vocab {
        return Err(TrainError::Config(format!(
            "the data's vocabulary ({}) is larger than the model's ({})",
            src.vocab, m.vocab
        )));
    }
    let split = &src.val;
    let n = max_windows.unwrap_or(split.windows).min(split.windows);
    let bytes_of = token_bytes(m.vocab);
    let mut gpt = Gpt::new(*m, batch, seq, false);
    let (mut inputs, mut targets) = (vec![0u32; batch * seq], vec![0u32; batch * seq]);
    let (mut nats, mut bytes) = (0.0f64, 0u64);
    for first in (0..n).step_by(batch) {
        let b = batch.min(n - first);
        for i in 0..b {
            let (inp, tgt) = (
                &mut inputs[i * seq..(i + 1) * seq],
                &mut targets[i * seq..(i + 1) * seq],
            );
            split.read_window(first + i, inp, tgt)?;
        }
        let (inp, tgt) = (&inputs[..b * seq], &targets[..b * seq]);
        nats += gpt.loss_sum(&w.params, inp, tgt, b, seq);
        if let Some(table) = &bytes_of {
            bytes += tgt
                .iter()
                .map(|&t| u64::from(table[t as usize]))
                .sum::<u64>();
        }
    }
    let tokens = (n * seq) as u64;
    let loss = nats / tokens.max(1) as f64;
    let bits = nats / std::f64::consts::LN_2;
    let with_bytes = bytes_of.is_some() && bytes > 0;
    Ok(EvalReport {
        loss,
        bits_per_token: loss / std::f64::consts::LN_2,
        bytes_per_token: with_bytes.then(|| bytes as f64 / tokens as f64),
        bits_per_byte: with_bytes.then(|| bits / bytes as f64),
        windows: n,
        seq,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bytes_of_bytes_and_gpt2() {
        assert_eq!(token_bytes(256).unwrap(), vec![1; 256]);
        let t = token_bytes(GPT2_VOCAB).unwrap();
        // "Hello" is token 15496, " world" 995; end-of-text is not text.
        assert_eq!((t[15496], t[995], t[GPT2_EOT as usize]), (5, 6, 0));
        assert!(token_bytes(1000).is_none());
    }
}
