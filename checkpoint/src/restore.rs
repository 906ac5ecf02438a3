//! Verified opening of a committed checkpoint, reads of per-rank tensors and of element ranges
//! of flat arrays across old shards (resharding), and the collective restart agreement.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::ops::Range;
use std::path::{Path, PathBuf};

use lazarus_comm::Communicator;
use memmap2::{Mmap, MmapOptions};
use rayon::prelude::*;

use crate::checksum::{checksum, to_hex};
use crate::discover::{list_checkpoints, CheckpointEntry, EntryStatus};
use crate::error::{CheckpointError, Result};
use crate::format::{is_shard_file_name, ShardInfo, TensorRecord, COMMITTED_FILE};
use crate::header::{read_header, HeaderTensor, ParsedHeader, ZstdMeta};
use crate::manifest::Manifest;
use crate::retention::discard_newer_than;

/// Bound on restore rounds (each round tries one older checkpoint).
const RESTORE_ROUNDS_MAX: usize = 100_000;

/// Broadcast value meaning "no candidate".
const NO_STEP: u64 = u64::MAX;

/// One verified, read-only mapped shard.
struct OpenShard {
    path: PathBuf,
    map: Mmap,
    header: ParsedHeader,
}

/// A committed checkpoint whose requested shards passed verification, mapped read-only.
pub struct OpenCheckpoint {
    dir: PathBuf,
    manifest: Manifest,
    shards: BTreeMap<usize, OpenShard>,
}

impl std::fmt::Debug for OpenCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCheckpoint")
            .field("dir", &self.dir)
            .field("step", &self.manifest.step)
            .field("open_shards", &self.shards.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Verifies the listed shards of a committed checkpoint and maps them read-only: file sizes
/// against the manifest before mapping, header bytes against `header_xxh3`, header JSON against
/// the manifest, and every tensor's checksum. Shard files in `dir` that the manifest does not
/// list, or listed ones that are absent, are errors.
pub fn open_verified(dir: &Path, manifest: &Manifest, shards: &[usize]) -> Result<OpenCheckpoint> {
    manifest.validate(&dir.join(COMMITTED_FILE))?;
    check_shard_set(dir, manifest)?;
    let mut open = BTreeMap::new();
    for &i in shards.iter().collect::<BTreeSet<_>>() {
        let info = manifest.shards.get(i).ok_or_else(|| {
            CheckpointError::bad_input(format!(
                "shard {i} requested, checkpoint has {}",
                manifest.world_size
            ))
        })?;
        open.insert(i, open_shard(dir, manifest, i, info)?);
    }
    Ok(OpenCheckpoint {
        dir: dir.to_path_buf(),
        manifest: manifest.clone(),
        shards: open,
    })
}

/// Every shard file the manifest lists must exist, and no other shard file may.
fn check_shard_set(dir: &Path, manifest: &Manifest) -> Result<()> {
    let listed: BTreeSet<&str> = manifest.shards.iter().map(|s| s.file.as_str()).collect();
    let rd = fs::read_dir(dir).map_err(|e| CheckpointError::io("list", dir, e))?;
    let mut present = BTreeSet::new();
    for entry in rd {
        let name = entry
            .map_err(|e| CheckpointError::io("list", dir, e))?
            .file_name();
        let name = name.to_string_lossy().into_owned();
        if is_shard_file_name(&name) && !listed.contains(name.as_str()) {
            return Err(CheckpointError::ExtraShard {
                path: dir.join(name),
            });
        }
        present.insert(name);
    }
    match listed.iter().find(|f| !present.contains(**f)) {
        Some(f) => Err(CheckpointError::MissingShard { path: dir.join(f) }),
        None => Ok(()),
    }
}

fn open_shard(dir: &Path, manifest: &Manifest, rank: usize, info: &ShardInfo) -> Result<OpenShard> {
    let path = dir.join(&info.file);
    let mut file = File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CheckpointError::MissingShard { path: path.clone() },
        _ => CheckpointError::io("open", &path, e),
    })?;
    let size = file
        .metadata()
        .map_err(|e| CheckpointError::io("stat", &path, e))?
        .len();
    if size != info.size {
        return Err(CheckpointError::corrupt(
            &path,
            format!(
                "file is {size} bytes, the manifest says {} (truncated, extended or replaced)",
                info.size
            ),
        ));
    }
    let header = read_header(&mut file, &path, size)?;
    if header.header_xxh3 != info.header_xxh3 {
        return Err(CheckpointError::corrupt(
            &path,
            format!(
                "header bytes hash to {}, the manifest says {} (header modified)",
                header.header_xxh3, info.header_xxh3
            ),
        ));
    }
    let m = &header.meta;
    if m.step != manifest.step
        || m.rank != rank
        || m.world_size != manifest.world_size
        || m.layout_hash != manifest.layout_hash
    {
        return Err(CheckpointError::corrupt(
            &path,
            "header step/rank/world/layout disagree with the manifest",
        ));
    }
    if header.info(&info.file).tensors != info.tensors {
        return Err(CheckpointError::corrupt(
            &path,
            "tensor records in the header disagree with the manifest",
        ));
    }
    // SAFETY: the file's size was checked above against the manifest and against the header's
    // tensor table, so every range we slice lies inside the mapping. Committed checkpoints are
    // never modified or truncated by Lazarus (writers only create new `.tmp` files, retention
    // only unlinks whole directories, which leaves existing mappings valid), and the run lock
    // keeps other runs out; a file cannot shrink underneath this read-only map unless someone
    // outside Lazarus truncates it.
    let map = unsafe { MmapOptions::new().map(&file) }
        .map_err(|e| CheckpointError::io("mmap", &path, e))?;
    for t in header.tensors.values() {
        let found = to_hex(checksum(&map[t.file_range.clone()]));
        if found != t.record.checksum {
            return Err(CheckpointError::ChecksumMismatch {
                path,
                tensor: t.name.clone(),
                expected: t.record.checksum.clone(),
                found,
            });
        }
    }
    Ok(OpenShard { path, map, header })
}

/// The shards whose slice of flat array `name` overlaps element range `range`: the shards a
/// rank reading that range must verify.
pub fn flat_shards_for(manifest: &Manifest, name: &str, range: Range<u64>) -> Vec<usize> {
    flat_pieces(manifest, name)
        .into_iter()
        .filter(|(_, rec)| {
            let (off, len) = slice_of(rec);
            off < range.end && range.start < off + len
        })
        .map(|(i, _)| i)
        .collect()
}

fn flat_pieces<'a>(manifest: &'a Manifest, name: &str) -> Vec<(usize, &'a TensorRecord)> {
    manifest
        .shards
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.tensors
                .get(name)
                .filter(|r| r.flat.is_some())
                .map(|r| (i, r))
        })
        .collect()
}

/// (offset, len) in elements of a flat record.
fn slice_of(rec: &TensorRecord) -> (u64, u64) {
    let off = rec.flat.map_or(0, |f| f.offset);
    (off, rec.shape.first().copied().unwrap_or(0) as u64)
}

impl OpenCheckpoint {
    /// The manifest of this checkpoint.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Same as the free function [`flat_shards_for`]: the shards a rank reading `range` of flat
    /// array `name` must open.
    pub fn flat_shards_for(manifest: &Manifest, name: &str, range: Range<u64>) -> Vec<usize> {
        flat_shards_for(manifest, name, range)
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The training state stored at commit.
    pub fn training_state(&self) -> &serde_json::Value {
        &self.manifest.training_state
    }

    fn shard(&self, shard: usize) -> Result<&OpenShard> {
        self.shards
            .get(&shard)
            .ok_or_else(|| CheckpointError::NotFound {
                what: format!("shard {shard} (not opened: pass it to open_verified)"),
                dir: self.dir.clone(),
            })
    }

    fn find(&self, shard: usize, name: &str) -> Result<(&OpenShard, &HeaderTensor)> {
        let s = self.shard(shard)?;
        let t = s
            .header
            .tensors
            .get(name)
            .ok_or_else(|| CheckpointError::NotFound {
                what: format!("tensor `{name}` in `{}`", s.path.display()),
                dir: self.dir.clone(),
            })?;
        Ok((s, t))
    }

    /// The logical bytes of tensor `name` of shard `shard`: borrowed from the map when stored
    /// uncompressed, decompressed into owned memory otherwise.
    pub fn tensor(&self, shard: usize, name: &str) -> Result<Cow<'_, [u8]>> {
        let (s, t) = self.find(shard, name)?;
        let stored = &s.map[t.file_range.clone()];
        let Some(z) = &t.zstd else {
            return Ok(Cow::Borrowed(stored));
        };
        let raw_len = logical_len(t);
        let mut out = vec![0u8; raw_len];
        decompress_range(&s.path, name, stored, z, 0..raw_len, &mut out)?;
        Ok(Cow::Owned(out))
    }

    /// Copies elements `[start_elem, start_elem + out.len() / elem_size)` of flat array `name`
    /// into `out`, gathering the pieces from whichever old shards hold them (straight from the
    /// maps for uncompressed shards). Every shard holding part of the range must be open.
    pub fn read_flat(&self, name: &str, start_elem: u64, out: &mut [u8]) -> Result<()> {
        let mut pieces = flat_pieces(&self.manifest, name);
        let Some((_, first)) = pieces.first() else {
            return Err(CheckpointError::NotFound {
                what: format!("flat array `{name}`"),
                dir: self.dir.clone(),
            });
        };
        let (dtype, total) = (first.dtype, first.flat.map_or(0, |f| f.total));
        let esz = dtype.size_of();
        if !out.len().is_multiple_of(esz) {
            return Err(CheckpointError::bad_input(format!(
                "read of `{name}`: {} bytes is not a whole number of {} elements",
                out.len(),
                dtype.as_str()
            )));
        }
        let end = start_elem + (out.len() / esz) as u64;
        if end > total {
            return Err(CheckpointError::bad_input(format!(
                "read of `{name}`: elements [{start_elem}, {end}) exceed its {total} elements"
            )));
        }
        pieces.sort_by_key(|(_, r)| slice_of(r).0);
        self.check_pieces(name, &pieces, dtype, total)?;
        for (i, rec) in pieces {
            let (off, len) = slice_of(rec);
            let (lo, hi) = (start_elem.max(off), end.min(off + len));
            if lo >= hi {
                continue;
            }
            let src = ((lo - off) as usize * esz)..((hi - off) as usize * esz);
            let dst = &mut out[(lo - start_elem) as usize * esz..(hi - start_elem) as usize * esz];
            let (s, t) = self.find(i, name).map_err(|_| CheckpointError::NotFound {
                what: format!(
                    "shard {i}, which holds elements [{off}, {}) of `{name}`, is not open (see flat_shards_for)",
                    off + len
                ),
                dir: self.dir.clone(),
            })?;
            let stored = &s.map[t.file_range.clone()];
            match &t.zstd {
                None => dst.copy_from_slice(&stored[src]),
                Some(z) => decompress_range(&s.path, name, stored, z, src, dst)?,
            }
        }
        Ok(())
    }

    /// The shards' slices of a flat array must share dtype and total and tile `[0, total)`.
    fn check_pieces(
        &self,
        name: &str,
        pieces: &[(usize, &TensorRecord)],
        dtype: crate::Dtype,
        total: u64,
    ) -> Result<()> {
        let mut at = 0u64;
        for (i, rec) in pieces {
            let (off, len) = slice_of(rec);
            if rec.dtype != dtype || rec.flat.map(|f| f.total) != Some(total) || off != at {
                return Err(CheckpointError::bad_manifest(
                    self.dir.join(COMMITTED_FILE),
                    format!("flat array `{name}`: shard {i}'s slice [{off}, {}) of {} does not continue at element {at}", off + len, dtype.as_str()),
                ));
            }
            at = off + len;
        }
        if at != total {
            return Err(CheckpointError::bad_manifest(
                self.dir.join(COMMITTED_FILE),
                format!("flat array `{name}`: shards cover {at} of its {total} elements"),
            ));
        }
        Ok(())
    }
}

fn logical_len(t: &HeaderTensor) -> usize {
    t.record.shape.iter().product::<usize>() * t.record.dtype.size_of()
}

/// Decompresses the frames covering raw byte range `raw` of a compressed tensor into `out`.
fn decompress_range(
    path: &Path,
    name: &str,
    stored: &[u8],
    z: &ZstdMeta,
    raw: Range<usize>,
    out: &mut [u8],
) -> Result<()> {
    if raw.is_empty() {
        return Ok(());
    }
    let chunk = z.chunk_raw_bytes as usize;
    let mut starts = Vec::with_capacity(z.chunks.len());
    let mut at = 0usize;
    for &c in &z.chunks {
        starts.push(at..at + c as usize);
        at += c as usize;
    }
    let frames = raw.start / chunk..(raw.end - 1) / chunk + 1;
    let decoded: Vec<Vec<u8>> = frames
        .clone()
        .into_par_iter()
        .map(|k| zstd::bulk::decompress(&stored[starts[k].clone()], chunk))
        .collect::<std::io::Result<_>>()
        .map_err(|e| {
            CheckpointError::corrupt(
                path,
                format!("tensor `{name}`: zstd frame does not decode: {e}"),
            )
        })?;
    for (k, frame) in frames.zip(decoded) {
        let base = k * chunk;
        let lo = raw.start.max(base);
        let hi = raw.end.min(base + frame.len());
        if hi < lo || hi - base > frame.len() {
            return Err(CheckpointError::corrupt(
                path,
                format!("tensor `{name}`: zstd frame {k} is short"),
            ));
        }
        out[lo - raw.start..hi - raw.start].copy_from_slice(&frame[lo - base..hi - base]);
    }
    Ok(())
}

/// A checkpoint that restore did not use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Its directory.
    pub dir: PathBuf,
    /// Its step, when known.
    pub step: Option<u64>,
    /// Why it was not used.
    pub reason: String,
}

/// What [`restore_agreed`] found.
#[derive(Debug)]
pub struct RestoreOutcome {
    /// The agreed checkpoint, verified by every rank; `None` when no committed checkpoint is usable.
    pub checkpoint: Option<OpenCheckpoint>,
    /// Checkpoints passed over, newest first, with reasons (as seen by this rank).
    pub rejected: Vec<Rejected>,
    /// Step directories newer than the restored step that rank 0 moved aside (committed but
    /// rejected, to `quarantine/`) or removed (uncommitted), so the resumed run can reuse the names.
    pub discarded: Vec<PathBuf>,
}

/// The collective restart: rank 0 proposes its newest committed checkpoint, each rank verifies
/// the shards it will read (`shards_needed`), the ranks all-reduce(min) their verdicts, and on
/// any failure all fall back to the next older one together. Afterwards rank 0 clears step
/// directories newer than the agreed step (see [`RestoreOutcome::discarded`]) and all ranks meet
/// at a barrier. Every rank must call it.
pub fn restore_agreed(
    ckpt_root: &Path,
    comm: &dyn Communicator,
    shards_needed: &dyn Fn(&Manifest) -> Vec<usize>,
) -> Result<RestoreOutcome> {
    let entries = list_checkpoints(ckpt_root)?;
    let mut rejected = invalid_entries(&entries);
    let committed: Vec<(PathBuf, &Manifest)> = entries
        .iter()
        .rev()
        .filter_map(|e| Some((e.dir.clone(), e.manifest()?)))
        .collect();
    let mut next = 0usize;
    let mut chosen = None;
    for _ in 0..RESTORE_ROUNDS_MAX {
        let proposal = committed.get(next).map_or(NO_STEP, |(_, m)| m.step);
        let mut b = proposal.to_le_bytes();
        comm.broadcast_bytes(&mut b, 0)?;
        let step = u64::from_le_bytes(b);
        if step == NO_STEP {
            break;
        }
        let (local, verdict) = verify_local(&committed, step, comm.rank(), shards_needed);
        let all_ok = comm.all_reduce_min_u64(u64::from(verdict.is_ok()))? == 1;
        match verdict {
            Ok(open) if all_ok => {
                chosen = Some(open);
                break;
            }
            v => {
                let reason = v
                    .err()
                    .unwrap_or_else(|| "rejected by another rank's verification".to_string());
                let dir = local.map_or_else(|| ckpt_root.to_path_buf(), |k| committed[k].0.clone());
                rejected.push(Rejected {
                    dir,
                    step: Some(step),
                    reason,
                });
            }
        }
        next = local.map_or(next + 1, |k| k + 1).max(next + 1);
    }
    let restored = chosen.as_ref().map(|c| c.manifest.step);
    // Rank 0's cleanup error is returned only after the barrier, so no rank is left waiting.
    let discarded = if comm.rank() == 0 {
        discard_newer_than(ckpt_root, restored)
    } else {
        Ok(Vec::new())
    };
    comm.barrier()?;
    Ok(RestoreOutcome {
        checkpoint: chosen,
        rejected,
        discarded: discarded?,
    })
}

/// Invalid step directories, newest first, as rejections.
fn invalid_entries(entries: &[CheckpointEntry]) -> Vec<Rejected> {
    entries
        .iter()
        .rev()
        .filter_map(|e| match &e.status {
            EntryStatus::Invalid(r) => Some(Rejected {
                dir: e.dir.clone(),
                step: e.dir_step,
                reason: r.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// This rank's verification of the proposed `step`: its index in `committed` (if listed here)
/// and the opened checkpoint or the reason it is unusable.
fn verify_local(
    committed: &[(PathBuf, &Manifest)],
    step: u64,
    rank: usize,
    shards_needed: &dyn Fn(&Manifest) -> Vec<usize>,
) -> (Option<usize>, std::result::Result<OpenCheckpoint, String>) {
    let Some(k) = committed.iter().position(|(_, m)| m.step == step) else {
        let why = format!("rank {rank} has no committed checkpoint of step {step}");
        return (None, Err(why));
    };
    let (dir, m) = &committed[k];
    let verdict = open_verified(dir, m, &shards_needed(m)).map_err(|e| e.to_string());
    (Some(k), verdict)
}
