//! What the host offers and what this process uses: resident memory and its peak, the memory
//! available to a new allocation (MemAvailable, bounded by the cgroup's limit), and free disk
//! space. Read from Linux's `/proc` and `/sys`; elsewhere the answers are `None`.

use std::path::Path;

/// Resident memory of this process now and at its peak (VmRSS, VmHWM), in bytes.
pub fn process_rss() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    Some((kib_field(&text, "VmRSS:")?, kib_field(&text, "VmHWM:")?))
}

/// MemAvailable of `/proc/meminfo`, in bytes: what can be allocated without swapping.
pub fn mem_available_bytes() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable:",
    )
}

/// The value of a `Name:   123 kB` line, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Room left under this process's cgroup memory limits (limit minus usage, the smallest over
/// the cgroup and its ancestors), or `None` when no limit applies.
pub fn cgroup_memory_room() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // cgroup v2: one line `0::/path`.
    if let Some(path) = cgroups.lines().find_map(|l| l.strip_prefix("0::")) {
        let mut dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        let mut room: Option<u64> = None;
        loop {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
            if let (Some(max), Some(cur)) = (read("memory.max"), read("memory.current")) {
                if let (Ok(max), Ok(cur)) = (max.trim().parse::<u64>(), cur.trim().parse::<u64>()) {
                    let r = max.saturating_sub(cur);
                    room = Some(room.map_or(r, |x| x.min(r)));
                }
            }
            if dir == Path::new("/sys/fs/cgroup") || !dir.pop() {
                break;
            }
        }
        return room;
    }
    // cgroup v1: the memory controller's own files; an unlimited group reports a huge limit.
    let v1 = Path::new("/sys/fs/cgroup/memory");
    let read = |f: &str| {
        std::fs::read_to_string(v1.join(f))
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    };
    let (limit, usage) = (
        read("memory.limit_in_bytes")?,
        read("memory.usage_in_bytes")?,
    );
    (limit < 1 << 60).then(|| limit.saturating_sub(usage))
}

/// Memory a run may use on this host: MemAvailable, bounded by the cgroup's room, with where
/// the number comes from.
pub fn memory_available() -> Option<(u64, &'static str)> {
    match (mem_available_bytes(), cgroup_memory_room()) {
        (Some(a), Some(c)) if c < a => Some((c, "cgroup memory limit minus usage")),
        (Some(a), _) => Some((a, "MemAvailable")),
        (None, Some(c)) => Some((c, "cgroup memory limit minus usage")),
        (None, None) => None,
    }
}

/// Bytes an unprivileged writer may still put on the filesystem holding `path`.
pub fn free_disk_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory of the size
    // statvfs(3) fills; it is read only after the call reported success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 or u64).
    #[allow(clippy::useless_conversion)]
    let (avail, frsize) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Some(avail * frsize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_parse_and_the_process_has_memory() {
        let text = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(kib_field(text, "VmRSS:"), Some(1 << 20));
        assert_eq!(kib_field(text, "VmSwap:"), None);
        let (rss, peak) = process_rss().expect("Linux /proc");
        assert!(rss > 0 && peak >= rss);
        assert!(memory_available().is_some_and(|(b, _)| b > 0));
        assert!(free_disk_bytes(Path::new("/")).is_some());
        assert!(free_disk_bytes(Path::new("/nonexistent/x")).is_none());
    }
}
