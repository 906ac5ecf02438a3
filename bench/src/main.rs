//! `lazarus-bench`: the benchmark harness. Each suite prints a compact table last and writes
//! JSON (with the machine, git commit and date) under `bench/results/`.

mod ckpt_suite;
mod machine;
mod train_suite;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
    /// Checkpoint stall, time to durable, persist and restore bandwidth against the raw disk.
    Ckpt(ckpt_suite::CkptArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.suite {
        Suite::Train(args) => train_suite::run(&args, &cli.out),
        Suite::Ckpt(args) => ckpt_suite::run(&args, &cli.out),
    }
}
