//! Command-line definitions and dispatch.

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use lazarus_trainer::corpus::{self, Tokenizer};
use std::path::PathBuf;

/// Lazarus: a GPT-2 trainer that survives preemption.
#[derive(Debug, Parser)]
#[command(name = "lazarus", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model (with no arguments: the embedded default, a small model on synthetic data).
    Train(TrainArgs),
    /// Make token files.
    #[command(subcommand)]
    Data(DataCommand),
    /// Continue a prompt with a trained model (final weights, or a checkpoint).
    Sample(SampleArgs),
    /// Validation loss and bits per byte of a checkpoint on held-out data.
    Eval(crate::eval_cmd::EvalArgs),
    /// Supervise the ranks of one machine: restart them after a failure or hang.
    Launch(crate::supervise::LaunchArgs),
    /// Start N rank processes of one machine with their rank, world size, local rank and a
    /// rendezvous key in the environment (for `--comm nccl`, as mpirun does for MPI); the group
    /// ends as one when a rank fails.
    Ranks(crate::ranks::RanksArgs),
    /// Print a SLURM batch script for a preemptible partition (requeue, signal forwarding).
    Sbatch(crate::slurm::SbatchArgs),
    /// Where a run stands: step, newest checkpoint, loss, speed, ETA, restarts, errors.
    /// Exit code: 0 complete, 1 failed, 3 running, 4 stopped.
    Status(crate::status_cmd::StatusArgs),
    /// List, verify, inspect, prune and export a run's checkpoints.
    #[command(subcommand)]
    Ckpt(crate::ckpt_cmd::CkptCommand),
}

/// Flags of `lazarus train`; each one overrides the config file.
#[derive(Debug, Args, Default)]
pub struct TrainArgs {
    /// TOML config file; flags given here win over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model preset: d2, d6, d12, d24, d48.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub channels: Option<usize>,
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Optimizer steps in the run.
    #[arg(long, allow_negative_numbers = true, value_parser = positive_u64)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Global micro-batch (sequences per micro-step over all ranks).
    #[arg(long, allow_negative_numbers = true, value_parser = positive_usize)]
    pub batch: Option<usize>,
    /// Sequence length T.
    #[arg(long, allow_negative_numbers = true, value_parser = positive_usize)]
    pub seq: Option<usize>,
    /// Micro-batches accumulated per step.
    #[arg(long, allow_negative_numbers = true, value_parser = positive_usize)]
    pub accum: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long)]
    pub weight_decay: Option<f32>,
    #[arg(long)]
    pub grad_clip: Option<f32>,
    /// Token file or directory of token files.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub val_every: Option<u64>,
    #[arg(long)]
    pub val_batches: Option<usize>,
    #[arg(long, allow_negative_numbers = true, value_parser = positive_u64)]
    pub log_every: Option<u64>,
    /// Run directory (config, metrics, checkpoints, final metrics).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Save a checkpoint every N steps (0: only at the end and when stopped).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Committed checkpoints to keep (the newest is never removed).
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Checkpoint compression.
    #[arg(long, value_parser = ["none", "zstd"])]
    pub ckpt_compress: Option<String>,
    /// Stop training when a checkpoint cannot be saved (default: warn and go on).
    #[arg(long)]
    pub ckpt_fail_fast: bool,
    /// Where to start: `auto` (newest usable committed checkpoint, else fresh), `never`, or a
    /// checkpoint directory.
    #[arg(long, default_value = "auto")]
    pub resume: String,
    /// End this invocation after step N as a preemption would (save, commit, exit 0).
    #[arg(long, allow_negative_numbers = true, value_parser = positive_u64)]
    pub stop_at: Option<u64>,
    /// Restore weights but not AdamW's moments.
    #[arg(long)]
    pub no_load_optimizer: bool,
    /// Restore weights but restart the schedule and data stream at step 0.
    #[arg(long)]
    pub reset_schedule: bool,
    /// Longest wait, in ms, for the last checkpoint to become durable when stopping or finishing.
    #[arg(long, default_value_t = 60_000)]
    pub grace_ms: u64,
    /// Number of ranks in this process (threads); with `--comm mpi` the world comes from MPI.
    #[arg(long, default_value_t = 1, value_parser = positive_usize)]
    pub ranks: usize,
    /// How ranks talk: `threads` (ranks in this process), `mpi` (one process per rank, under
    /// mpirun or srun --mpi=pmix; needs a build with the `mpi` feature) or `nccl` (one process
    /// per GPU, under `lazarus launch`, `lazarus ranks` or srun; needs the `cuda` feature and
    /// `--device cuda`).
    #[arg(long, value_enum, default_value_t = CommArg::Threads)]
    pub comm: CommArg,
    /// Deadline of every collective, in ms: a dead or hung peer becomes an error after it.
    #[arg(long, default_value_t = lazarus_comm::COLLECTIVE_TIMEOUT_MS_DEFAULT)]
    pub collective_timeout_ms: u64,
    /// Compute device (default: the config's `device`, else cpu). `cuda` needs a build with
    /// the `cuda` feature; each rank uses the GPU of its local rank.
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
    /// What the GPU stores parameters, gradients and activations in (default: the config's
    /// `precision`, else f32). `bf16` is mixed precision: f32 master weights and AdamW state,
    /// f32 math in every kernel; it needs `--device cuda`.
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// Never draw a progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
    /// Rows of the position embedding, the longest sequence the model takes (default: --seq,
    /// or the longest stage's).
    #[arg(long, allow_negative_numbers = true, value_parser = positive_usize)]
    pub block_size: Option<usize>,
    /// Seconds between live stats (a log line and a metrics.jsonl record); 0: none [default: 30].
    #[arg(long)]
    pub stats_interval_s: Option<u64>,
    /// Peak of the training device in TFLOP/s, for MFU in the live stats (default: the bf16
    /// peak of a known GPU that trains).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// With [[stages]] in the config: run only this stage.
    #[arg(long)]
    pub stage: Option<String>,
    /// Print the config's stages and where each stands, then exit.
    #[arg(long)]
    pub list_stages: bool,
    /// Check config, data, run directory and device; estimate memory per rank, checkpoint size
    /// and time per step; exit without training (1 if a check fails or the batch does not fit).
    #[arg(long)]
    pub dry_run: bool,
    /// Memory the dry run holds the estimate against, in GiB (default: the host's available
    /// memory, bounded by the cgroup limit).
    #[arg(long)]
    pub memory_budget_gib: Option<f64>,
    /// Steps the dry run trains (in memory only) to estimate the time per step; 0: none.
    #[arg(long, default_value_t = 3)]
    pub dry_run_steps: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum CommArg {
    #[default]
    Threads,
    Mpi,
    /// One process per GPU (under `lazarus ranks`/`launch` or srun); needs the `cuda` feature.
    Nccl,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    F32,
    Bf16,
}

impl From<PrecisionArg> for lazarus_trainer::config::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Self::F32,
            PrecisionArg::Bf16 => Self::Bf16,
        }
    }
}

impl From<DeviceArg> for lazarus_trainer::config::ComputeDevice {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Cpu => Self::Cpu,
            DeviceArg::Cuda => Self::Cuda,
        }
    }
}

fn positive_u64(s: &str) -> std::result::Result<u64, String> {
    match s.parse::<i128>() {
        Ok(v) if v > 0 && v <= u64::MAX as i128 => Ok(v as u64),
        Ok(v) => Err(format!("must be a positive integer, got {v}")),
        Err(_) => Err(format!("`{s}` is not an integer")),
    }
}

fn positive_usize(s: &str) -> std::result::Result<usize, String> {
    positive_u64(s).map(|v| v as usize)
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write the deterministic synthetic corpus (byte-level, learnable structure).
    Synth {
        /// Output directory.
        #[arg(long, default_value = "data/synth")]
        out: PathBuf,
        /// Corpus size in bytes (= tokens).
        #[arg(long, default_value_t = 2_000_000, value_parser = positive_usize)]
        bytes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Tokenise a local text file into train/val token files.
    Prepare {
        /// The text file.
        #[arg(long)]
        text: PathBuf,
        #[arg(long, value_enum, default_value_t = TokenizerArg::Gpt2)]
        tokenizer: TokenizerArg,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Fraction of tokens held out for validation.
        #[arg(long, default_value_t = 0.1)]
        val_frac: f64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TokenizerArg {
    Gpt2,
    Bytes,
}

/// Flags of `lazarus sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Run directory (of a finished run, unless --checkpoint or --stage picks a checkpoint).
    #[arg(long)]
    pub run_dir: PathBuf,
    /// Take the weights of this committed checkpoint step instead of the final weights.
    #[arg(long)]
    pub checkpoint: Option<u64>,
    /// In a run with stages: take the checkpoint from this stage (default: the last that has one).
    #[arg(long)]
    pub stage: Option<String>,
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Runs a parsed command line; returns the exit code of a command that succeeded.
pub fn dispatch(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Status(a) => crate::status_cmd::run(&a),
        Command::Launch(a) => crate::supervise::launch(&a),
        Command::Ranks(a) => crate::ranks::run(&a),
        Command::Sbatch(a) => crate::slurm::sbatch(&a).map(|()| 0),
        Command::Train(args) => crate::train_cmd::train(args).map(|()| 0),
        Command::Data(DataCommand::Synth { out, bytes, seed }) => {
            let (train, val) = corpus::synth(&out, seed, bytes)?;
            println!("wrote {} and {}", train.display(), val.display());
            Ok(0)
        }
        Command::Data(DataCommand::Prepare {
            text,
            tokenizer,
            out,
            val_frac,
        }) => {
            let tok = match tokenizer {
                TokenizerArg::Gpt2 => Tokenizer::Gpt2,
                TokenizerArg::Bytes => Tokenizer::Bytes,
            };
            let (train, val, n) = corpus::prepare(&text, tok, &out, val_frac)?;
            println!(
                "{n} tokens: wrote {} and {}",
                train.display(),
                val.display()
            );
            Ok(0)
        }
        Command::Ckpt(c) => crate::ckpt_cmd::run(c).map(|()| 0),
        Command::Sample(a) => crate::eval_cmd::sample(&a).map(|()| 0),
        Command::Eval(a) => crate::eval_cmd::eval(&a).map(|()| 0),
    }
}
