//! Discovery of step directories: which are committed, uncommitted, or invalid, ordered by step
//! (never by modification time, which copies and clock skew make meaningless).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{CheckpointError, Result};
use crate::format::{parse_step_dir_name, COMMITTED_FILE};
use crate::manifest::Manifest;

/// What a step directory is.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryStatus {
    /// Has a valid `COMMITTED` whose step matches the directory name.
    Committed(Box<Manifest>),
    /// Has no `COMMITTED`: a save in flight, or one that never finished. Restore ignores it.
    Uncommitted,
    /// Unusable, with the reason (garbage `COMMITTED`, step mismatch, odd name, unreadable).
    Invalid(String),
}

/// One `step_*` directory under the checkpoint root.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointEntry {
    /// The directory.
    pub dir: PathBuf,
    /// The step its name says, `None` if the name is not `step_NNNNNNNNN`.
    pub dir_step: Option<u64>,
    /// What it is.
    pub status: EntryStatus,
    /// Total size of the files directly inside it.
    pub size_bytes: u64,
    /// Modification time of the directory (informational only).
    pub modified: SystemTime,
}

impl CheckpointEntry {
    /// The step used to order entries: the manifest's for committed ones, else the name's.
    pub fn step(&self) -> Option<u64> {
        match &self.status {
            EntryStatus::Committed(m) => Some(m.step),
            _ => self.dir_step,
        }
    }

    /// The manifest, for committed entries.
    pub fn manifest(&self) -> Option<&Manifest> {
        match &self.status {
            EntryStatus::Committed(m) => Some(m),
            _ => None,
        }
    }
}

/// Every `step_*` directory under `ckpt_root`, oldest step first (entries without a step last).
/// A missing root is an empty list: a fresh run.
pub fn list_checkpoints(ckpt_root: &Path) -> Result<Vec<CheckpointEntry>> {
    let rd = match fs::read_dir(ckpt_root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CheckpointError::io("list", ckpt_root, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| CheckpointError::io("list", ckpt_root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        if !name.starts_with("step_") || !dir.is_dir() {
            continue;
        }
        let dir_step = parse_step_dir_name(&name);
        let status = classify(&dir, dir_step);
        let modified = fs::metadata(&dir)
            .and_then(|m| m.modified())
            .unwrap_or(UNIX_EPOCH);
        out.push(CheckpointEntry {
            size_bytes: dir_size(&dir),
            dir,
            dir_step,
            status,
            modified,
        });
    }
    out.sort_by(|a, b| {
        let key = |e: &CheckpointEntry| (e.step().is_none(), e.step(), e.dir.clone());
        key(a).cmp(&key(b))
    });
    Ok(out)
}

/// Committed checkpoints, newest step first.
pub fn discover_committed(ckpt_root: &Path) -> Result<Vec<(PathBuf, Manifest)>> {
    let mut out: Vec<(PathBuf, Manifest)> = list_checkpoints(ckpt_root)?
        .into_iter()
        .filter_map(|e| match e.status {
            EntryStatus::Committed(m) => Some((e.dir, *m)),
            _ => None,
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.1.step));
    Ok(out)
}

fn classify(dir: &Path, dir_step: Option<u64>) -> EntryStatus {
    let path = dir.join(COMMITTED_FILE);
    match fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return EntryStatus::Uncommitted,
        Err(e) => return EntryStatus::Invalid(format!("cannot stat `{}`: {e}", path.display())),
        Ok(_) => {}
    }
    let m = match Manifest::read(&path) {
        Ok(m) => m,
        Err(e) => return EntryStatus::Invalid(e.to_string()),
    };
    match dir_step {
        None => EntryStatus::Invalid(format!(
            "`{}` is not named step_NNNNNNNNN, so its step cannot be checked against the manifest (step {})",
            dir.display(),
            m.step
        )),
        Some(s) if s != m.step => EntryStatus::Invalid(format!(
            "`{}` says step {} but its directory name says step {s}; the directory was renamed or the manifest copied",
            path.display(),
            m.step
        )),
        Some(_) => EntryStatus::Committed(Box::new(m)),
    }
}

fn dir_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
