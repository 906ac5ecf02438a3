//! `lazarus-bench`: the benchmark harness. Each suite prints a compact table last and writes
//! JSON (with the machine, git commit and date) under `bench/results/`; `report` turns the
//! newest result of each suite into `bench/REPORT.md` with SVG plots; `all` does everything
//! with small settings.

mod ckpt_suite;
mod gpu_suite;
mod machine;
mod plots;
mod recovery_suite;
mod report;
mod torch_peer;
mod train_suite;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Benchmarks for Lazarus.
#[derive(Debug, Parser)]
#[command(name = "lazarus-bench", version, about)]
struct Cli {
    /// Directory for the JSON results.
    #[arg(long, global = true, default_value = "bench/results")]
    out: PathBuf,
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Debug, Subcommand)]
enum Suite {
    /// Training throughput (tokens/s, ms/step) on the CPU for d2 and d6.
    Train(train_suite::TrainArgs),
    /// Checkpoint stall, time to durable, persist and restore bandwidth against the raw disk,
    /// and PyTorch's checkpointing on the same state where torch is installed.
    Ckpt(ckpt_suite::CkptArgs),
    /// Time from SIGKILL of one rank under `lazarus launch` to the first step after the restart:
    /// detection, restart and restore, and the steps of work lost.
    Recovery(recovery_suite::RecoveryArgs),
    /// On one NVIDIA GPU: d12 (GPT-2 124M) tokens/s and MFU, the checkpoint stall of a run that
    /// saves at every step, CPU-vs-CUDA loss curves, and the PyTorch GPT-2 peer; skipped (and
    /// recorded) without a GPU.
    Gpu(gpu_suite::GpuArgs),
    /// Writes bench/REPORT.md and bench/plots/*.svg from the newest result of each suite.
    Report(report::ReportArgs),
    /// Every suite with small settings (a few minutes on 2 cores), then the report.
    All(AllArgs),
}

/// Options of `all`; the suites' other options keep their defaults, except the sizes below.
#[derive(Debug, Args)]
struct AllArgs {
    /// Directory on the disk the ckpt suite measures.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Python with torch for the PyTorch peer (see `ckpt --help`).
    #[arg(long)]
    torch_python: Option<PathBuf>,
    /// Ranks of the PyTorch peer; 0 skips it.
    #[arg(long, default_value_t = 2)]
    peer_ranks: usize,
    #[command(flatten)]
    report: report::ReportArgs,
}

/// The train suite's small settings in `all`.
const ALL_TRAIN_ARGS: &[&str] = &["--models", "d2,d6", "--steps", "5"];
/// The ckpt suite's small settings in `all` (`--dir` and the peer options are added).
const ALL_CKPT_ARGS: &[&str] = &["--sizes-mib", "64,256", "--reps-small", "2"];

/// The recovery suite's settings in `all` (`--dir` is added): its defaults, d2 and d6.
const ALL_RECOVERY_ARGS: &[&str] = &["--models", "d2,d6"];

/// Parses a suite's options from words, as its subcommand would.
fn suite_args<A: Args>(words: &[String]) -> Result<A> {
    #[derive(Parser)]
    #[command(no_binary_name = true)]
    struct Wrap<A: Args> {
        #[command(flatten)]
        args: A,
    }
    Wrap::<A>::try_parse_from(words)
        .map(|w| w.args)
        .with_context(|| format!("the settings of `all`: {}", words.join(" ")))
}

/// `all`: train, ckpt and recovery with small settings, then the report.
fn run_all(args: &AllArgs, out: &Path) -> Result<()> {
    let t0 = Instant::now();
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let train = words(ALL_TRAIN_ARGS);
    println!("== lazarus-bench train {}", train.join(" "));
    train_suite::run(&suite_args(&train)?, out)?;
    let t_train = t0.elapsed().as_secs_f64();

    let mut ckpt = words(ALL_CKPT_ARGS);
    ckpt.extend(["--dir".into(), args.dir.display().to_string()]);
    ckpt.extend(["--peer-ranks".into(), args.peer_ranks.to_string()]);
    if let Some(p) = &args.torch_python {
        ckpt.extend(["--torch-python".into(), p.display().to_string()]);
    }
    println!("== lazarus-bench ckpt {}", ckpt.join(" "));
    ckpt_suite::run(&suite_args(&ckpt)?, out)?;
    let t_ckpt = t0.elapsed().as_secs_f64();

    let mut recovery = words(ALL_RECOVERY_ARGS);
    recovery.extend(["--dir".into(), args.dir.display().to_string()]);
    println!("== lazarus-bench recovery {}", recovery.join(" "));
    recovery_suite::run(&suite_args(&recovery)?, out)?;
    let t_recovery = t0.elapsed().as_secs_f64();

    println!("== lazarus-bench report");
    report::run(&args.report, out)?;
    let total = t0.elapsed().as_secs_f64();
    println!(
        "all: {total:.0} s (train {t_train:.0} s, ckpt {:.0} s, recovery {:.0} s, report {:.1} s)",
        t_ckpt - t_train,
        t_recovery - t_ckpt,
        total - t_recovery
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.suite {
        Suite::Train(args) => train_suite::run(&args, &cli.out),
        Suite::Ckpt(args) => ckpt_suite::run(&args, &cli.out),
        Suite::Recovery(args) => recovery_suite::run(&args, &cli.out),
        Suite::Gpu(args) => gpu_suite::run(&args, &cli.out),
        Suite::Report(args) => report::run(&args, &cli.out),
        Suite::All(args) => run_all(&args, &cli.out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_small_settings_parse() {
        let w = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        suite_args::<train_suite::TrainArgs>(&w(ALL_TRAIN_ARGS)).unwrap();
        suite_args::<ckpt_suite::CkptArgs>(&w(ALL_CKPT_ARGS)).unwrap();
        let e = suite_args::<ckpt_suite::CkptArgs>(&w(&["--sizes-mib", "0"])).unwrap_err();
        assert!(format!("{e:#}").contains("--sizes-mib 0"), "{e:#}");
    }
}
