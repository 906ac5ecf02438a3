//! How NCCL's unique id reaches every rank: rank 0 writes it to a file in the run directory and
//! the others poll for it, or it is broadcast over another `Communicator`. Needs no GPU.
//!
//! File format (`<dir>/nccl-id-<key>`, all integers little-endian): magic `LZNCCLID`, format
//! version (u32), world size (u32), key length (u32), the key's bytes, the 128 id bytes, and an
//! FNV-1a 64 checksum (u64) of everything before it. Rank 0 writes it to a temporary name,
//! fsyncs it, renames it into place and fsyncs the directory, so a reader sees either no file or
//! the whole file. A file at the right path that fails any check is an error, not a reason to
//! keep waiting: with atomic publication it can only be damage or a launcher that reuses keys.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{CommError, Communicator, Result};

/// Bytes of NCCL's unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// File name prefix of id files; the rendezvous key follows it.
pub const ID_FILE_PREFIX: &str = "nccl-id-";

/// Environment variable a launcher sets to the rendezvous key of one attempt; see
/// [`rendezvous_key_from_env`].
pub const RENDEZVOUS_KEY_ENV: &str = "LAZARUS_RENDEZVOUS_KEY";

/// Longest accepted rendezvous key, in bytes.
pub const KEY_LEN_MAX: usize = 128;

const FILE_MAGIC: [u8; 8] = *b"LZNCCLID";
const FILE_VERSION: u32 = 1;
/// Magic, version, world size and key length.
const HEADER_BYTES: usize = 8 + 4 + 4 + 4;
const CHECKSUM_BYTES: usize = 8;
/// The largest valid file; reading stops one byte past it so that oversize files are caught.
const FILE_BYTES_MAX: usize = HEADER_BYTES + KEY_LEN_MAX + NCCL_ID_BYTES + CHECKSUM_BYTES;

/// First and longest pause between two looks for rank 0's file. The pause doubles, so a rank
/// that starts late is seen within 100 ms while a long wait costs a few syscalls a second.
const POLL_SLEEP_MS_MIN: u64 = 1;
const POLL_SLEEP_MS_MAX: u64 = 100;

const BACKEND: &str = "NCCL";

/// NCCL's unique id: 128 opaque bytes made by rank 0 (`ncclGetUniqueId`) that every rank passes
/// to `ncclCommInitRank`. It holds rank 0's bootstrap address, so `Debug` prints a fingerprint
/// instead of the bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub [u8; NCCL_ID_BYTES]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId(fnv1a64={:016x})", fnv1a64(&self.0))
    }
}

/// FNV-1a, 64 bits: enough to catch a damaged or truncated file, which is all it is for.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn setup_error(rank: usize, detail: String) -> CommError {
    CommError::Setup {
        backend: BACKEND,
        rank,
        detail,
    }
}

/// Checks that `key` can name an id file: 1 to [`KEY_LEN_MAX`] bytes of ASCII letters, digits,
/// `.`, `_` and `-`, not starting with `.`.
pub fn validate_key(key: &str) -> Result<()> {
    let ok_chars = key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if key.is_empty() || key.len() > KEY_LEN_MAX || !ok_chars || key.starts_with('.') {
        return Err(CommError::BadArgument {
            op: "nccl_rendezvous",
            detail: format!(
                "rendezvous key {key:?} is not usable: it must be 1 to {KEY_LEN_MAX} ASCII \
                 letters, digits, '.', '_' or '-', not starting with '.'"
            ),
        });
    }
    Ok(())
}

/// The id file of `key` in `dir`: `<dir>/nccl-id-<key>`.
pub fn id_file_path(dir: &Path, key: &str) -> Result<PathBuf> {
    validate_key(key)?;
    Ok(dir.join(format!("{ID_FILE_PREFIX}{key}")))
}

/// The rendezvous key of this launch attempt from the environment (`get` reads one variable,
/// e.g. `|k| std::env::var(k).ok()`): [`RENDEZVOUS_KEY_ENV`] when set (a local supervisor sets
/// a fresh nonce per attempt), else `slurm-<SLURM_JOB_ID>-<SLURM_STEP_ID>-<SLURM_RESTART_COUNT>`
/// (the restart count is 0 before the first requeue), which every task of one `srun` step
/// shares and which changes with every step and requeue. Characters a key cannot hold become
/// `_`, the same way on every rank. `None` when neither is available.
pub fn rendezvous_key_from_env(get: impl Fn(&str) -> Option<String>) -> Option<String> {
    let sanitize = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let non_empty = |name: &str| get(name).filter(|v| !v.trim().is_empty());
    let key = if let Some(key) = non_empty(RENDEZVOUS_KEY_ENV) {
        sanitize(key.trim())
    } else {
        let job = non_empty("SLURM_JOB_ID")?;
        let step = non_empty("SLURM_STEP_ID")?;
        let restart = non_empty("SLURM_RESTART_COUNT").unwrap_or_else(|| "0".to_string());
        sanitize(&format!(
            "slurm-{}-{}-{}",
            job.trim(),
            step.trim(),
            restart.trim()
        ))
    };
    let key = key.trim_start_matches('.').to_string();
    let key: String = key.chars().take(KEY_LEN_MAX).collect();
    (!key.is_empty()).then_some(key)
}

/// The bytes of an id file.
fn encode(key: &str, world_size: u32, id: &NcclId) -> Vec<u8> {
    let mut out = Vec::with_capacity(FILE_BYTES_MAX);
    out.extend_from_slice(&FILE_MAGIC);
    out.extend_from_slice(&FILE_VERSION.to_le_bytes());
    out.extend_from_slice(&world_size.to_le_bytes());
    // Keys are at most KEY_LEN_MAX bytes (validated), so the length fits a u32.
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&id.0);
    let checksum = fnv1a64(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Checks the bytes of an id file against the key and world size this rank expects; the error
/// says what is wrong.
fn decode(bytes: &[u8], key: &str, world_size: usize) -> std::result::Result<NcclId, String> {
    let min = HEADER_BYTES + NCCL_ID_BYTES + CHECKSUM_BYTES;
    if bytes.len() < min {
        return Err(format!(
            "it is truncated ({} bytes, an id file has at least {min})",
            bytes.len()
        ));
    }
    if bytes[..8] != FILE_MAGIC {
        return Err("it is not a Lazarus NCCL id file (wrong magic bytes)".to_string());
    }
    let version = le_u32(bytes, 8);
    if version != FILE_VERSION {
        return Err(format!(
            "it has format version {version}; this build reads version {FILE_VERSION} (ranks \
             from different Lazarus builds?)"
        ));
    }
    let file_world = le_u32(bytes, 12);
    let key_len = le_u32(bytes, 16) as usize;
    let want_len = HEADER_BYTES + key_len + NCCL_ID_BYTES + CHECKSUM_BYTES;
    if key_len > KEY_LEN_MAX || bytes.len() != want_len {
        return Err(format!(
            "it is truncated or has trailing bytes ({} bytes, its header says {want_len})",
            bytes.len()
        ));
    }
    let body = bytes.len() - CHECKSUM_BYTES;
    let mut stored = [0u8; 8];
    stored.copy_from_slice(&bytes[body..]);
    if u64::from_le_bytes(stored) != fnv1a64(&bytes[..body]) {
        return Err("its checksum does not match: the file is damaged".to_string());
    }
    let file_key = &bytes[HEADER_BYTES..HEADER_BYTES + key_len];
    if file_key != key.as_bytes() {
        return Err(format!(
            "it was written for rendezvous key {:?}, this rank expects {key:?}",
            String::from_utf8_lossy(file_key)
        ));
    }
    if file_world as usize != world_size {
        return Err(format!(
            "it was written for {file_world} ranks, this rank was started with a world size of \
             {world_size}; every rank must be started with the same world size"
        ));
    }
    let mut id = [0u8; NCCL_ID_BYTES];
    id.copy_from_slice(&bytes[HEADER_BYTES + key_len..body]);
    Ok(NcclId(id))
}

/// Reads the id file at `path`: `Ok(None)` while it does not exist, the id when it is valid for
/// `key` and `world_size`, an error naming the file when it exists but is unusable.
pub fn read_id_file(
    path: &Path,
    key: &str,
    rank: usize,
    world_size: usize,
) -> Result<Option<NcclId>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(setup_error(
                rank,
                format!("cannot open the NCCL id file {}: {e}", path.display()),
            ))
        }
    };
    let mut bytes = Vec::with_capacity(FILE_BYTES_MAX + 1);
    file.take(FILE_BYTES_MAX as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| {
            setup_error(
                rank,
                format!("cannot read the NCCL id file {}: {e}", path.display()),
            )
        })?;
    decode(&bytes, key, world_size).map(Some).map_err(|why| {
        setup_error(
            rank,
            format!(
                "the NCCL id file {} is unusable: {why}. Each launch attempt needs its own \
                 rendezvous key; remove the file and start the launch again",
                path.display()
            ),
        )
    })
}

/// Removes id files of other keys (and temporary files that writers left behind) from `dir`:
/// leftovers of earlier attempts. Best effort: returns how many it removed and ignores errors,
/// since a leftover under another key is never read anyway.
pub fn remove_stale_id_files(dir: &Path, key: &str) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let own = format!("{ID_FILE_PREFIX}{key}");
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale_file = name.starts_with(ID_FILE_PREFIX) && name != own;
        let stale_tmp = name.starts_with(&format!(".{ID_FILE_PREFIX}")) && name.contains(".tmp-");
        if (stale_file || stale_tmp) && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Tells temporary files of concurrent writers in one process apart.
static TMP_SERIAL: AtomicU64 = AtomicU64::new(0);

/// Rank 0's side: removes stale id files, then writes `id` for `key` and `world_size` atomically
/// (temporary file, fsync, rename, fsync of the directory). Returns the file's path.
pub fn publish_id_file(dir: &Path, key: &str, world_size: usize, id: &NcclId) -> Result<PathBuf> {
    let path = id_file_path(dir, key)?;
    let world = u32::try_from(world_size).map_err(|_| CommError::BadArgument {
        op: "nccl_rendezvous",
        detail: format!("world size {world_size} does not fit the id file"),
    })?;
    remove_stale_id_files(dir, key);
    let bytes = encode(key, world, id);
    let serial = TMP_SERIAL.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{ID_FILE_PREFIX}{key}.tmp-{}-{serial}",
        std::process::id()
    ));
    let written = write_durably(&tmp, &bytes).and_then(|()| {
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    });
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        setup_error(
            0,
            format!(
                "cannot write the NCCL id file {}: {e}; the run directory must be writable",
                path.display()
            ),
        )
    })?;
    Ok(path)
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The other ranks' side: polls for the id file of `key` in `dir`, with a doubling pause of
/// 1 to 100 ms, until it appears or `timeout_ms` have passed.
pub fn wait_for_id_file(
    dir: &Path,
    key: &str,
    rank: usize,
    world_size: usize,
    timeout_ms: u64,
) -> Result<NcclId> {
    let path = id_file_path(dir, key)?;
    let start = Instant::now();
    let mut pause_ms = POLL_SLEEP_MS_MIN;
    loop {
        if let Some(id) = read_id_file(&path, key, rank, world_size)? {
            return Ok(id);
        }
        let waited = start.elapsed();
        let left = Duration::from_millis(timeout_ms).saturating_sub(waited);
        if left.is_zero() {
            return Err(setup_error(
                rank,
                format!(
                    "rank {rank} waited {} ms for rank 0's NCCL id at {}; is rank 0 running? \
                     Check its log. Every rank must be given the same run directory and \
                     rendezvous key ({key}), and ranks on several nodes need the run directory \
                     on a filesystem they all see",
                    waited.as_millis(),
                    path.display()
                ),
            ));
        }
        std::thread::sleep(left.min(Duration::from_millis(pause_ms)));
        pause_ms = (pause_ms * 2).min(POLL_SLEEP_MS_MAX);
    }
}

fn check_rank(rank: usize, world_size: usize) -> Result<()> {
    if rank >= world_size {
        return Err(CommError::BadArgument {
            op: "nccl_rendezvous",
            detail: format!("rank {rank} out of range for world size {world_size}"),
        });
    }
    Ok(())
}

/// Exchanges the id through the run directory `dir`: rank 0 calls `make_id` and publishes the
/// result ([`publish_id_file`]); the other ranks wait for it at most `timeout_ms`
/// ([`wait_for_id_file`]) and never call `make_id`.
pub fn exchange_id_through_file(
    rank: usize,
    world_size: usize,
    dir: &Path,
    key: &str,
    timeout_ms: u64,
    make_id: impl FnOnce() -> Result<NcclId>,
) -> Result<NcclId> {
    check_rank(rank, world_size)?;
    validate_key(key)?;
    if rank == 0 {
        let id = make_id()?;
        publish_id_file(dir, key, world_size, &id)?;
        Ok(id)
    } else {
        wait_for_id_file(dir, key, rank, world_size, timeout_ms)
    }
}

/// Exchanges the id over `comm` (e.g. MPI): rank 0 calls `make_id` and broadcasts the bytes with
/// a status byte, so that when `make_id` fails rank 0 returns its own error and every other rank
/// an error saying so, instead of waiting for an id that never comes.
pub fn exchange_id_through(
    comm: &dyn Communicator,
    make_id: impl FnOnce() -> Result<NcclId>,
) -> Result<NcclId> {
    let mut buf = [0u8; 1 + NCCL_ID_BYTES];
    let mut own_error = None;
    if comm.rank() == 0 {
        match make_id() {
            Ok(id) => {
                buf[0] = 1;
                buf[1..].copy_from_slice(&id.0);
            }
            Err(e) => own_error = Some(e),
        }
    }
    comm.broadcast_bytes(&mut buf, 0)?;
    if let Some(e) = own_error {
        return Err(e);
    }
    if buf[0] != 1 {
        return Err(setup_error(
            comm.rank(),
            "rank 0 could not create the NCCL id (its error says why)".to_string(),
        ));
    }
    let mut id = [0u8; NCCL_ID_BYTES];
    id.copy_from_slice(&buf[1..]);
    Ok(NcclId(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThreadsComm;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// A deterministic id that differs with `seed`.
    fn id_of(seed: u64) -> NcclId {
        let mut id = [0u8; NCCL_ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8;
        }
        NcclId(id)
    }

    fn err_text(r: Result<impl std::fmt::Debug>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn ranks_get_rank_zeros_id_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A leftover of an earlier attempt: never read, and rank 0 removes it.
        let stale = publish_id_file(dir.path(), "attempt-1", 4, &id_of(1)).unwrap();
        let key = "attempt-2";
        let got: Vec<NcclId> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|rank| {
                    let dir = dir.path();
                    s.spawn(move || {
                        if rank == 0 {
                            // Rank 0 comes last, so the others really poll.
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        exchange_id_through_file(rank, 4, dir, key, 20_000, || Ok(id_of(2)))
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|id| *id == id_of(2)), "{got:?}");
        assert!(!stale.exists(), "rank 0 removes other keys' files");
        assert!(id_file_path(dir.path(), key).unwrap().exists());
    }

    #[test]
    fn a_rank_gives_up_when_rank_zero_never_writes() {
        let dir = tempfile::tempdir().unwrap();
        // Another key's file is there but is not this launch's.
        publish_id_file(dir.path(), "other", 2, &id_of(1)).unwrap();
        let e = err_text(wait_for_id_file(dir.path(), "mine", 1, 2, 50));
        let path = id_file_path(dir.path(), "mine").unwrap();
        assert!(e.contains("rank 1 waited"), "{e}");
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("is rank 0 running?"), "{e}");
    }

    /// Writes `bytes` as the id file of `key` (bypassing the checks), as damage would.
    fn plant(dir: &Path, key: &str, bytes: &[u8]) {
        fs::write(id_file_path(dir, key).unwrap(), bytes).unwrap();
    }

    #[test]
    fn damaged_files_are_errors_not_ids() {
        let dir = tempfile::tempdir().unwrap();
        let good = encode("k", 2, &id_of(3));
        let mut flipped = good.clone();
        flipped[HEADER_BYTES + 1 + 10] ^= 0x40;
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        let cases: [(&[u8], &str); 5] = [
            (&good[..20], "truncated"),
            (&good[..good.len() - 1], "truncated"),
            (&flipped, "checksum"),
            (&bad_magic, "magic"),
            (&[good.as_slice(), &[0u8; 300]].concat(), "trailing"),
        ];
        for (bytes, want) in cases {
            plant(dir.path(), "k", bytes);
            // A long deadline: the damage must be reported at once, not as a timeout.
            let e = err_text(wait_for_id_file(dir.path(), "k", 1, 2, 60_000));
            assert!(e.contains(want), "{want}: {e}");
            assert!(e.contains("is unusable"), "{e}");
        }
        plant(dir.path(), "k", &good);
        assert_eq!(
            wait_for_id_file(dir.path(), "k", 1, 2, 60_000).unwrap(),
            id_of(3)
        );
    }

    #[test]
    fn a_file_for_another_key_or_world_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // A file under our name that holds another key (copied or renamed by hand).
        plant(dir.path(), "mine", &encode("theirs", 2, &id_of(4)));
        let e = err_text(wait_for_id_file(dir.path(), "mine", 1, 2, 60_000));
        assert!(e.contains("\"theirs\""), "{e}");
        plant(dir.path(), "mine", &encode("mine", 8, &id_of(4)));
        let e = err_text(wait_for_id_file(dir.path(), "mine", 1, 2, 60_000));
        assert!(e.contains("written for 8 ranks"), "{e}");
        assert!(e.contains("world size of 2"), "{e}");
    }

    #[test]
    fn readers_never_see_a_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = id_file_path(dir.path(), "k").unwrap();
        let writes = 300u64;
        let done = Arc::new(AtomicBool::new(false));
        let (reads, seen) = std::thread::scope(|s| {
            let readers: Vec<_> = (0..3)
                .map(|_| {
                    let (path, done) = (&path, Arc::clone(&done));
                    s.spawn(move || {
                        let (mut reads, mut seen) = (0u64, 0u64);
                        // One more read after the writer is done, so every reader sees a file.
                        let mut finished = false;
                        while !finished {
                            finished = done.load(Ordering::Acquire);
                            reads += 1;
                            match read_id_file(path, "k", 1, 2) {
                                Ok(None) => {}
                                Ok(Some(id)) => {
                                    assert!((0..writes).any(|n| id == id_of(n)), "{id:?}");
                                    seen += 1;
                                }
                                Err(e) => panic!("a reader saw a partial file: {e}"),
                            }
                        }
                        (reads, seen)
                    })
                })
                .collect();
            for n in 0..writes {
                publish_id_file(dir.path(), "k", 2, &id_of(n)).unwrap();
            }
            done.store(true, Ordering::Release);
            readers
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold((0, 0), |(r, s), (r2, s2)| (r + r2, s + s2))
        });
        assert!(reads > 0 && seen > 0, "{reads} reads, {seen} ids");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names,
            vec!["nccl-id-k".to_string()],
            "no temporary file is left"
        );
    }

    #[test]
    fn keys_that_cannot_name_a_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let long = "k".repeat(KEY_LEN_MAX + 1);
        for key in ["", "a/b", "../x", ".hidden", "sp ace", long.as_str()] {
            let e = err_text(id_file_path(dir.path(), key));
            assert!(e.contains("rendezvous key"), "{key:?}: {e}");
            let e = err_text(exchange_id_through_file(1, 2, dir.path(), key, 10, || {
                Ok(id_of(0))
            }));
            assert!(e.contains("not usable"), "{key:?}: {e}");
        }
        assert!(validate_key(&"k".repeat(KEY_LEN_MAX)).is_ok());
        let e = err_text(exchange_id_through_file(2, 2, dir.path(), "k", 10, || {
            Ok(id_of(0))
        }));
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn the_key_comes_from_the_launcher_or_from_slurm() {
        fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| v.to_string())
            }
        }
        let slurm = [
            ("SLURM_JOB_ID", "4711"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_RESTART_COUNT", "2"),
        ];
        assert_eq!(
            rendezvous_key_from_env(env(&slurm)).as_deref(),
            Some("slurm-4711-0-2")
        );
        let first = [("SLURM_JOB_ID", "4711"), ("SLURM_STEP_ID", "3")];
        assert_eq!(
            rendezvous_key_from_env(env(&first)).as_deref(),
            Some("slurm-4711-3-0")
        );
        let both = [
            (RENDEZVOUS_KEY_ENV, "sup-12/attempt 3"),
            ("SLURM_JOB_ID", "4711"),
            ("SLURM_STEP_ID", "0"),
        ];
        assert_eq!(
            rendezvous_key_from_env(env(&both)).as_deref(),
            Some("sup-12_attempt_3")
        );
        assert_eq!(rendezvous_key_from_env(env(&[("SLURM_JOB_ID", "1")])), None);
        assert_eq!(rendezvous_key_from_env(env(&[])), None);
        let key = rendezvous_key_from_env(env(&both)).unwrap();
        assert!(validate_key(&key).is_ok());
    }

    #[test]
    fn the_id_is_broadcast_over_another_communicator() {
        let run = |fail: bool| -> Vec<Result<NcclId>> {
            std::thread::scope(|s| {
                let handles: Vec<_> = ThreadsComm::group(3, 20_000)
                    .into_iter()
                    .map(|c| {
                        s.spawn(move || {
                            exchange_id_through(&c, || {
                                assert_eq!(c.rank(), 0, "only rank 0 makes the id");
                                if fail {
                                    Err(setup_error(0, "no NCCL here".into()))
                                } else {
                                    Ok(id_of(9))
                                }
                            })
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        for got in run(false) {
            assert_eq!(got.unwrap(), id_of(9));
        }
        let got = run(true);
        let e = got[0].as_ref().unwrap_err().to_string();
        assert!(e.contains("no NCCL here"), "{e}");
        for other in &got[1..] {
            let e = other.as_ref().unwrap_err().to_string();
            assert!(e.contains("rank 0 could not create the NCCL id"), "{e}");
        }
    }

    #[test]
    fn encoding_round_trips_and_debug_hides_the_bytes() {
        let bytes = encode("key-1", 16, &id_of(5));
        assert_eq!(decode(&bytes, "key-1", 16).unwrap(), id_of(5));
        assert!(bytes.len() <= FILE_BYTES_MAX);
        let shown = format!("{:?}", id_of(5));
        assert!(shown.starts_with("NcclId(fnv1a64="), "{shown}");
    }
}
