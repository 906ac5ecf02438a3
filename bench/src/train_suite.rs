//! The `train` suite: tokens/s and ms/step of real training steps on the CPU backend.

use crate::machine::Machine;
use anyhow::{Context, Result};
use lazarus_comm::{Communicator, ThreadsComm};
use lazarus_trainer::train::Trainer;
use lazarus_trainer::{corpus, TrainConfig};
use serde::{Deserialize, Serialize};
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
    /// Thread ranks to measure (the global batch stays the same).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    ranks: Vec<usize>,
}

/// One model at one rank count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub model: String,
    pub ranks: usize,
    pub params: usize,
    pub batch: usize,
    pub seq: usize,
    pub steps: u64,
    pub ms_per_step_median: f64,
    pub tokens_per_s: f64,
    /// tokens/s over the same model's 1-rank tokens/s in this run.
    pub scaling: f64,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    suite: &'static str,
    machine: Machine,
    rows: &'a [Row],
}

/// Runs `steps + 1` steps on one rank (the first is a warm-up: it pages in data and weights)
/// and returns the step times in ms of the measured steps.
fn rank_steps(
    cfg: TrainConfig,
    comm: Box<dyn Communicator>,
    steps: u64,
) -> Result<(usize, Vec<f64>)> {
    let mut tr = Trainer::new(cfg, comm)?;
    tr.train_step()?;
    let ms = (0..steps)
        .map(|_| tr.train_step().map(|r| r.ms))
        .collect::<Result<_, _>>()?;
    Ok((tr.num_params(), ms))
}

/// Measures `model` with `ranks` thread ranks and the same global batch.
fn measure(model: &str, ranks: usize, args: &TrainArgs, data: &Path) -> Result<Row> {
    let cfg = TrainConfig {
        model: model.into(),
        steps: args.steps + 1,
        batch: args.batch,
        seq: args.seq,
        data: data.to_path_buf(),
        ..Default::default()
    };
    let mut comms =
        ThreadsComm::group(ranks, lazarus_comm::COLLECTIVE_TIMEOUT_MS_DEFAULT).into_iter();
    let first = comms.next().expect("at least one rank");
    let (params, mut ms) = std::thread::scope(|s| {
        let others: Vec<_> = comms
            .map(|c| {
                let cfg = cfg.clone();
                s.spawn(move || rank_steps(cfg, Box::new(c), args.steps))
            })
            .collect();
        let lead = rank_steps(cfg.clone(), Box::new(first), args.steps);
        for h in others {
            h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))??;
        }
        lead
    })?;
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    Ok(Row {
        model: model.into(),
        ranks,
        params,
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        ms_per_step_median: median,
        tokens_per_s: (args.batch * args.seq) as f64 / (median / 1e3),
        scaling: 1.0,
    })
}

/// The Markdown table, one line per model and rank count.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| model | ranks | params | batch x seq | ms/step (median) | tokens/s | vs 1 rank |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.2}M | {}x{} | {:.1} | {:.0} | {:.2} |\n",
            r.model,
            r.ranks,
            r.params as f64 / 1e6,
            r.batch,
            r.seq,
            r.ms_per_step_median,
            r.tokens_per_s,
            r.scaling
        ));
    }
    s
}

/// Runs the suite, prints the table, writes `train-<date>.json`.
pub fn run(args: &TrainArgs, out: &Path) -> Result<()> {
    anyhow::ensure!(args.steps > 0, "--steps must be positive");
    let tmp = tempfile::tempdir().context("creating a temporary data directory")?;
    corpus::synth(tmp.path(), 1, 1_000_000)?;
    anyhow::ensure!(
        args.ranks
            .iter()
            .all(|&r| r > 0 && args.batch.is_multiple_of(r)),
        "every --ranks value must divide --batch {}",
        args.batch
    );
    let mut rows: Vec<Row> = Vec::new();
    for m in &args.models {
        let first = rows.len();
        for &r in &args.ranks {
            rows.push(measure(m, r, args, tmp.path())?);
        }
        let base = rows[first..]
            .iter()
            .find(|r| r.ranks == 1)
            .map(|r| r.tokens_per_s);
        for row in &mut rows[first..] {
            row.scaling = base.map_or(f64::NAN, |b| row.tokens_per_s / b);
        }
    }
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
    print!("{}", table(&rows));
    println!("wrote {}", path.display());
    Ok(())
}
