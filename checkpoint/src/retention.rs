//! Retention (keep the newest committed checkpoints, drop stale partial ones) and the clearing
//! of step directories newer than a restored step.

use std::fs;
use std::path::{Path, PathBuf};

use crate::discover::{list_checkpoints, EntryStatus};
use crate::error::{CheckpointError, Result};
use crate::format::COMMITTED_FILE;
use crate::manifest::unix_ms_now;

/// Folder under the checkpoint root that receives rejected committed checkpoints.
pub const QUARANTINE_DIR: &str = "quarantine";

/// Keeps the newest `keep_last` committed checkpoints (at least one: the newest committed one
/// is never removed, even with `keep_last = 0`), removes older committed ones, and removes
/// uncommitted or invalid step directories older than the newest commit. Uncommitted
/// directories newer than it (a save in flight) are kept. Returns the removed directories.
pub fn apply_retention(ckpt_root: &Path, keep_last: usize) -> Result<Vec<PathBuf>> {
    let entries = list_checkpoints(ckpt_root)?;
    let mut committed: Vec<(u64, &Path)> = entries
        .iter()
        .filter_map(|e| Some((e.manifest()?.step, e.dir.as_path())))
        .collect();
    committed.sort_by_key(|c| std::cmp::Reverse(c.0));
    let Some(&(newest, _)) = committed.first() else {
        return Ok(Vec::new());
    };
    let mut doomed: Vec<&Path> = committed
        .iter()
        .skip(keep_last.max(1))
        .map(|c| c.1)
        .collect();
    doomed.extend(
        entries
            .iter()
            .filter(|e| !matches!(e.status, EntryStatus::Committed(_)))
            .filter(|e| e.dir_step.is_some_and(|s| s < newest))
            .map(|e| e.dir.as_path()),
    );
    let mut removed = Vec::with_capacity(doomed.len());
    for dir in doomed {
        remove_step_dir(dir)?;
        removed.push(dir.to_path_buf());
        crate::fault::crash_point("retention", newest);
    }
    Ok(removed)
}

/// Clears every step directory newer than `restored` (all of them when `None`) so that a
/// resumed run can write those steps again: uncommitted ones are removed; committed or invalid
/// ones (which restore rejected) are moved to `quarantine/` for inspection. Only call this with
/// no save in flight (at restore, before the first save). Returns the original paths.
pub fn discard_newer_than(ckpt_root: &Path, restored: Option<u64>) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in list_checkpoints(ckpt_root)? {
        if e.dir_step.is_none() {
            continue; // Not a name a run writes; leave it to the user.
        }
        let keep = restored
            .is_some_and(|r| e.step().is_none_or(|s| s <= r) && e.dir_step.is_none_or(|d| d <= r));
        if keep {
            continue;
        }
        if matches!(e.status, EntryStatus::Uncommitted) {
            remove_step_dir(&e.dir)?;
        } else {
            quarantine(ckpt_root, &e.dir)?;
        }
        out.push(e.dir);
    }
    Ok(out)
}

/// Removes a step directory, `COMMITTED` first, so a reader never sees a committed checkpoint
/// with files missing.
fn remove_step_dir(dir: &Path) -> Result<()> {
    match fs::remove_file(dir.join(COMMITTED_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(CheckpointError::io("remove", dir.join(COMMITTED_FILE), e)),
    }
    fs::remove_dir_all(dir).map_err(|e| CheckpointError::io("remove directory", dir, e))
}

fn quarantine(ckpt_root: &Path, dir: &Path) -> Result<()> {
    let q = ckpt_root.join(QUARANTINE_DIR);
    fs::create_dir_all(&q).map_err(|e| CheckpointError::io("create directory", &q, e))?;
    let name = dir
        .file_name()
        .map_or_else(|| "step".into(), |n| n.to_string_lossy().into_owned());
    let target = q.join(format!("{name}.{}", unix_ms_now()));
    fs::rename(dir, &target).map_err(|e| CheckpointError::io("move to quarantine", dir, e))
}
