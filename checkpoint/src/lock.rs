//! The run-directory lock: one live run per directory, with stale locks of dead processes on
//! this host detected and replaced.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{CheckpointError, Result};
use crate::manifest::unix_ms_now;

/// Name of the lock file inside the run directory.
pub const LOCK_FILE: &str = "lazarus.lock";

/// Attempts to create the lock file (a stale lock removed in between costs one attempt).
const LOCK_ATTEMPTS_MAX: usize = 3;

/// Contents of the lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When the holder took the lock, ms since the Unix epoch.
    pub started_unix_ms: u64,
}

/// A held run-directory lock; released (the file removed) on drop.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    holder: LockHolder,
}

impl RunLock {
    /// Takes the lock of `run_dir` (created if absent). Fails, naming host, pid and start time,
    /// when a live process holds it or it is held from another host. A lock whose process no
    /// longer exists on this host is stale: it is replaced and the returned note says so.
    pub fn acquire(run_dir: &Path) -> Result<(RunLock, Option<String>)> {
        fs::create_dir_all(run_dir)
            .map_err(|e| CheckpointError::io("create directory", run_dir, e))?;
        let path = run_dir.join(LOCK_FILE);
        let me = LockHolder {
            host: hostname(),
            pid: std::process::id(),
            started_unix_ms: unix_ms_now(),
        };
        let mut note = None;
        for _ in 0..LOCK_ATTEMPTS_MAX {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let json = serde_json::to_vec(&me).expect("a lock holder serializes");
                    f.write_all(&json)
                        .and_then(|()| f.sync_all())
                        .map_err(|e| CheckpointError::io("write lock", &path, e))?;
                    return Ok((RunLock { path, holder: me }, note));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(CheckpointError::io("create lock", &path, e)),
            }
            let Some(other) = read_holder(&path)? else {
                continue;
            };
            if other.host != me.host || pid_alive(other.pid) {
                return Err(CheckpointError::Locked {
                    path,
                    host: other.host,
                    pid: other.pid,
                    started_unix_ms: other.started_unix_ms,
                });
            }
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CheckpointError::io("remove stale lock", &path, e)),
            }
            note = Some(format!(
                "replaced stale lock `{}` of pid {} on host `{}` (started at unix ms {}): that process no longer exists",
                path.display(),
                other.pid,
                other.host,
                other.started_unix_ms
            ));
        }
        Err(CheckpointError::io(
            "acquire lock (contended)",
            &path,
            std::io::Error::from(std::io::ErrorKind::WouldBlock),
        ))
    }

    /// Who holds this lock (this process).
    pub fn holder(&self) -> &LockHolder {
        &self.holder
    }
}

impl Drop for RunLock {
    /// Removes the lock file if it is still ours.
    fn drop(&mut self) {
        if let Ok(Some(h)) = read_holder(&self.path) {
            if h == self.holder {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// The holder recorded in `path`; `None` if the file vanished meanwhile.
/// Who holds the lock of `run_dir`, if anyone, and whether that process is alive (`None` when
/// it runs on another host, where this cannot be checked). For `lazarus status`.
pub fn lock_holder(run_dir: &Path) -> Result<Option<(LockHolder, Option<bool>)>> {
    let Some(h) = read_holder(&run_dir.join(LOCK_FILE))? else {
        return Ok(None);
    };
    let alive = (h.host == hostname()).then(|| pid_alive(h.pid));
    Ok(Some((h, alive)))
}

fn read_holder(path: &Path) -> Result<Option<LockHolder>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CheckpointError::io("read lock", path, e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        CheckpointError::bad_input(format!(
            "lock file `{}` is unreadable ({e}); if no run is using this directory, delete it",
            path.display()
        ))
    })
}

/// Whether process `pid` exists on this host (a process we may not signal still exists). A
/// zombie is dead: in a container whose init does not reap orphans, a rank killed after its
/// launcher exited stays a zombie for good, and must not hold the run directory forever.
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    exists && !is_zombie(pid)
}

/// Whether `pid` is a zombie, from the state field of /proc/PID/stat (false where unreadable).
fn is_zombie(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let (_, rest) = s.rsplit_once(')')?;
            rest.split_whitespace().next().map(|st| st == "Z")
        })
        .unwrap_or(false)
}

/// This machine's host name ("unknown-host" if it cannot be read).
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `buf.len()` bytes and gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_pid_is_alive_and_hostname_is_nonempty() {
        assert!(pid_alive(std::process::id()));
        assert!(!hostname().is_empty());
    }

    #[test]
    fn a_zombie_does_not_count_as_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: once it has exited it is a zombie.
        let t0 = std::time::Instant::now();
        while !is_zombie(pid as libc::pid_t) {
            assert!(t0.elapsed().as_secs() < 10, "`true` did not exit");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!pid_alive(pid));
        child.wait().unwrap();
        assert!(!pid_alive(pid));
    }
}
