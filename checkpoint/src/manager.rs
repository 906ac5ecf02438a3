//! The checkpoint manager: async saves plus the commit protocol run at every step boundary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lazarus_comm::Communicator;

use crate::error::{CheckpointError, Result};
use crate::format::{step_dir_name, Compression, TensorSpec};
use crate::manifest::commit;
use crate::retention::apply_retention;
use crate::writer::{AsyncWriter, SaveStats, Staging};

/// Saves kept waiting for their commit at most; older ones are dropped (a rank keeps failing).
pub const PENDING_SAVES_MAX: usize = 16;

/// Broadcast value meaning "nothing committed".
const NO_STEP: u64 = u64::MAX;

/// What one step boundary did.
#[derive(Debug, Default)]
pub struct BoundaryReport {
    /// The step committed at this boundary (the same on every rank), if any.
    pub committed: Option<u64>,
    /// This rank's saves that failed since the last boundary, with why. Training goes on.
    pub failed_saves: Vec<(u64, CheckpointError)>,
    /// Rank 0 only: a commit that was refused (a shard missing or damaged on disk).
    pub failed_commit: Option<(u64, CheckpointError)>,
    /// Rank 0 only: directories removed by retention after the commit.
    pub removed: Vec<PathBuf>,
    /// Rank 0 only: retention failed (the commit itself stands).
    pub retention_error: Option<CheckpointError>,
}

/// One rank's view of checkpointing: its [`AsyncWriter`], the saves waiting for commit and,
/// on rank 0, their training states.
pub struct CheckpointManager {
    writer: AsyncWriter,
    root: PathBuf,
    rank: usize,
    world_size: usize,
    layout_hash: String,
    keep_last: usize,
    /// Saved steps not yet committed; the training state is kept on rank 0 only.
    pending: BTreeMap<u64, serde_json::Value>,
    last_committed: Option<u64>,
}

impl CheckpointManager {
    /// Creates the writer (staging buffer allocated now) for rank `rank` of `world_size`.
    pub fn new(
        ckpt_root: &Path,
        rank: usize,
        world_size: usize,
        layout_hash: String,
        tensors: Vec<TensorSpec>,
        compression: Compression,
        keep_last: usize,
    ) -> Result<Self> {
        let writer = AsyncWriter::new(
            ckpt_root,
            rank,
            world_size,
            layout_hash.clone(),
            tensors,
            compression,
        )?;
        Ok(CheckpointManager {
            writer,
            root: ckpt_root.to_path_buf(),
            rank,
            world_size,
            layout_hash,
            keep_last,
            pending: BTreeMap::new(),
            last_committed: None,
        })
    }

    /// Starts an async save of `step`. `state` is the training state at this step; rank 0 keeps
    /// it until the step is committed. Every rank must save the same steps.
    pub fn save(
        &mut self,
        step: u64,
        state: serde_json::Value,
        fill: impl FnOnce(&mut Staging<'_>),
    ) -> Result<SaveStats> {
        let stats = self.writer.save(step, fill)?;
        let state = if self.rank == 0 {
            state
        } else {
            serde_json::Value::Null
        };
        self.pending.insert(step, state);
        while self.pending.len() > PENDING_SAVES_MAX {
            self.pending.pop_first();
        }
        Ok(stats)
    }

    /// The collective run by every rank at every step boundary: all-reduce(min) of the ranks'
    /// latest durable steps; rank 0 commits the newest pending step not above that minimum
    /// (after [`commit`] checks every shard on disk) and applies retention; the result is
    /// broadcast so every rank reports the same `committed`.
    pub fn step_boundary(&mut self, comm: &dyn Communicator) -> Result<BoundaryReport> {
        let mut report = BoundaryReport::default();
        for o in self.writer.poll() {
            if let Err(e) = o.result {
                report.failed_saves.push((o.step, e));
            }
        }
        // Encoded as step + 1 so that 0 means "nothing durable yet" and step 0 can be saved.
        let local = self
            .writer
            .latest_durable_step()
            .map_or(0, |s| s.saturating_add(1));
        let min = comm.all_reduce_min_u64(local)?;
        let mut committed = NO_STEP;
        if self.rank == 0 && min > 0 {
            committed = self.try_commit(min - 1, &mut report);
        }
        let mut b = committed.to_le_bytes();
        comm.broadcast_bytes(&mut b, 0)?;
        let committed = u64::from_le_bytes(b);
        if committed != NO_STEP {
            self.last_committed = Some(committed);
            self.pending.retain(|&s, _| s > committed);
            report.committed = Some(committed);
            if self.rank == 0 {
                match apply_retention(&self.root, self.keep_last) {
                    Ok(removed) => report.removed = removed,
                    Err(e) => report.retention_error = Some(e),
                }
            }
        }
        Ok(report)
    }

    /// Rank 0: commits every pending step `<= durable`, oldest first, so that a save that
    /// became durable only after the next one started still counts towards `keep_last`.
    /// Returns the newest step committed, or `NO_STEP`.
    fn try_commit(&mut self, durable: u64, report: &mut BoundaryReport) -> u64 {
        let ready: Vec<(u64, serde_json::Value)> = self
            .pending
            .range(..=durable)
            .map(|(&s, v)| (s, v.clone()))
            .collect();
        // Whatever happens below, these steps are settled: committed now, or never (a shard
        // that failed on some rank cannot appear later).
        self.pending.retain(|&s, _| s > durable);
        let mut newest = NO_STEP;
        for (step, state) in ready {
            let dir = self.root.join(step_dir_name(step));
            crate::fault::crash_point("before-commit", step);
            match commit(&dir, step, self.world_size, &self.layout_hash, state) {
                Ok(_) => newest = step,
                Err(e) => report.failed_commit = Some((step, e)),
            }
        }
        newest
    }

    /// Waits for the in-flight save (at most `timeout`), then runs [`step_boundary`]
    /// (collective). Used at the end of training and on preemption. A wait that times out is
    /// reported as a failed save and the boundary still runs, so no rank is left waiting.
    ///
    /// [`step_boundary`]: Self::step_boundary
    pub fn finish(&mut self, comm: &dyn Communicator, timeout: Duration) -> Result<BoundaryReport> {
        let in_flight = self.writer.in_flight_step();
        let waited = self.writer.wait_idle(timeout);
        let mut report = self.step_boundary(comm)?;
        if let Err(e) = waited {
            report.failed_saves.push((in_flight.unwrap_or(0), e));
        }
        Ok(report)
    }

    /// Blocks until this rank's in-flight save (if any) has finished, at most `timeout`; its
    /// outcome is reported by the next [`step_boundary`](Self::step_boundary). Not a collective.
    pub fn wait_idle(&mut self, timeout: Duration) -> Result<()> {
        self.writer.wait_idle(timeout)
    }

    /// The newest step committed through this manager.
    pub fn last_committed(&self) -> Option<u64> {
        self.last_committed
    }

    /// The underlying writer (for its durable step and in-flight state).
    pub fn writer(&self) -> &AsyncWriter {
        &self.writer
    }
}
