//! `lazarus ranks`: starts the rank processes of one machine for a transport that has no
//! launcher of its own (NCCL), as `mpirun` does for MPI. Each process gets its rank, the world
//! size, its local rank (= its GPU) and a rendezvous key in the environment. The group ends as
//! one: when a rank fails the others get SIGTERM, then SIGKILL after a grace, and the exit code
//! is the failed rank's; signals sent to the group go to every rank.

use crate::supervise::send;
use anyhow::{bail, Context, Result};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The variables each rank process is started with.
pub mod env {
    /// The global rank.
    pub const RANK: &str = "LAZARUS_RANK";
    /// The number of ranks.
    pub const WORLD_SIZE: &str = "LAZARUS_WORLD_SIZE";
    /// The rank on this machine: the GPU it uses.
    pub const LOCAL_RANK: &str = "LAZARUS_LOCAL_RANK";
    /// Names this start of the group; the NCCL id file of an earlier start is not read.
    pub const RENDEZVOUS_KEY: &str = "LAZARUS_RENDEZVOUS_KEY";
}

/// Most rank processes one machine starts.
pub const NPROC_MAX: usize = 1024;

/// Flags of `lazarus ranks`.
#[derive(Debug, clap::Args)]
pub struct RanksArgs {
    /// Rank processes to start.
    #[arg(long)]
    pub nproc: usize,
    /// Wait between SIGTERM and SIGKILL for the ranks left when one fails.
    #[arg(long, default_value_t = 10_000)]
    pub kill_grace_ms: u64,
    /// The program and arguments every rank runs.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// A key unique to this start of the group: the spawner's pid and the time.
fn fresh_key() -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("local-{}-{t}", std::process::id())
}

/// Runs the group; returns the exit code: 0 when every rank succeeded, else the first failed
/// rank's code (128 + signal for a rank killed by a signal).
pub fn run(args: &RanksArgs) -> Result<u8> {
    if args.nproc == 0 || args.nproc > NPROC_MAX {
        bail!(
            "--nproc must be between 1 and {NPROC_MAX}, got {}",
            args.nproc
        );
    }
    // The supervisor's handlers: every arrival counted, SIGHUP passed on as SIGTERM.
    let signals = crate::supervise::Signals::install()?;
    let key = std::env::var(env::RENDEZVOUS_KEY).unwrap_or_else(|_| fresh_key());
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let mut ranks: Vec<(Child, Option<ExitStatus>)> = Vec::with_capacity(args.nproc);
    for r in 0..args.nproc {
        let mut c = Command::new(program);
        c.args(rest)
            .env(env::RANK, r.to_string())
            .env(env::WORLD_SIZE, args.nproc.to_string())
            .env(env::LOCAL_RANK, r.to_string())
            .env(env::RENDEZVOUS_KEY, &key);
        // A rank must not outlive the group: SIGTERM when the spawner dies.
        // SAFETY: prctl(2) is async-signal-safe, as pre_exec requires.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match c.spawn() {
            Ok(child) => ranks.push((child, None)),
            Err(e) => {
                for (child, _) in &ranks {
                    send(child, libc::SIGKILL);
                }
                for (child, _) in &mut ranks {
                    let _ = child.wait();
                }
                return Err(e).with_context(|| format!("starting rank {r}: {program}"));
            }
        }
    }
    let failed = watch(&mut ranks, &signals.count, &signals.last)?;
    let Some((rank, status)) = failed else {
        return Ok(0);
    };
    eprintln!("lazarus ranks: rank {rank} failed ({status}); stopping the others");
    tear_down(&mut ranks, Duration::from_millis(args.kill_grace_ms));
    Ok(code_of(status))
}

/// Waits until every rank has exited or one has failed (returned as `(rank, status)`),
/// forwarding each signal the spawner receives to the ranks still running.
fn watch(
    ranks: &mut [(Child, Option<ExitStatus>)],
    count: &AtomicUsize,
    last: &AtomicUsize,
) -> Result<Option<(usize, ExitStatus)>> {
    let mut forwarded = count.load(Ordering::SeqCst);
    loop {
        let seen = count.load(Ordering::SeqCst);
        if seen != forwarded {
            let sig = last.load(Ordering::SeqCst) as i32;
            for (child, st) in ranks.iter() {
                if st.is_none() {
                    send(child, sig);
                }
            }
            forwarded = seen;
        }
        for (r, (child, st)) in ranks.iter_mut().enumerate() {
            if st.is_none() {
                if let Some(s) = child.try_wait().context("waiting for a rank")? {
                    *st = Some(s);
                    if !s.success() {
                        return Ok(Some((r, s)));
                    }
                }
            }
        }
        if ranks.iter().all(|(_, st)| st.is_some()) {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to the ranks still running, SIGKILL to those left after `grace`; reaps them all.
fn tear_down(ranks: &mut [(Child, Option<ExitStatus>)], grace: Duration) {
    for (child, st) in ranks.iter() {
        if st.is_none() {
            send(child, libc::SIGTERM);
        }
    }
    let t0 = Instant::now();
    loop {
        let mut running = 0;
        for (child, st) in ranks.iter_mut() {
            if st.is_none() {
                match child.try_wait() {
                    Ok(Some(s)) => *st = Some(s),
                    Ok(None) => running += 1,
                    // Not ours to wait for any more: count it as gone.
                    Err(_) => *st = Some(ExitStatus::from_raw(0)),
                }
            }
        }
        if running == 0 {
            return;
        }
        if t0.elapsed() > grace {
            for (child, st) in ranks.iter_mut() {
                if st.is_none() {
                    send(child, libc::SIGKILL);
                    *st = child.wait().ok();
                }
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A rank's exit status as the group's exit code.
fn code_of(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1).max(1),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(1),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_keep_the_rank_s_and_never_say_success_for_a_failure() {
        assert_eq!(code_of(ExitStatus::from_raw(3 << 8)), 3);
        // Killed by SIGKILL (9): 128 + 9, as a shell reports it.
        assert_eq!(code_of(ExitStatus::from_raw(9)), 137);
    }

    #[test]
    fn keys_differ_between_starts() {
        let a = fresh_key();
        std::thread::sleep(Duration::from_millis(2));
        assert_ne!(a, fresh_key());
    }
}
