//! Sharded, checksummed checkpoints committed all-or-nothing across ranks.
//! This crate saves named byte ranges and knows nothing about models.
//!
//! Flow of one checkpoint: [`CheckpointManager::save`] copies a rank's tensors into a staging
//! buffer and hands it to the rank's writer thread, which writes one safetensors-layout shard
//! ([`write_shard`]); at every step boundary [`CheckpointManager::step_boundary`] agrees on the
//! newest step durable on all ranks and rank 0 writes `COMMITTED` ([`commit`]). On restart
//! [`restore_agreed`] picks the newest committed checkpoint every rank can verify, and
//! [`OpenCheckpoint::read_flat`] reads any element range of a flat array from the old shards,
//! whatever the old world size.

#[cfg(not(target_endian = "little"))]
compile_error!(
    "lazarus-checkpoint stores raw little-endian bytes and supports little-endian hosts only"
);

mod checksum;
mod discover;
mod error;
mod fault;
mod format;
mod header;
mod lock;
mod manager;
mod manifest;
mod restore;
mod retention;
mod write;
mod writer;

pub use checksum::{checksum, to_hex, CHECKSUM_ALGO, CHUNK_BYTES};
pub use discover::{discover_committed, list_checkpoints, CheckpointEntry, EntryStatus};
pub use error::{CheckpointError, Result};
pub use fault::{crash_point, CRASH_AT_ENV, CRASH_POINTS};
pub use format::{
    parse_step_dir_name, shard_file_name, step_dir_name, Compression, Dtype, FlatSlice, ShardInfo,
    ShardMeta, TensorRecord, TensorSpec, COMMITTED_FILE, FORMAT_NAME, FORMAT_VERSION,
};
pub use lock::{lock_holder, LockHolder, RunLock, LOCK_FILE};
pub use manager::{BoundaryReport, CheckpointManager, PENDING_SAVES_MAX};
pub use manifest::{commit, Manifest};
pub use restore::{
    flat_shards_for, open_verified, restore_agreed, OpenCheckpoint, Rejected, RestoreOutcome,
};
pub use retention::{apply_retention, discard_newer_than, QUARANTINE_DIR};
pub use write::write_shard;
pub use writer::{
    AsyncWriter, SaveOutcome, SaveStats, Staging, StagingBuffer, SAVES_IN_FLIGHT_MAX,
};
