//! The deadline of NCCL operations, kept apart from NCCL: polls an operation until it completes,
//! fails or passes its deadline, aborts the communicator once (on the first failure or expiry),
//! and makes every later call fail at once. Generic over [`Watched`], so its logic is tested
//! with a fake, without a GPU.

use std::time::{Duration, Instant};

use crate::{CommError, Result};

/// Polls that only yield the CPU before the first sleep: small collectives finish within tens of
/// microseconds, and even the shortest sleep would add about 50 µs of timer slack to each.
const POLL_YIELDS_MAX: u32 = 64;
/// First and longest sleep between two polls after that. The cap bounds the latency the polling
/// adds to a long collective (a quarter of a millisecond) at a few thousand wake-ups a second.
const POLL_SLEEP_US_MIN: u64 = 10;
const POLL_SLEEP_US_MAX: u64 = 250;

/// What one look at an operation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    Pending,
    Done,
    /// The operation or the communicator failed; the text says how.
    Failed(String),
}

/// An operation in flight on a communicator that can be aborted.
pub(crate) trait Watched {
    /// Looks at the operation once, without blocking.
    fn poll(&mut self) -> Progress;
    /// Aborts the communicator, which ends the operation. The watchdog calls it at most once.
    fn abort(&mut self) -> std::result::Result<(), String>;
}

/// Why a communicator can no longer be used.
#[derive(Debug)]
struct Broken {
    op: &'static str,
    why: String,
}

/// Deadline and failure bookkeeping of one communicator.
#[derive(Debug)]
pub(crate) struct Watchdog {
    backend: &'static str,
    rank: usize,
    broken: Option<Broken>,
}

impl Watchdog {
    /// A watchdog for rank `rank` of a `backend` communicator.
    pub(crate) fn new(backend: &'static str, rank: usize) -> Self {
        Watchdog {
            backend,
            rank,
            broken: None,
        }
    }

    /// Fails fast, naming the first failure, once the communicator has been aborted.
    pub(crate) fn check(&self, op: &'static str) -> Result<()> {
        match &self.broken {
            None => Ok(()),
            Some(broken) => Err(CommError::Backend {
                backend: self.backend,
                op,
                detail: format!(
                    "the communicator was aborted after `{}` {}; it cannot be used again: \
                     restart the run from the last committed checkpoint",
                    broken.op, broken.why
                ),
            }),
        }
    }

    /// Polls `target` until it completes (`Ok`), fails (abort, `Backend` error) or `deadline`
    /// passes (abort, `Timeout` error naming `timeout_ms`, the call's timeout that set the
    /// deadline). The deadline is checked after each poll, so an operation that is already
    /// complete succeeds even when its deadline has passed.
    pub(crate) fn wait(
        &mut self,
        op: &'static str,
        deadline: Instant,
        timeout_ms: u64,
        target: &mut impl Watched,
    ) -> Result<()> {
        self.check(op)?;
        let mut backoff = Backoff::default();
        loop {
            match target.poll() {
                Progress::Done => return Ok(()),
                Progress::Failed(detail) => return Err(self.fail(op, detail, target)),
                Progress::Pending => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = format!("timed out after {timeout_ms} ms");
                self.break_with(op, why, target);
                return Err(CommError::Timeout {
                    op,
                    rank: self.rank,
                    timeout_ms,
                    missing: Vec::new(),
                });
            }
            backoff.pause(left);
        }
    }

    /// Records that `op` failed with `detail`, aborts the communicator unless that already
    /// happened, and returns the error for the caller.
    pub(crate) fn fail(
        &mut self,
        op: &'static str,
        detail: String,
        target: &mut impl Watched,
    ) -> CommError {
        self.break_with(op, format!("failed ({detail})"), target);
        CommError::Backend {
            backend: self.backend,
            op,
            detail: format!("{detail}; the communicator has been aborted"),
        }
    }

    fn break_with(&mut self, op: &'static str, why: String, target: &mut impl Watched) {
        if self.broken.is_some() {
            return;
        }
        let why = match target.abort() {
            Ok(()) => why,
            Err(e) => format!("{why}, and aborting it failed too ({e})"),
        };
        self.broken = Some(Broken { op, why });
    }
}

/// The pauses between polls: a few yields, then sleeps doubling from 10 to 250 µs, never past
/// the deadline.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    polls: u32,
    sleep_us: u64,
}

impl Backoff {
    /// The pause before the next poll when `left` remains: `None` to only yield the CPU.
    pub(crate) fn next(&mut self, left: Duration) -> Option<Duration> {
        if self.polls < POLL_YIELDS_MAX {
            self.polls += 1;
            return None;
        }
        self.sleep_us = if self.sleep_us == 0 {
            POLL_SLEEP_US_MIN
        } else {
            (self.sleep_us * 2).min(POLL_SLEEP_US_MAX)
        };
        Some(Duration::from_micros(self.sleep_us).min(left))
    }

    /// Yields or sleeps as [`Backoff::next`] says.
    pub(crate) fn pause(&mut self, left: Duration) {
        match self.next(left) {
            None => std::thread::yield_now(),
            Some(pause) => std::thread::sleep(pause),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An operation that completes after `done_after` polls (never when `None`), or fails at
    /// poll `fail_at`; it counts polls and aborts.
    #[derive(Default)]
    struct Fake {
        done_after: Option<u32>,
        fail_at: Option<u32>,
        abort_error: Option<String>,
        polls: u32,
        aborts: u32,
    }

    impl Watched for Fake {
        fn poll(&mut self) -> Progress {
            self.polls += 1;
            if self.fail_at == Some(self.polls) {
                return Progress::Failed("remote peer closed the connection".into());
            }
            match self.done_after {
                Some(n) if self.polls > n => Progress::Done,
                _ => Progress::Pending,
            }
        }

        fn abort(&mut self) -> std::result::Result<(), String> {
            self.aborts += 1;
            self.abort_error.clone().map_or(Ok(()), Err)
        }
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[test]
    fn an_operation_that_completes_is_not_aborted() {
        let mut dog = Watchdog::new("NCCL", 3);
        let mut op = Fake {
            done_after: Some(200),
            ..Fake::default()
        };
        dog.wait("all_reduce_sum_f32", soon(60_000), 60_000, &mut op)
            .unwrap();
        assert_eq!((op.polls, op.aborts), (201, 0));
        dog.check("barrier").unwrap();
        // The same communicator goes on serving calls.
        let mut next = Fake {
            done_after: Some(0),
            ..Fake::default()
        };
        dog.wait("barrier", soon(60_000), 60_000, &mut next)
            .unwrap();
    }

    #[test]
    fn a_hung_operation_times_out_aborts_once_and_later_calls_fail_fast() {
        let mut dog = Watchdog::new("NCCL", 2);
        let mut hung = Fake::default();
        let err = dog
            .wait("reduce_scatter_sum_f32", soon(30), 30, &mut hung)
            .unwrap_err();
        match &err {
            CommError::Timeout {
                op,
                rank,
                timeout_ms,
                missing,
            } => {
                assert_eq!((*op, *rank, *timeout_ms), ("reduce_scatter_sum_f32", 2, 30));
                assert!(missing.is_empty());
            }
            other => panic!("expected a timeout, got {other}"),
        }
        assert!(err.to_string().contains("cannot tell which"), "{err}");
        assert_eq!(hung.aborts, 1);
        assert!(hung.polls >= 1);
        // Every later call fails at once, without polling or aborting again.
        let polls = hung.polls;
        let mut later = Fake {
            done_after: Some(0),
            ..Fake::default()
        };
        let e = dog
            .wait("barrier", soon(60_000), 60_000, &mut later)
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, CommError::Backend { op: "barrier", .. }), "{e}");
        assert!(
            text.contains("aborted after `reduce_scatter_sum_f32` timed out"),
            "{text}"
        );
        assert_eq!((later.polls, later.aborts, hung.polls), (0, 0, polls));
        let e = dog.fail("all_gather_f32", "enqueue failed".into(), &mut later);
        assert!(e.to_string().contains("enqueue failed"), "{e}");
        assert_eq!(
            later.aborts, 0,
            "a broken communicator is not aborted twice"
        );
    }

    #[test]
    fn a_failure_aborts_once_and_is_reported() {
        let mut dog = Watchdog::new("NCCL", 0);
        let mut op = Fake {
            fail_at: Some(5),
            ..Fake::default()
        };
        let e = dog
            .wait("all_gather_f32", soon(60_000), 60_000, &mut op)
            .unwrap_err();
        assert!(e.to_string().contains("remote peer closed"), "{e}");
        assert_eq!((op.polls, op.aborts), (5, 1));
        let e = dog.check("barrier").unwrap_err().to_string();
        assert!(
            e.contains("`all_gather_f32` failed (remote peer closed"),
            "{e}"
        );
    }

    #[test]
    fn a_failed_abort_is_named_in_later_errors() {
        let mut dog = Watchdog::new("NCCL", 0);
        let mut hung = Fake {
            abort_error: Some("ncclInternalError".into()),
            ..Fake::default()
        };
        dog.wait("barrier", soon(10), 10, &mut hung).unwrap_err();
        let e = dog.check("barrier").unwrap_err().to_string();
        assert!(
            e.contains("aborting it failed too (ncclInternalError)"),
            "{e}"
        );
    }

    #[test]
    fn a_completed_operation_wins_over_a_passed_deadline() {
        let mut dog = Watchdog::new("NCCL", 0);
        let mut op = Fake {
            done_after: Some(0),
            ..Fake::default()
        };
        let past = Instant::now();
        dog.wait("all_reduce_min_u64", past, 0, &mut op).unwrap();
        assert_eq!(op.aborts, 0);
    }

    #[test]
    fn pauses_yield_first_then_sleep_within_bounds_and_the_deadline() {
        let mut backoff = Backoff::default();
        let left = Duration::from_secs(1);
        for _ in 0..POLL_YIELDS_MAX {
            assert_eq!(backoff.next(left), None);
        }
        let sleeps: Vec<Duration> = (0..12).map(|_| backoff.next(left).unwrap()).collect();
        assert_eq!(sleeps[0], Duration::from_micros(POLL_SLEEP_US_MIN));
        assert!(sleeps.windows(2).all(|w| w[0] <= w[1]), "{sleeps:?}");
        assert_eq!(
            *sleeps.last().unwrap(),
            Duration::from_micros(POLL_SLEEP_US_MAX)
        );
        let nearly = Duration::from_micros(3);
        assert_eq!(backoff.next(nearly), Some(nearly));
    }
}
