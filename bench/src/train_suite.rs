//! The `train` suite: tokens/s and ms/step of real training steps on the CPU backend.

use crate::machine::Machine;
use anyhow::{Context, Result};
use lazarus_comm::SingleRank;
use lazarus_trainer::train::Trainer;
use lazarus_trainer::{corpus, TrainConfig};
use serde::Serialize;
use std::path::Path;

/// Options of the train suite.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Presets to measure.
    #[arg(long, value_delimiter = ',', default_value = "d2,d6")]
    models: Vec<String>,
    /// Measured steps per model (after one warm-up step).
    #[arg(long, default_value_t = 10)]
    steps: u64,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq: usize,
}

#[derive(Debug, Serialize)]
struct Row {
    model: String,
    ranks: usize,
    params: usize,
    batch: usize,
    seq: usize,
    steps: u64,
    ms_per_step_median: f64,
    tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    suite: &'static str,
    machine: Machine,
    rows: &'a [Row],
}

fn measure(model: &str, args: &TrainArgs, data: &Path) -> Result<Row> {
    let cfg = TrainConfig {
        model: model.into(),
        steps: args.steps + 1,
        batch: args.batch,
        seq: args.seq,
        data: data.to_path_buf(),
        ..Default::default()
    };
    let mut tr = Trainer::new(cfg, Box::new(SingleRank::new()))?;
    tr.train_step()?; // warm-up: page in the data and the weights
    let mut ms: Vec<f64> = (0..args.steps)
        .map(|_| tr.train_step().map(|r| r.ms))
        .collect::<Result<_, _>>()?;
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    Ok(Row {
        model: model.into(),
        ranks: 1,
        params: tr.num_params(),
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        ms_per_step_median: median,
        tokens_per_s: (args.batch * args.seq) as f64 / (median / 1e3),
    })
}

/// Runs the suite, prints the table, writes `train-<date>.json`.
pub fn run(args: &TrainArgs, out: &Path) -> Result<()> {
    anyhow::ensure!(args.steps > 0, "--steps must be positive");
    let tmp = tempfile::tempdir().context("creating a temporary data directory")?;
    corpus::synth(tmp.path(), 1, 1_000_000)?;
    let rows: Vec<Row> = args
        .models
        .iter()
        .map(|m| measure(m, args, tmp.path()))
        .collect::<Result<_>>()?;
    let machine = Machine::current();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join(format!("train-{}.json", &machine.date_utc[..10]));
    let report = Report {
        suite: "train",
        machine,
        rows: &rows,
    };
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("| model | ranks | params | batch x seq | ms/step (median) | tokens/s |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2}M | {}x{} | {:.1} | {:.0} |",
            r.model,
            r.ranks,
            r.params as f64 / 1e6,
            r.batch,
            r.seq,
            r.ms_per_step_median,
            r.tokens_per_s
        );
    }
    println!("wrote {}", path.display());
    Ok(())
}
