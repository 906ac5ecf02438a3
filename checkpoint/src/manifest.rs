//! The `COMMITTED` manifest: what it holds, how it is written atomically, how it is read back.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::checksum::is_hex16;
use crate::error::{CheckpointError, Result};
use crate::format::{
    is_shard_file_name, shard_file_name, ShardInfo, COMMITTED_FILE, FORMAT_VERSION,
};
use crate::header::read_header;
use crate::write::fsync_dir;

/// Largest `COMMITTED` file read (a manifest of thousands of shards is far smaller).
const MANIFEST_BYTES_MAX: u64 = 256 << 20;

/// Contents of `COMMITTED`: the step, who wrote it, every shard's size and checksums, and the
/// trainer's opaque training state at that step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// The committed step.
    pub step: u64,
    /// Number of ranks (and shards).
    pub world_size: usize,
    /// Layout hash of the run that wrote it.
    pub layout_hash: String,
    /// Commit time, milliseconds since the Unix epoch (informational only; never used to order).
    pub created_unix_ms: u64,
    /// One record per rank, in rank order.
    pub shards: Vec<ShardInfo>,
    /// Training state at `step` (epoch, tokens, schedule, metrics), opaque to this crate.
    pub training_state: serde_json::Value,
}

impl Manifest {
    /// Reads and validates `path` (a `COMMITTED` file).
    pub fn read(path: &Path) -> Result<Manifest> {
        let len = fs::metadata(path)
            .map_err(|e| CheckpointError::io("stat", path, e))?
            .len();
        if len > MANIFEST_BYTES_MAX {
            return Err(CheckpointError::bad_manifest(
                path,
                format!("{len} bytes is too large for a manifest"),
            ));
        }
        let bytes = fs::read(path).map_err(|e| CheckpointError::io("read", path, e))?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            CheckpointError::bad_manifest(path, format!("not a valid manifest: {e}"))
        })?;
        m.validate(path)?;
        Ok(m)
    }

    /// Checks the manifest's internal consistency (not the files it names).
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |d: String| Err(CheckpointError::bad_manifest(path, d));
        if self.format_version != FORMAT_VERSION {
            return bad(format!(
                "format_version {} is not supported (this build reads {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if self.world_size == 0 || self.shards.len() != self.world_size {
            return bad(format!(
                "{} shards listed for world size {}",
                self.shards.len(),
                self.world_size
            ));
        }
        for (r, s) in self.shards.iter().enumerate() {
            let want = shard_file_name(r, self.world_size);
            if s.file != want {
                return bad(format!(
                    "shard {r} is named `{}`, expected `{want}`",
                    s.file
                ));
            }
            if !is_hex16(&s.header_xxh3) || s.tensors.values().any(|t| !is_hex16(&t.checksum)) {
                return bad(format!("shard `{}` has a malformed checksum", s.file));
            }
        }
        Ok(())
    }
}

/// Writes `COMMITTED` for `step_dir`: reads each shard's header (sizes checked against the
/// header before anything is mapped; step, rank, world size and layout hash checked), builds the
/// manifest, writes `COMMITTED.tmp`, fsyncs, renames, fsyncs the directory. Refuses when a shard
/// is missing or damaged, or when the directory is already committed.
pub fn commit(
    step_dir: &Path,
    step: u64,
    world_size: usize,
    layout_hash: &str,
    training_state: serde_json::Value,
) -> Result<Manifest> {
    if step_dir.join(COMMITTED_FILE).exists() {
        return Err(CheckpointError::AlreadyCommitted {
            dir: step_dir.to_path_buf(),
        });
    }
    if world_size == 0 {
        return Err(CheckpointError::bad_input("world size 0"));
    }
    check_no_foreign_shards(step_dir, world_size)?;
    let shards = (0..world_size)
        .map(|r| read_shard_info(step_dir, step, r, world_size, layout_hash))
        .collect::<Result<Vec<_>>>()?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step,
        world_size,
        layout_hash: layout_hash.to_string(),
        created_unix_ms: unix_ms_now(),
        shards,
        training_state,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    write_file_atomic(step_dir, COMMITTED_FILE, &json, || {
        crate::fault::crash_point("commit-before-rename", step)
    })?;
    Ok(manifest)
}

/// Refuses a step directory holding shard files of another world size (left by an earlier
/// life of the run): committed, it would fail verification at every restore.
fn check_no_foreign_shards(step_dir: &Path, world_size: usize) -> Result<()> {
    let rd = fs::read_dir(step_dir).map_err(|e| CheckpointError::io("list", step_dir, e))?;
    for entry in rd {
        let name = entry
            .map_err(|e| CheckpointError::io("list", step_dir, e))?
            .file_name();
        let name = name.to_string_lossy();
        let ours = (0..world_size).any(|r| shard_file_name(r, world_size) == name);
        if is_shard_file_name(&name) && !ours {
            return Err(CheckpointError::ExtraShard {
                path: step_dir.join(&*name),
            });
        }
    }
    Ok(())
}

/// Reads the header of rank `rank`'s shard in `step_dir` and checks it belongs to this step.
fn read_shard_info(
    step_dir: &Path,
    step: u64,
    rank: usize,
    world: usize,
    layout_hash: &str,
) -> Result<ShardInfo> {
    let file = shard_file_name(rank, world);
    let path = step_dir.join(&file);
    let mut f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::MissingShard { path });
        }
        Err(e) => return Err(CheckpointError::io("open", &path, e)),
    };
    let md = f
        .metadata()
        .map_err(|e| CheckpointError::io("stat", &path, e))?;
    if !md.is_file() {
        return Err(CheckpointError::corrupt(&path, "is not a regular file"));
    }
    let header = read_header(&mut f, &path, md.len())?;
    let m = &header.meta;
    if m.step != step || m.rank != rank || m.world_size != world || m.layout_hash != layout_hash {
        return Err(CheckpointError::corrupt(
            &path,
            format!(
                "header says step {}, rank {} of {}, layout {}; expected step {step}, rank {rank} of {world}, layout {layout_hash}",
                m.step, m.rank, m.world_size, m.layout_hash
            ),
        ));
    }
    Ok(header.info(&file))
}

/// Writes `dir/name` atomically and durably: `name.tmp`, fsync, rename, fsync of `dir`.
/// `before_rename` runs between the fsync and the rename (a crash point in fault tests).
pub(crate) fn write_file_atomic(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    before_rename: impl FnOnce(),
) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| CheckpointError::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| CheckpointError::io("write", &tmp, e))?;
        f.sync_all().map_err(|source| CheckpointError::Durability {
            op: "fsync",
            path: tmp.clone(),
            source,
        })?;
        before_rename();
        fs::rename(&tmp, dir.join(name)).map_err(|e| CheckpointError::io("rename", &tmp, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fsync_dir(dir)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
