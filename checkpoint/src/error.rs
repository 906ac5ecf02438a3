//! `CheckpointError`: everything that can go wrong while saving, committing or restoring.

use std::path::PathBuf;

use lazarus_comm::CommError;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, CheckpointError>;

/// Every failure of this crate. Messages name the file, what was found, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// An ordinary I/O call failed.
    #[error("{op} `{path}` failed: {source}; check that the path exists, is writable and is on a healthy filesystem")]
    Io {
        /// What was being done ("create", "read", "rename", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// `posix_fallocate` could not reserve the shard's space (disk full, file too large, quota).
    #[error("cannot reserve {bytes} bytes for `{path}`: {source}; free disk space or point the checkpoint directory at a larger filesystem")]
    NoSpace {
        /// The temporary shard file.
        path: PathBuf,
        /// The full file size that was requested.
        bytes: u64,
        /// The operating-system error (ENOSPC, EFBIG, EDQUOT, ...).
        #[source]
        source: std::io::Error,
    },
    /// `msync`/`fsync` failed: the data may not be on disk. The save is abandoned, never retried,
    /// because after a failed fsync the kernel may have dropped the dirty pages.
    #[error("{op} of `{path}` failed: {source}; this save is abandoned and will not be retried (the data may not be durable)")]
    Durability {
        /// "msync", "fsync" or "fsync directory".
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// The caller passed tensors or arguments that do not make sense.
    #[error("invalid argument: {detail}")]
    BadInput {
        /// What is wrong, naming the tensor or argument.
        detail: String,
    },
    /// A shard file is damaged: wrong size, unreadable header, metadata that contradicts itself.
    #[error("damaged shard `{path}`: {detail}; this checkpoint will not be loaded (an older committed one is used instead)")]
    Corrupt {
        /// The shard file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// A tensor's stored bytes do not hash to the checksum recorded when it was written.
    #[error("checksum mismatch in `{path}`, tensor `{tensor}`: expected {expected}, found {found}; the file was modified or damaged after it was written, so this checkpoint will not be loaded")]
    ChecksumMismatch {
        /// The shard file.
        path: PathBuf,
        /// The tensor whose bytes differ.
        tensor: String,
        /// The checksum recorded in the header.
        expected: String,
        /// The checksum of the bytes on disk.
        found: String,
    },
    /// A shard that the manifest (or the commit) needs is absent.
    #[error("shard file `{path}` is missing; a rank did not finish its save (or the file was deleted), so this step cannot be committed or loaded")]
    MissingShard {
        /// The expected path.
        path: PathBuf,
    },
    /// The step directory contains a shard file of another world size, or one the manifest does not list.
    #[error("unexpected shard file `{path}`: it does not belong to this checkpoint (left by a run with another world size?); remove it or the checkpoint directory")]
    ExtraShard {
        /// The unexpected file.
        path: PathBuf,
    },
    /// `COMMITTED` is unreadable, not JSON, or contradicts its directory.
    #[error("bad manifest `{path}`: {detail}; this checkpoint is ignored")]
    BadManifest {
        /// The `COMMITTED` file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// A step directory already has `COMMITTED`; committed checkpoints are never modified.
    #[error("`{dir}` is already committed; committed checkpoints are never rewritten (move the directory away to save this step again)")]
    AlreadyCommitted {
        /// The step directory.
        dir: PathBuf,
    },
    /// A tensor or shard asked for on restore is not there.
    #[error("{what} not found in checkpoint `{dir}`")]
    NotFound {
        /// What was looked for.
        what: String,
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// Another live process holds the run directory's lock.
    #[error("run directory lock `{path}` is held by pid {pid} on host `{host}` (started at unix ms {started_unix_ms}); stop that run first, or delete the lock file if you are sure it is dead")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// Host that holds it.
        host: String,
        /// Process id that holds it.
        pid: u32,
        /// When that process took the lock.
        started_unix_ms: u64,
    },
    /// The writer thread is gone (it panicked); no more saves can be made by this writer.
    #[error("checkpoint writer thread of rank {rank} is gone ({detail}); restart the run")]
    WriterGone {
        /// The rank whose writer died.
        rank: usize,
        /// What was observed.
        detail: String,
    },
    /// A bounded wait ran out.
    #[error("timed out after {timeout_ms} ms waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The bound that expired.
        timeout_ms: u64,
    },
    /// A collective used for agreement failed.
    #[error("checkpoint agreement failed: {0}")]
    Comm(#[from] CommError),
}

impl CheckpointError {
    /// Shorthand for [`CheckpointError::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CheckpointError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`CheckpointError::Corrupt`].
    pub(crate) fn corrupt(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        CheckpointError::Corrupt {
            path: path.into(),
            detail: detail.into(),
        }
    }

    /// Shorthand for [`CheckpointError::BadInput`].
    pub(crate) fn bad_input(detail: impl Into<String>) -> Self {
        CheckpointError::BadInput {
            detail: detail.into(),
        }
    }

    /// Shorthand for [`CheckpointError::BadManifest`].
    pub(crate) fn bad_manifest(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        CheckpointError::BadManifest {
            path: path.into(),
            detail: detail.into(),
        }
    }
}
