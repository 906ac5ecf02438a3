//! `lazarus launch`: the local supervisor. It runs the ranks of one machine as a child
//! (`lazarus ranks --nproc N -- lazarus train ...` for `--comm nccl`, `mpirun -np N lazarus
//! train --comm mpi ...` in a build with MPI, else `lazarus train --ranks N ...`), forwards signals to it, notices a child that died or whose heartbeat
//! stopped, tears it down (SIGTERM, then SIGKILL after a grace) and starts it again, which
//! resumes from the last committed checkpoint, with bounded back-off.

use crate::cli::CommArg;
use anyhow::{bail, Context, Result};
use lazarus_trainer::run::HEARTBEAT_FILE;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Flags of `lazarus launch`.
#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// Ranks on this machine.
    #[arg(long, default_value_t = 1)]
    pub nproc: usize,
    /// Restarts after a failure before giving up.
    #[arg(long, default_value_t = 3)]
    pub restarts_max: u32,
    /// A run whose heartbeat is older than this is hung and restarted (0: never).
    #[arg(long, default_value_t = 600_000)]
    pub hang_timeout_ms: u64,
    /// Wait between SIGTERM and SIGKILL when tearing the ranks down.
    #[arg(long, default_value_t = 10_000)]
    pub kill_grace_ms: u64,
    /// Back-off before the first restart; it doubles after each one.
    #[arg(long, default_value_t = 1_000)]
    pub backoff_ms: u64,
    /// Longest back-off between restarts.
    #[arg(long, default_value_t = 30_000)]
    pub backoff_max_ms: u64,
    /// The `train ...` command line the ranks run.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn child_command(args: &LaunchArgs, comm: CommArg) -> Result<Command> {
    let me = std::env::current_exe().context("finding the lazarus binary")?;
    let mut c = if comm == CommArg::Nccl {
        // One process per GPU, each told its rank in the environment.
        let mut c = Command::new(&me);
        c.args(["ranks", "--nproc", &args.nproc.to_string()])
            .args(["--kill-grace-ms", &args.kill_grace_ms.to_string(), "--"])
            .arg(&me)
            .args(&args.command);
        c
    } else if args.nproc > 1 && cfg!(feature = "mpi") {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "-np", &args.nproc.to_string()])
            .arg(&me)
            .args(&args.command)
            .args(["--comm", "mpi"]);
        c
    } else {
        let mut c = Command::new(&me);
        c.args(&args.command);
        if args.nproc > 1 {
            c.args(["--ranks", &args.nproc.to_string()]);
        }
        c
    };
    if !args.command.iter().any(|a| a == "--no-progress") {
        c.arg("--no-progress");
    }
    // Its own session, so that ranks left behind by a failed attempt (mpirun may exit before
    // every rank has, and puts each rank in a process group of its own) can be found and
    // killed before the next attempt starts.
    // Outside the terminal's session the ranks would outlive a supervisor that dies (a closed
    // terminal, the OOM killer): the child gets SIGTERM when the supervisor goes, and stops
    // with a checkpoint.
    // SAFETY: setsid(2) and prctl(2) are async-signal-safe, as pre_exec requires.
    unsafe {
        c.pre_exec(|| {
            if libc::setsid() < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(c)
}

fn heartbeat_age(run_dir: &Path) -> Option<Duration> {
    let m = std::fs::metadata(run_dir.join(HEARTBEAT_FILE))
        .and_then(|m| m.modified())
        .ok()?;
    SystemTime::now().duration_since(m).ok()
}

pub(crate) fn send(child: &Child, sig: i32) {
    // SAFETY: kill(2) only sends a signal to our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// The live processes of session `sid` (field 6 of /proc/PID/stat), zombies excluded.
fn session_members(sid: u32) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // After the command name in parentheses: state, ppid, pgrp, session, ...
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                return false;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.first() != Some(&"Z") && f.get(3).and_then(|s| s.parse::<u32>().ok()) == Some(sid)
        })
        .collect()
}

/// SIGKILLs what is left of an attempt's session and waits (up to `grace`) until it is gone,
/// so that no rank of it still holds the run lock or a collective when the next one starts.
/// Killing mid-save is safe: a checkpoint counts only once committed.
fn kill_session(sid: u32, grace: Duration) {
    let t0 = Instant::now();
    loop {
        let left = session_members(sid);
        if left.is_empty() || t0.elapsed() > grace {
            return;
        }
        for pid in left {
            // SAFETY: kill(2) on a process of the session this supervisor created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, then SIGKILL after `grace`; waits for the child.
fn tear_down(child: &mut Child, grace: Duration) {
    send(child, SIGTERM);
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

enum Ended {
    Exited(std::process::ExitStatus),
    Hung,
}

/// Waits for the child to exit, forwarding signals and watching the heartbeat.
fn watch(
    child: &mut Child,
    args: &LaunchArgs,
    run_dir: &Path,
    signals: &Signals,
    started: SystemTime,
) -> Result<Ended> {
    let mut forwarded = signals.count.load(Ordering::SeqCst);
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Ended::Exited(st));
        }
        // Every arrival is passed on, so a second Ctrl-C reaches the ranks as a second one.
        let count = signals.count.load(Ordering::SeqCst);
        if count != forwarded {
            let sig = signals.last.load(Ordering::SeqCst) as i32;
            eprintln!("lazarus launch: forwarding signal {sig} to the ranks");
            send(child, sig);
            forwarded = count;
        }
        // The heartbeat counts only once this attempt has written one.
        let fresh = std::fs::metadata(run_dir.join(HEARTBEAT_FILE))
            .and_then(|m| m.modified())
            .is_ok_and(|m| m >= started);
        if args.hang_timeout_ms > 0
            && fresh
            && heartbeat_age(run_dir)
                .is_some_and(|a| a > Duration::from_millis(args.hang_timeout_ms))
        {
            return Ok(Ended::Hung);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The signals the supervisor received: how many, and the last one (SIGHUP counts as SIGTERM:
/// a closed terminal stops the run with a checkpoint).
pub(crate) struct Signals {
    pub(crate) count: Arc<AtomicUsize>,
    pub(crate) last: Arc<AtomicUsize>,
}

impl Signals {
    pub(crate) fn install() -> Result<Self> {
        let s = Signals {
            count: Arc::new(AtomicUsize::new(0)),
            last: Arc::new(AtomicUsize::new(0)),
        };
        for sig in [SIGTERM, SIGUSR1, SIGINT, SIGHUP] {
            let (count, last) = (Arc::clone(&s.count), Arc::clone(&s.last));
            let fwd = if sig == SIGHUP { SIGTERM } else { sig } as usize;
            // SAFETY: the handler only stores to atomics.
            unsafe {
                signal_hook::low_level::register(sig, move || {
                    last.store(fwd, Ordering::SeqCst);
                    count.fetch_add(1, Ordering::SeqCst);
                })
            }
            .context("installing signal handlers")?;
        }
        Ok(s)
    }

    fn seen(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }
}

/// Runs `lazarus launch`; returns the exit code.
pub fn launch(args: &LaunchArgs) -> Result<u8> {
    let target = crate::slurm::TrainTarget::of(&args.command)?;
    if args.nproc == 0 {
        bail!("--nproc must be positive");
    }
    let run_dir = target.run_dir.clone();
    let signals = Signals::install()?;
    let mut failures = 0u32;
    let mut backoff = Duration::from_millis(args.backoff_ms);
    loop {
        if signals.seen() {
            eprintln!("lazarus launch: stopped by a signal before the next attempt");
            return Ok(1);
        }
        let started = SystemTime::now();
        let mut child = child_command(args, target.comm)?
            .spawn()
            .context("starting the ranks")?;
        let ended = watch(&mut child, args, &run_dir, &signals, started)?;
        if target.complete_marker.exists() {
            eprintln!("lazarus launch: training complete");
            return Ok(0);
        }
        let why = match ended {
            Ended::Hung => {
                tear_down(&mut child, Duration::from_millis(args.kill_grace_ms));
                format!("no heartbeat for {} ms", args.hang_timeout_ms)
            }
            Ended::Exited(st) if signals.seen() => {
                eprintln!("lazarus launch: stopped by a signal ({st}); not restarting");
                return Ok(if st.success() { 0 } else { 1 });
            }
            Ended::Exited(st) if st.success() => {
                "the ranks stopped before the end (preempted)".to_string()
            }
            Ended::Exited(st) if st.code() == Some(2) => {
                eprintln!(
                    "lazarus launch: the train command was refused (usage or configuration \
                     error, exit 2); not restarting"
                );
                return Ok(2);
            }
            Ended::Exited(st) => format!("the ranks failed ({st})"),
        };
        if !session_members(child.id()).is_empty() {
            eprintln!("lazarus launch: killing the ranks the attempt left behind");
            kill_session(
                child.id(),
                Duration::from_millis(args.kill_grace_ms.max(1_000)),
            );
        }
        if !why.contains("preempted") {
            failures += 1;
            if failures > args.restarts_max {
                eprintln!(
                    "lazarus launch: {why}; giving up after {} restarts",
                    args.restarts_max
                );
                return Ok(1);
            }
        }
        eprintln!(
            "lazarus launch: {why}; restarting in {} ms (failure {failures} of at most {})",
            backoff.as_millis(),
            args.restarts_max
        );
        // The back-off ends early when a stop signal arrives.
        let t0 = Instant::now();
        while t0.elapsed() < backoff && !signals.seen() {
            std::thread::sleep(Duration::from_millis(20));
        }
        backoff = (backoff * 2).min(Duration::from_millis(args.backoff_max_ms.max(1)));
    }
}
