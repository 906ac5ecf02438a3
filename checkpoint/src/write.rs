//! Synchronous shard writing: `.tmp`, `posix_fallocate`, parallel copy and checksum through a
//! writable map, header, msync, fsync, rename, fsync of the directory.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use rayon::prelude::*;

use crate::checksum::{chunk_digest, combine, CHUNK_BYTES};
use crate::error::{CheckpointError, Result};
use crate::format::{
    shard_file_name, Compression, ShardInfo, ShardMeta, TensorSpec, COMMITTED_FILE,
};
use crate::header::{build_header, parse_header, HeaderItem, ZstdMeta};

/// Retries of `posix_fallocate` interrupted by a signal (EINTR), not of real failures.
const FALLOCATE_EINTR_RETRIES_MAX: u32 = 8;

/// The bytes to store for one tensor.
enum Payload<'a> {
    /// Stored as given.
    Raw(&'a [u8]),
    /// Independently compressed frames, in order.
    Zstd {
        frames: Vec<Vec<u8>>,
        meta: ZstdMeta,
    },
}

impl Payload<'_> {
    fn stored_bytes(&self) -> u64 {
        match self {
            Payload::Raw(b) => b.len() as u64,
            Payload::Zstd { meta, .. } => meta.chunks.iter().sum(),
        }
    }
}

/// Removes the `.tmp` file on drop unless the write completed.
struct TmpGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes one shard synchronously into `dir` (created if absent) and returns its record.
///
/// The file appears under its final name only when complete and durable; on any failure the
/// `.tmp` file is removed and an error returned. Durability errors (msync, fsync) are never
/// retried. `dir` must not be committed already.
pub fn write_shard(
    dir: &Path,
    meta: &ShardMeta,
    tensors: &[(&TensorSpec, &[u8])],
    compression: Compression,
) -> Result<ShardInfo> {
    validate_inputs(meta, tensors)?;
    if dir.join(COMMITTED_FILE).exists() {
        return Err(CheckpointError::AlreadyCommitted {
            dir: dir.to_path_buf(),
        });
    }
    if !dir.is_dir() {
        fs::create_dir_all(dir).map_err(|e| CheckpointError::io("create directory", dir, e))?;
        // The new directory's entry must be durable too, or a crash could lose every shard in it.
        if let Some(parent) = dir.parent() {
            fsync_dir(parent)?;
        }
    }
    let payloads = prepare_payloads(tensors, compression)?;
    let items = |sums: &[u64]| -> Vec<HeaderItem> {
        tensors
            .iter()
            .zip(&payloads)
            .zip(sums)
            .map(|(((spec, _), p), &checksum)| HeaderItem {
                spec,
                stored_bytes: p.stored_bytes(),
                checksum,
                zstd: match p {
                    Payload::Raw(_) => None,
                    Payload::Zstd { meta, .. } => Some(meta.clone()),
                },
            })
            .collect()
    };
    let placeholder = build_header(meta, compression, &items(&vec![0; tensors.len()]));
    let header_len = placeholder.len();
    let size = header_len as u64 + payloads.iter().map(Payload::stored_bytes).sum::<u64>();
    let file_name = shard_file_name(meta.rank, meta.world_size);
    let final_path = dir.join(&file_name);
    let mut guard = TmpGuard {
        path: dir.join(format!("{file_name}.tmp")),
        armed: true,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&guard.path)
        .map_err(|e| CheckpointError::io("create", &guard.path, e))?;
    reserve(&file, size, &guard.path)?;
    let header = fill_map(
        &file,
        &guard.path,
        meta.step,
        header_len,
        &payloads,
        |sums| build_header(meta, compression, &items(sums)),
    )?;
    file.sync_all()
        .map_err(|source| CheckpointError::Durability {
            op: "fsync",
            path: guard.path.clone(),
            source,
        })?;
    drop(file);
    crate::fault::crash_point("shard-before-rename", meta.step);
    fs::rename(&guard.path, &final_path)
        .map_err(|e| CheckpointError::io("rename", &guard.path, e))?;
    guard.armed = false;
    if let Err(e) = fsync_dir(dir) {
        // A shard under its final name must be durable; one that may not be is taken away.
        let _ = fs::remove_file(&final_path);
        return Err(e);
    }
    let parsed = parse_header(&header, &final_path, size)?;
    Ok(parsed.info(&file_name))
}

fn validate_inputs(meta: &ShardMeta, tensors: &[(&TensorSpec, &[u8])]) -> Result<()> {
    if meta.rank >= meta.world_size {
        return Err(CheckpointError::bad_input(format!(
            "rank {} is not below world size {}",
            meta.rank, meta.world_size
        )));
    }
    let mut names = HashSet::new();
    for (spec, bytes) in tensors {
        spec.validate()?;
        if !names.insert(spec.name.as_str()) {
            return Err(CheckpointError::bad_input(format!(
                "tensor `{}` is listed twice",
                spec.name
            )));
        }
        if spec.byte_len() != Some(bytes.len()) {
            return Err(CheckpointError::bad_input(format!(
                "tensor `{}`: {} bytes given, shape {:?} of {} needs {:?}",
                spec.name,
                bytes.len(),
                spec.shape,
                spec.dtype.as_str(),
                spec.byte_len()
            )));
        }
    }
    Ok(())
}

fn prepare_payloads<'a>(
    tensors: &[(&TensorSpec, &'a [u8])],
    compression: Compression,
) -> Result<Vec<Payload<'a>>> {
    let Compression::Zstd { level } = compression else {
        return Ok(tensors.iter().map(|(_, b)| Payload::Raw(b)).collect());
    };
    tensors
        .iter()
        .map(|(spec, bytes)| {
            let frames = bytes
                .par_chunks(CHUNK_BYTES)
                .map(|c| zstd::bulk::compress(c, level))
                .collect::<std::io::Result<Vec<Vec<u8>>>>()
                .map_err(|e| {
                    CheckpointError::bad_input(format!(
                        "zstd level {level} on `{}`: {e}",
                        spec.name
                    ))
                })?;
            let meta = ZstdMeta {
                chunk_raw_bytes: CHUNK_BYTES as u64,
                chunks: frames.iter().map(|f| f.len() as u64).collect(),
            };
            Ok(Payload::Zstd { frames, meta })
        })
        .collect()
}

/// Reserves `size` bytes for `file`, so that writes through the map can never hit a full disk
/// (which would be a SIGBUS) and a full disk is reported here instead.
fn reserve(file: &File, size: u64, path: &Path) -> Result<()> {
    let len = libc::off_t::try_from(size)
        .map_err(|_| CheckpointError::bad_input(format!("shard of {size} bytes is too large")))?;
    for _ in 0..=FALLOCATE_EINTR_RETRIES_MAX {
        // SAFETY: the descriptor belongs to `file`, which is open and outlives the call;
        // posix_fallocate touches no memory of ours.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        let source = std::io::Error::from_raw_os_error(rc);
        match rc {
            0 => return Ok(()),
            libc::EINTR => continue,
            libc::ENOSPC | libc::EFBIG | libc::EDQUOT => {
                return Err(CheckpointError::NoSpace {
                    path: path.to_path_buf(),
                    bytes: size,
                    source,
                })
            }
            _ => return Err(CheckpointError::io("posix_fallocate", path, source)),
        }
    }
    Err(CheckpointError::io(
        "posix_fallocate (interrupted repeatedly)",
        path,
        std::io::Error::from_raw_os_error(libc::EINTR),
    ))
}

/// Maps the reserved file, copies and checksums the payloads after a header of `header_len`
/// bytes, writes the header `make_header` builds from the checksums, and msyncs. Returns the header.
fn fill_map(
    file: &File,
    path: &Path,
    step: u64,
    header_len: usize,
    payloads: &[Payload],
    make_header: impl FnOnce(&[u64]) -> Vec<u8>,
) -> Result<Vec<u8>> {
    // SAFETY: `file` is our own freshly created `.tmp`, already extended to its full size by
    // posix_fallocate (so every page has disk blocks and stores cannot SIGBUS for lack of
    // space). Nothing else writes or truncates `.tmp` files of this run: the run lock keeps a
    // second run out, and each rank writes only its own shard name.
    let mut map =
        unsafe { MmapMut::map_mut(file) }.map_err(|e| CheckpointError::io("mmap", path, e))?;
    let (head, data) = map.split_at_mut(header_len);
    let sums = copy_and_hash(data, payloads);
    crate::fault::crash_point("shard-copy", step);
    let header = make_header(&sums);
    assert_eq!(
        header.len(),
        header_len,
        "header length must not depend on checksum values"
    );
    head.copy_from_slice(&header);
    map.flush().map_err(|source| CheckpointError::Durability {
        op: "msync",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(header)
}

/// Copies every payload into `data` (laid out back to back) in parallel, 4 MiB at a time, and
/// returns each tensor's checksum over its stored bytes.
fn copy_and_hash(data: &mut [u8], payloads: &[Payload]) -> Vec<u64> {
    // Cut `data` into one region per tensor, then into copy jobs.
    let mut jobs: Vec<(usize, usize, &mut [u8], &[u8])> = Vec::new();
    let mut rest = &mut *data;
    for (t, p) in payloads.iter().enumerate() {
        let (region, tail) = rest.split_at_mut(p.stored_bytes() as usize);
        rest = tail;
        match p {
            Payload::Raw(src) => {
                for (c, (d, s)) in region
                    .chunks_mut(CHUNK_BYTES)
                    .zip(src.chunks(CHUNK_BYTES))
                    .enumerate()
                {
                    jobs.push((t, c, d, s));
                }
            }
            Payload::Zstd { frames, .. } => {
                let mut r = region;
                for f in frames {
                    let (d, tail) = r.split_at_mut(f.len());
                    r = tail;
                    jobs.push((t, usize::MAX, d, f));
                }
            }
        }
    }
    // Raw chunks are hashed right after the copy, while hot; compressed frames do not align with
    // checksum chunks, so they are hashed in a second pass over the stored bytes.
    let digests: Vec<(usize, usize, u64)> = jobs
        .into_par_iter()
        .filter_map(|(t, c, d, s)| {
            d.copy_from_slice(s);
            (c != usize::MAX).then(|| (t, c, chunk_digest(s)))
        })
        .collect();
    let mut per_tensor: Vec<Vec<u64>> = payloads
        .iter()
        .map(|p| vec![0; (p.stored_bytes() as usize).div_ceil(CHUNK_BYTES)])
        .collect();
    for (t, c, d) in digests {
        per_tensor[t][c] = d;
    }
    let mut at = 0usize;
    for (t, p) in payloads.iter().enumerate() {
        let len = p.stored_bytes() as usize;
        if let Payload::Zstd { .. } = p {
            per_tensor[t] = data[at..at + len]
                .par_chunks(CHUNK_BYTES)
                .map(chunk_digest)
                .collect();
        }
        at += len;
    }
    per_tensor.iter().map(|d| combine(d)).collect()
}

/// fsyncs a directory, so that a rename inside it is durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| CheckpointError::io("open directory", dir, e))?;
    f.sync_all().map_err(|source| CheckpointError::Durability {
        op: "fsync directory",
        path: dir.to_path_buf(),
        source,
    })
}
