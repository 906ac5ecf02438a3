//! Text generation from trained weights: temperature sampling, one token at a time.

use crate::config::ModelConfig;
use crate::corpus::{decode, encode};
use crate::error::{Result, TrainError};
use crate::layout::Layout;
use crate::model::Gpt;
use crate::rng::Rng;
use crate::train::files;
use lazarus_kernels::cpu;
use std::path::Path;

/// A model shape and its parameters, loaded from a run directory.
pub struct Weights {
    pub model: ModelConfig,
    pub params: Vec<f32>,
}

/// Loads `model.json` and `final_params.bin` from a finished run.
pub fn load_final(run_dir: &Path) -> Result<Weights> {
    let mpath = run_dir.join(files::MODEL);
    let text = std::fs::read_to_string(&mpath)
        .map_err(|e| TrainError::io("reading (is this a run directory?)", &mpath, e))?;
    let model: ModelConfig = serde_json::from_str(&text)
        .map_err(|e| TrainError::Config(format!("{}: {e}", mpath.display())))?;
    model.validate()?;
    let ppath = run_dir.join(files::FINAL_PARAMS);
    let bytes = std::fs::read(&ppath)
        .map_err(|e| TrainError::io("reading final weights (has training finished?)", &ppath, e))?;
    let want = Layout::gpt2(&model).total * 4;
    if bytes.len() != want {
        return Err(TrainError::Data {
            path: ppath,
            detail: format!(
                "{} bytes, expected {want} for the model in model.json",
                bytes.len()
            ),
        });
    }
    let params = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Weights { model, params })
}

/// Continues `prompt` by `n` tokens at `temperature` (0 = greedy), seeded.
pub fn generate(
    w: &Weights,
    prompt: &str,
    n: usize,
    temperature: f32,
    seed: u64,
) -> Result<String> {
    let m = &w.model;
    let mut tokens = encode(prompt, m.vocab);
    if tokens.is_empty() {
        // An empty prompt starts from a newline (bytes) or end-of-text (GPT-2).
        tokens.push(if m.vocab <= 256 {
            b'\n' as u32
        } else {
            crate::data::GPT2_EOT as u32
        });
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= m.vocab) {
        return Err(TrainError::Config(format!(
            "prompt token {bad} is outside the model's vocabulary {}",
            m.vocab
        )));
    }
    let prompt_len = tokens.len();
    let mut gpt = Gpt::new(*m, 1, m.block_size, false);
    let mut probs = vec![0.0f32; m.padded_vocab];
    let mut rng = Rng::new(seed);
    for _ in 0..n {
        let ctx = &tokens[tokens.len().saturating_sub(m.block_size)..];
        let t = ctx.len();
        gpt.forward(&w.params, ctx, 1, t);
        let row = &gpt.logits()[(t - 1) * m.padded_vocab..t * m.padded_vocab];
        let next = if temperature <= 0.0 {
            (0..m.vocab)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap_or(0)
        } else {
            let scaled: Vec<f32> = row.iter().map(|x| x / temperature).collect();
            cpu::softmax_forward(&mut probs, &scaled, 1, m.vocab, m.padded_vocab);
            pick(&probs[..m.vocab], rng.uniform() as f32)
        };
        tokens.push(next as u32);
    }
    Ok(decode(&tokens[prompt_len..], m.vocab))
}

fn pick(probs: &[f32], mut u: f32) -> usize {
    for (i, &p) in probs.iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return i;
        }
    }
    probs.len() - 1
}
