//! `lazarus eval` (validation loss and bits per byte of a checkpoint on held-out data) and
//! `lazarus sample` (generation from the final weights or a checkpoint).

use crate::cli::SampleArgs;
use anyhow::{Context, Result};
use lazarus_trainer::eval::{evaluate, load_checkpoint};
use lazarus_trainer::sample::{generate, load_final};
use std::path::PathBuf;

/// Flags of `lazarus eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The run directory.
    #[arg(long)]
    pub run_dir: PathBuf,
    /// Step of the committed checkpoint to evaluate (default: the newest).
    #[arg(long)]
    pub checkpoint: Option<u64>,
    /// In a run with stages: the stage whose checkpoint (default: the last that has one).
    #[arg(long)]
    pub stage: Option<String>,
    /// Token file or directory whose validation split is the held-out data (default: the
    /// checkpoint's training data).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Sequence length (default: the checkpoint's).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Sequences per forward pass (default: the checkpoint's global micro-batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Evaluate at most this many windows, from the first (default: the whole split).
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

/// Runs `lazarus eval`.
pub fn eval(a: &EvalArgs) -> Result<()> {
    let ck = load_checkpoint(&a.run_dir, a.stage.as_deref(), a.checkpoint)
        .with_context(|| format!("loading a checkpoint of {}", a.run_dir.display()))?;
    let cfg = &ck.state.config;
    let data = a.data.clone().unwrap_or_else(|| cfg.data.clone());
    let seq = a.seq.unwrap_or(cfg.seq);
    let batch = a.batch.unwrap_or(cfg.batch);
    let r = evaluate(&ck.weights, &data, seq, batch, a.max_windows)
        .with_context(|| format!("evaluating on {}", data.display()))?;
    let step = ck.state.step;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["step"] = step.into();
        v["stage"] = serde_json::to_value(&ck.stage)?;
        v["checkpoint"] = ck.dir.display().to_string().into();
        v["data"] = data.display().to_string().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let stage = ck
        .stage
        .as_ref()
        .map_or(String::new(), |s| format!(" of stage `{s}`"));
    println!("checkpoint   step {step}{stage} ({})", ck.dir.display());
    println!(
        "held-out     {} windows of {} tokens ({} tokens) of the validation split of {}",
        r.windows,
        r.seq,
        r.tokens,
        data.display()
    );
    println!("val loss     {:.4} nats/token", r.loss);
    println!("bits/token   {:.4}", r.bits_per_token);
    match (r.bytes_per_token, r.bits_per_byte) {
        (Some(bpt), Some(bpb)) => {
            println!("bytes/token  {bpt:.4}");
            println!("bits/byte    {bpb:.4}");
        }
        _ => println!(
            "bits/byte    - (vocabulary {} has no byte mapping)",
            ck.weights.model.vocab
        ),
    }
    Ok(())
}

/// Runs `lazarus sample`.
pub fn sample(a: &SampleArgs) -> Result<()> {
    let w = if a.checkpoint.is_some() || a.stage.is_some() {
        load_checkpoint(&a.run_dir, a.stage.as_deref(), a.checkpoint)
            .with_context(|| format!("loading a checkpoint of {}", a.run_dir.display()))?
            .weights
    } else {
        load_final(&a.run_dir)
            .with_context(|| format!("loading weights from {}", a.run_dir.display()))?
    };
    let text = generate(&w, &a.prompt, a.tokens, a.temperature, a.seed)?;
    println!("{}{}", a.prompt, text);
    Ok(())
}
