//! The `lazarus` command line: parses arguments, runs the chosen command, and maps errors to
//! exit codes (2 for usage and configuration errors, 1 for everything else).

mod ckpt_cmd;
mod cli;
mod dry_run;
mod eval_cmd;
mod ranks;
mod signals;
mod slurm;
mod status_cmd;
mod supervise;
mod train_cmd;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            let usage = e
                .downcast_ref::<lazarus_trainer::TrainError>()
                .is_some_and(|t| matches!(t, lazarus_trainer::TrainError::Config(_)));
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}
