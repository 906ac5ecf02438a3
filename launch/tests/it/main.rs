//! End-to-end tests of the `lazarus` binary: real processes, real files.

mod ckpt_cli;
mod cli_errors;
mod dry_run;
mod eval;
mod faults;
#[cfg(feature = "mpi")]
mod mpi;
mod rank_group;
pub mod ranks;
#[cfg(feature = "mpi")]
mod slurm;
mod stages;
mod stats;
mod status;
mod supervise;
mod train_runs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
pub fn lazarus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lazarus"))
}

/// `train` with a model small enough that a run takes a fraction of a second.
pub const TINY_TRAIN: [&str; 11] = [
    "train",
    "--model",
    "d2",
    "--channels",
    "32",
    "--heads",
    "2",
    "--seq",
    "16",
    "--batch",
    "4",
];

/// Runs the binary with `args`, returning its output.
pub fn run(args: &[&str]) -> Output {
    lazarus().args(args).output().expect("spawn lazarus")
}

/// Text of stdout and stderr together.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Writes a small synthetic corpus into `dir/data` and returns its path.
pub fn synth_data(dir: &Path, bytes: usize) -> PathBuf {
    let data = dir.join("data");
    let o = run(&[
        "data",
        "synth",
        "--out",
        data.to_str().unwrap(),
        "--bytes",
        &bytes.to_string(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    data
}

/// Reads `final_metrics.json` of a run directory.
pub fn final_metrics(run_dir: &Path) -> serde_json::Value {
    let s =
        std::fs::read_to_string(run_dir.join("final_metrics.json")).expect("final_metrics.json");
    serde_json::from_str(&s).expect("valid JSON")
}
