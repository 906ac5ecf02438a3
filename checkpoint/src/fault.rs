//! Crash points for fault tests: with `LAZARUS_CRASH_AT=<point>@<step>` in the environment, the
//! process kills itself with SIGKILL when it reaches `<point>` while handling `<step>`, so tests
//! can stop a real run at an exact place in the save and commit sequence. Without the variable
//! this is one cached lookup per call.

use std::sync::OnceLock;

/// Name of the environment variable that arms a crash point.
pub const CRASH_AT_ENV: &str = "LAZARUS_CRASH_AT";

/// The crash points, in the order a checkpoint passes them.
pub const CRASH_POINTS: &[&str] = &[
    "shard-copy",
    "shard-before-rename",
    "before-commit",
    "commit-before-rename",
    "retention",
];

fn armed() -> Option<&'static (String, u64)> {
    static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
    SPEC.get_or_init(|| {
        let v = std::env::var(CRASH_AT_ENV).ok()?;
        let (point, step) = v.split_once('@')?;
        Some((point.to_string(), step.parse().ok()?))
    })
    .as_ref()
}

/// Kills this process with SIGKILL if `point` at `step` is the armed crash point.
pub fn crash_point(point: &str, step: u64) {
    debug_assert!(CRASH_POINTS.contains(&point), "unknown crash point {point}");
    if let Some((p, s)) = armed() {
        if p == point && *s == step {
            eprintln!("{CRASH_AT_ENV}: killing this process at {point} of step {step}");
            // SAFETY: kill(2) with our own pid only sends a signal; SIGKILL cannot be caught,
            // which is the point: nothing after this line runs, as in a real crash.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}
