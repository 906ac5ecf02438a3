//! The `recovery` suite: how long the local supervisor (`lazarus launch`) takes to get a run
//! training again after one rank is SIGKILLed, split into
//! - detection: from the kill until the supervisor has seen the ranks fail and torn them down
//!   (its "restarting" line);
//! - restart: from there until the new ranks are up with data and model built (rank 0's
//!   "model:" line), back-off included;
//! - restore: reading and verifying the last committed checkpoint ("resumed from" line);
//! - first step: the first completed step after the restore;
//!
//! and the steps of work lost (the last step logged before the kill minus the step resumed at;
//! a lower bound, as the ranks may finish a step or two between that line and the kill).
//! It drives the real `lazarus` binary: with MPI (a build with `--features mpi` and `mpirun` on
//! the PATH) the ranks are processes and one of them is killed; otherwise the ranks are threads
//! of one process, and that process is killed, which the JSON records.

use crate::machine::Machine;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Longest wait for any one event of a recovery.
const EVENT_WAIT: Duration = Duration::from_secs(600);
/// Synthetic corpus size for the runs.
const DATA_BYTES: usize = 300_000;

/// Options of the recovery suite.
#[derive(Debug, Clone, clap::Args)]
pub struct RecoveryArgs {
    /// Presets to measure.
    #[arg(long, value_delimiter = ',', default_value = "d2,d6")]
    pub models: Vec<String>,
    /// Ranks of each run.
    #[arg(long, default_value_t = 4)]
    pub ranks: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// Checkpoint interval of the runs.
    #[arg(long, default_value_t = 10)]
    pub save_every: u64,
    /// A rank is killed once this step has been logged (mid-way between two saves by default).
    #[arg(long, default_value_t = 15)]
    pub kill_at_step: u64,
    /// The supervisor's first back-off (its default is 1000 ms).
    #[arg(long, default_value_t = 1000)]
    pub backoff_ms: u64,
    /// The lazarus binary (default: the one next to this benchmark's binary).
    #[arg(long)]
    pub lazarus: Option<PathBuf>,
    /// Directory for the runs; a temporary directory is made inside and removed after.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

/// One measured recovery.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub model: String,
    pub ranks: usize,
    pub params: u64,
    pub save_every: u64,
    pub kill_at_step: u64,
    /// Processes holding the ranks: `ranks` with MPI, 1 with thread ranks.
    pub rank_processes: usize,
    pub backoff_ms: u64,
    pub detection_ms: f64,
    pub restart_ms: f64,
    pub restore_ms: f64,
    pub first_step_ms: f64,
    pub total_ms: f64,
    /// Last step logged before the kill, and the step the run resumed at.
    pub last_step_before_kill: u64,
    pub resumed_at_step: u64,
    pub steps_lost: u64,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    suite: &'static str,
    machine: Machine,
    lazarus: String,
    rows: &'a [Row],
}

/// A line of the supervisor's output (its own and rank 0's), with its arrival time.
struct Line {
    at: Instant,
    text: String,
}

fn pump(r: impl std::io::Read + Send + 'static, tx: std::sync::mpsc::Sender<Line>) {
    std::thread::spawn(move || {
        for text in BufReader::new(r).lines().map_while(|l| l.ok()) {
            if tx
                .send(Line {
                    at: Instant::now(),
                    text,
                })
                .is_err()
            {
                break;
            }
        }
    });
}

/// Reads lines until one satisfies `want`, returning its time and the value `want` extracts.
fn wait_for<T>(
    rx: &Receiver<Line>,
    what: &str,
    seen: &mut Vec<String>,
    mut want: impl FnMut(&str) -> Option<T>,
) -> Result<(Instant, T)> {
    let t0 = Instant::now();
    loop {
        let left = EVENT_WAIT.saturating_sub(t0.elapsed());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = want(&l.text);
                seen.push(l.text);
                if let Some(v) = hit {
                    return Ok((l.at, v));
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                bail!(
                    "no {what} within {EVENT_WAIT:?}; last output:\n{}",
                    tail(seen)
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!(
                    "the supervisor ended before {what}; last output:\n{}",
                    tail(seen)
                )
            }
        }
    }
}

fn tail(seen: &[String]) -> String {
    seen[seen.len().saturating_sub(20)..].join("\n")
}

/// The step of a log line `step   N/T | ...`.
fn step_of(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("step")?.trim_start();
    rest.split('/').next()?.trim().parse().ok()
}

/// The step of `resumed from DIR (step N of T, ...`.
fn resumed_step(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("resumed from ")?;
    let after = &rest[rest.find("(step ")? + "(step ".len()..];
    after.split_whitespace().next()?.parse().ok()
}

/// Parameter count from rank 0's `model: ..., 0.43M parameters; ...` line.
fn params_of(line: &str) -> Option<u64> {
    let m = line.strip_prefix("model: ")?;
    let before = m.split("M parameters").next()?;
    let num = before.rsplit(' ').next()?;
    num.parse::<f64>().ok().map(|v| (v * 1e6).round() as u64)
}

/// Rank processes of the run in `run_dir` (`lazarus train ...`, not the supervisor or mpirun),
/// with their MPI rank when they have one.
fn rank_processes(run_dir: &Path) -> Vec<(i32, Option<usize>)> {
    let dir = run_dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let argv: Vec<String> = cmd
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_rank = argv.get(1).map(String::as_str) == Some("train")
                && argv.iter().any(|a| a == &dir)
                && argv[0].ends_with("lazarus");
            if !is_rank {
                return None;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let rank = env.split(|&b| b == 0).find_map(|kv| {
                std::str::from_utf8(kv)
                    .ok()?
                    .strip_prefix("OMPI_COMM_WORLD_RANK=")?
                    .parse()
                    .ok()
            });
            Some((pid, rank))
        })
        .collect()
}

fn lazarus_binary(args: &RecoveryArgs) -> Result<PathBuf> {
    let p = match &args.lazarus {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("finding this binary")?
            .with_file_name("lazarus"),
    };
    ensure!(
        p.is_file(),
        "the lazarus binary {} does not exist: build it (`cargo build --release -p lazarus`, \
         with `--features mpi` for rank processes) or pass --lazarus PATH",
        p.display()
    );
    Ok(p)
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn measure(model: &str, args: &RecoveryArgs, bin: &Path, work: &Path) -> Result<Row> {
    let data = work.join("data");
    if !data.join("train.bin").exists() {
        let o = Command::new(bin)
            .args(["data", "synth", "--out"])
            .arg(&data)
            .args(["--bytes", &DATA_BYTES.to_string()])
            .output()?;
        ensure!(
            o.status.success(),
            "making the corpus: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let run_dir = work.join(format!("run-{model}"));
    let steps = args.kill_at_step + args.save_every;
    let mut child = Command::new(bin);
    child
        .args(["launch", "--nproc", &args.ranks.to_string()])
        .args(["--backoff-ms", &args.backoff_ms.to_string()])
        .args(["--restarts-max", "1", "--"])
        .args(["train", "--model", model])
        .args(["--batch", &args.batch.to_string()])
        .args(["--seq", &args.seq.to_string()])
        .args(["--steps", &steps.to_string()])
        .args(["--save-every", &args.save_every.to_string()])
        .args(["--log-every", "1", "--val-every", "0"])
        .arg("--data")
        .arg(&data)
        .arg("--run-dir")
        .arg(&run_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = KillOnDrop(child.spawn().context("starting lazarus launch")?);
    let (tx, rx) = channel();
    pump(child.0.stdout.take().expect("piped"), tx.clone());
    pump(child.0.stderr.take().expect("piped"), tx);
    let mut seen = Vec::new();

    let (_, params) = wait_for(&rx, "the model line", &mut seen, params_of)?;
    let (_, last_step) = wait_for(&rx, "the step to kill at", &mut seen, |l| {
        step_of(l).filter(|&s| s >= args.kill_at_step)
    })?;
    let procs = rank_processes(&run_dir);
    ensure!(
        !procs.is_empty(),
        "found no rank process of {}",
        run_dir.display()
    );
    // The last MPI rank when the ranks are processes; the one process otherwise.
    let victim = procs
        .iter()
        .max_by_key(|(_, r)| *r)
        .map(|(pid, _)| *pid)
        .expect("non-empty");
    let killed_at = Instant::now();
    // SAFETY: kill(2) on a rank process this benchmark started (through the supervisor).
    ensure!(
        unsafe { libc::kill(victim, libc::SIGKILL) } == 0,
        "killing rank process {victim}: {}",
        std::io::Error::last_os_error()
    );
    let (detected, ()) = wait_for(&rx, "the supervisor's restart", &mut seen, |l| {
        (l.starts_with("lazarus launch:") && l.contains("restarting")).then_some(())
    })?;
    let (up, _) = wait_for(&rx, "the restarted ranks", &mut seen, params_of)?;
    let (restored, resumed_at) = wait_for(&rx, "the restore", &mut seen, resumed_step)?;
    let (first, _) = wait_for(&rx, "the first step after the restore", &mut seen, step_of)?;
    wait_for(&rx, "the end of the run", &mut seen, |l| {
        l.starts_with("lazarus launch: training complete")
            .then_some(())
    })?;
    let st = child.0.wait()?;
    ensure!(
        st.success(),
        "lazarus launch ended with {st}:\n{}",
        tail(&seen)
    );
    // The ranks may run on a little between the log line and the kill; a commit in that gap
    // would make the loss look smaller than it was, so such a measurement is refused.
    ensure!(
        resumed_at <= last_step,
        "the run committed step {resumed_at} after step {last_step} was logged and before the \
         kill landed; use a larger --save-every"
    );
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
    Ok(Row {
        model: model.into(),
        ranks: args.ranks,
        params,
        save_every: args.save_every,
        kill_at_step: args.kill_at_step,
        rank_processes: procs.len(),
        backoff_ms: args.backoff_ms,
        detection_ms: ms(killed_at, detected),
        restart_ms: ms(detected, up),
        restore_ms: ms(up, restored),
        first_step_ms: ms(restored, first),
        total_ms: ms(killed_at, first),
        last_step_before_kill: last_step,
        resumed_at_step: resumed_at,
        steps_lost: last_step.saturating_sub(resumed_at),
    })
}

fn print_table(rows: &[Row]) {
    println!(
        "| model | ranks | rank processes | detection ms | restart ms (back-off) | restore ms | first step ms | kill -> step ms | steps lost |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} ({}) | {:.0} | {:.0} | {:.0} | {} ({} -> {}) |",
            r.model,
            r.ranks,
            r.rank_processes,
            r.detection_ms,
            r.restart_ms,
            r.backoff_ms,
            r.restore_ms,
            r.first_step_ms,
            r.total_ms,
            r.steps_lost,
            r.last_step_before_kill,
            r.resumed_at_step
        );
    }
}

/// Runs the suite, prints the table, writes `recovery-<date>.json`.
pub fn run(args: &RecoveryArgs, out: &Path) -> Result<()> {
    ensure!(args.ranks >= 1, "--ranks must be at least 1");
    ensure!(args.save_every >= 1, "--save-every must be at least 1");
    ensure!(
        args.kill_at_step > args.save_every,
        "--kill-at-step must come after the first save (--save-every {})",
        args.save_every
    );
    let bin = lazarus_binary(args)?;
    let work = tempfile::Builder::new()
        .prefix("bench-tmp-recovery-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("making a directory in {}", args.dir.display()))?;
    let mut rows = Vec::new();
    for model in &args.models {
        eprintln!("recovery: {model}, {} ranks", args.ranks);
        let row = measure(model, args, &bin, work.path())
            .with_context(|| format!("measuring the recovery of {model}"))?;
        rows.push(row);
    }
    let machine = Machine::current();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join(format!("recovery-{}.json", &machine.date_utc[..10]));
    let report = Report {
        suite: "recovery",
        machine,
        lazarus: bin.display().to_string(),
        rows: &rows,
    };
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    print_table(&rows);
    println!("results: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_parsed() {
        assert_eq!(
            step_of("step    15/25 | loss 4.2 | lr 1e-3 | 12.0 ms | 100 tok/s"),
            Some(15)
        );
        assert_eq!(step_of("stopped after step 5"), None);
        assert_eq!(
            resumed_step(
                "resumed from /r/checkpoints/step_000000010 (step 10 of 25, written by 4 rank(s)); restart 1"
            ),
            Some(10)
        );
        assert_eq!(resumed_step("resumed nothing"), None);
        assert_eq!(
            params_of("model: 2 layers, 4 heads, 128 channels, vocab 256 (padded 256), 0.43M parameters; 4 rank(s), global batch 8x64x1 tokens"),
            Some(430_000)
        );
        assert_eq!(params_of("data: x"), None);
    }

    #[test]
    fn a_kill_before_the_first_save_is_refused() {
        let args = RecoveryArgs {
            models: vec!["d2".into()],
            ranks: 4,
            batch: 8,
            seq: 64,
            save_every: 10,
            kill_at_step: 5,
            backoff_ms: 1000,
            lazarus: None,
            dir: ".".into(),
        };
        let e = run(&args, Path::new("/nonexistent")).unwrap_err();
        assert!(e.to_string().contains("--kill-at-step"), "{e}");
    }
}
