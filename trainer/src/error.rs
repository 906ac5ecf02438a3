//! The trainer's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the trainer, with what was found and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A token shard file is unusable.
    #[error("bad token file {}: {detail}", path.display())]
    Data { path: PathBuf, detail: String },
    /// An I/O error on a named path. The OS error is part of the message, not a separate
    /// source, so an error chain printed whole (`{:#}`) names it once.
    #[error("{what} {}: {cause}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A collective failed.
    #[error(transparent)]
    Comm(#[from] lazarus_comm::CommError),
    /// Saving, committing or reading a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] lazarus_checkpoint::CheckpointError),
    /// The run cannot resume as asked (incompatible or unusable checkpoint).
    #[error("cannot resume: {0}")]
    Resume(String),
    /// A checkpoint cannot be exported as asked.
    #[error("cannot export: {0}")]
    Export(String),
    /// A compute backend failed or is unavailable.
    #[error(transparent)]
    Kernel(#[from] lazarus_kernels::KernelError),
    /// The loss or the gradients stopped being finite.
    #[error("training diverged at step {step}: {detail}")]
    Diverged { step: u64, detail: String },
}

impl TrainError {
    /// Wraps an I/O error with the operation and the path it concerned.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        TrainError::Io {
            what,
            path: path.into(),
            cause,
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
