//! The stop signals of `lazarus train`. SIGTERM, SIGUSR1 and SIGINT set one flag that the ranks
//! vote on at the next step boundary. A second signal exits at once (128 + signal), except a
//! SIGTERM or SIGUSR1 that repeats the first within `DUPLICATE_WINDOW_NS`: a scheduler often
//! delivers one preemption twice (`scancel --full` or `scontrol requeue` signal the ranks
//! directly and through srun, and the batch script's trap forwards a third copy), and that
//! must not turn a clean stop into an exit without a checkpoint. SIGINT is never deduplicated:
//! a second Ctrl-C at a terminal means "now".

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};
use std::sync::Arc;

/// How close a repeated SIGTERM or SIGUSR1 must follow the first to count as the same one.
pub const DUPLICATE_WINDOW_NS: i64 = 2_000_000_000;

/// The first stop signal seen and when (CLOCK_MONOTONIC, ns); 0 while none was seen.
struct First {
    sig: AtomicI32,
    at_ns: AtomicI64,
}

/// What a signal arriving now means, given the first one (if any).
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The first stop request: set the flag.
    Stop,
    /// The same preemption delivered again: nothing to do.
    Duplicate,
    /// A real second request: exit now.
    ExitNow,
}

fn verdict(first: Option<(i32, i64)>, sig: i32, now_ns: i64) -> Verdict {
    match first {
        None => Verdict::Stop,
        Some((s, at))
            if s == sig && sig != SIGINT && now_ns.saturating_sub(at) < DUPLICATE_WINDOW_NS =>
        {
            Verdict::Duplicate
        }
        Some(_) => Verdict::ExitNow,
    }
}

fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass and is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec.saturating_mul(1_000_000_000) + ts.tv_nsec
}

/// Installs the handlers; the returned flag becomes true at the first stop signal.
pub fn install() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let first = Arc::new(First {
        sig: AtomicI32::new(0),
        at_ns: AtomicI64::new(0),
    });
    for sig in [SIGTERM, SIGUSR1, SIGINT] {
        let (flag, first) = (Arc::clone(&flag), Arc::clone(&first));
        let handler = move || {
            let now = monotonic_ns();
            let seen = first.sig.load(Ordering::SeqCst);
            let prev = (seen != 0).then(|| (seen, first.at_ns.load(Ordering::SeqCst)));
            match verdict(prev, sig, now) {
                Verdict::Stop => {
                    first.at_ns.store(now, Ordering::SeqCst);
                    first.sig.store(sig, Ordering::SeqCst);
                    flag.store(true, Ordering::SeqCst);
                }
                Verdict::Duplicate => {}
                Verdict::ExitNow => signal_hook::low_level::exit(128 + sig),
            }
        };
        // SAFETY: the handler only uses atomics, clock_gettime and _exit, all async-signal-safe.
        unsafe { signal_hook::low_level::register(sig, handler) }
            .with_context(|| format!("installing the handler of signal {sig}"))?;
    }
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_of_a_scheduler_signal_inside_the_window_are_one_stop() {
        assert_eq!(verdict(None, SIGTERM, 5), Verdict::Stop);
        let first = Some((SIGTERM, 1_000));
        assert_eq!(verdict(first, SIGTERM, 1_000 + 10), Verdict::Duplicate);
        assert_eq!(
            verdict(first, SIGTERM, 1_000 + DUPLICATE_WINDOW_NS),
            Verdict::ExitNow
        );
        assert_eq!(verdict(first, SIGUSR1, 1_001), Verdict::ExitNow);
        assert_eq!(verdict(Some((SIGUSR1, 0)), SIGUSR1, 5), Verdict::Duplicate);
    }

    #[test]
    fn a_second_ctrl_c_always_exits() {
        assert_eq!(verdict(None, SIGINT, 0), Verdict::Stop);
        assert_eq!(verdict(Some((SIGINT, 0)), SIGINT, 1), Verdict::ExitNow);
    }
}
