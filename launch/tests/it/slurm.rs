//! Tests against a real SLURM cluster on this machine (`scripts/slurm-setup.sh` starts one):
//! `srun` with MPI ranks, and a job from `lazarus sbatch` preempted in every way SLURM does it.
//! Built with `--features mpi`. Without a cluster they are skipped with a printed reason, unless
//! `LAZARUS_REQUIRE_SLURM` is set (as in CI), where a missing cluster is a failure.

use super::*;
use std::time::{Duration, Instant};

/// Ranks of the SLURM tests (on a 2-CPU node, hence `--overcommit`).
const RANKS: usize = 4;
/// The model and batch of the sbatch test: slow enough (~10-50 ms a step on 2 cores) for
/// preemptions to land mid-run, small enough that the test takes a minute or two.
const JOB_TRAIN: [&str; 9] = [
    "train", "--model", "d2", "--seq", "32", "--batch", "8", "--seed", "3",
];
const JOB_STEPS: u64 = 1500;
/// Longest wait for one state change of the job (requeue, start, progress, end).
const WAIT: Duration = Duration::from_secs(180);

fn slurm_available() -> bool {
    let up = Command::new("sinfo")
        .args(["-h", "-o", "%a"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("up"));
    if !up {
        assert!(
            std::env::var_os("LAZARUS_REQUIRE_SLURM").is_none(),
            "LAZARUS_REQUIRE_SLURM is set but no SLURM cluster answers: run scripts/slurm-setup.sh"
        );
        eprintln!("skipping: no SLURM cluster answers `sinfo` (scripts/slurm-setup.sh starts one)");
    }
    up
}

fn sh(prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `scontrol show job` as key=value pairs (the first value of each key).
fn job_field(job: &str, key: &str) -> Option<String> {
    let o = Command::new("scontrol")
        .args(["show", "job", "-o", job])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// Cancels the job when the test ends, whatever the outcome.
struct JobGuard(String);
impl Drop for JobGuard {
    fn drop(&mut self) {
        let _ = Command::new("scancel").arg(&self.0).status();
    }
}

/// Step and SLURM restart count from `training_state.json` (written at every commit).
fn progress(run_dir: &Path) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(run_dir.join("training_state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&s).ok()?;
    Some((
        v["step"].as_u64()?,
        v["job"]["restart_count"].as_u64().unwrap_or(0),
    ))
}

struct Job {
    id: String,
    run_dir: PathBuf,
}

impl Job {
    fn out(&self) -> String {
        std::fs::read_to_string(self.run_dir.join(format!("slurm-{}.out", self.id)))
            .unwrap_or_default()
    }

    fn wait(&self, what: &str, mut done: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !done() {
            assert!(
                t0.elapsed() < WAIT,
                "job {}: no '{what}' within {WAIT:?}; state {:?}; output:\n{}",
                self.id,
                job_field(&self.id, "JobState"),
                self.out()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the job's `restarts`-th attempt has committed `ahead` steps past `from`.
    fn wait_progress(&self, restarts: u64, from: u64, ahead: u64) -> u64 {
        let mut step = 0;
        self.wait(
            &format!("attempt {restarts} past step {}", from + ahead),
            || match progress(&self.run_dir) {
                Some((s, r)) if r == restarts && s >= from + ahead => {
                    step = s;
                    true
                }
                _ => false,
            },
        );
        assert!(step < JOB_STEPS, "training finished before the preemption");
        step
    }

    /// After a preemption: waits for the requeued job to pend, then starts it at once (a
    /// requeued job otherwise waits out SLURM's begin-time delay).
    fn wait_requeued_and_release(&self, restarts: u64) {
        self.wait("requeued", || {
            job_field(&self.id, "JobState").as_deref() == Some("PENDING")
                && job_field(&self.id, "Restarts").as_deref() == Some(&restarts.to_string())
        });
        // slurmd refuses a launch whose credential is not newer, in whole seconds, than the
        // kill of the old attempt ("job credential revoked"), so the new attempt must start at
        // least a second later; the begin-time delay normally covers this.
        self.wait("node idle", || {
            sh("sinfo", &["-h", "-N", "-o", "%T"]).trim() == "idle"
        });
        std::thread::sleep(Duration::from_secs(2));
        sh(
            "scontrol",
            &["update", &format!("jobid={}", self.id), "StartTime=now"],
        );
    }

    /// Pids of the job's rank processes (not srun, which carries the same arguments).
    fn rank_pids(&self) -> Vec<i32> {
        let dir = self.run_dir.to_str().unwrap();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                comm.trim() == "lazarus" && String::from_utf8_lossy(&cmd).contains(dir)
            })
            .collect()
    }
}

#[test]
fn srun_runs_four_mpi_ranks_like_four_thread_ranks() {
    if !slurm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 100_000);
    let common = |dir: &Path| {
        let mut v: Vec<String> = TINY_TRAIN.iter().map(|s| s.to_string()).collect();
        v.extend(
            [
                "--steps",
                "40",
                "--save-every",
                "10",
                "--no-progress",
                "--data",
                data.to_str().unwrap(),
                "--run-dir",
                dir.to_str().unwrap(),
            ]
            .map(String::from),
        );
        v
    };
    let threads = tmp.path().join("threads");
    let o = lazarus()
        .args(common(&threads))
        .args(["--ranks", &RANKS.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    let srun_dir = tmp.path().join("srun");
    let o = Command::new("srun")
        .args([
            "-n",
            &RANKS.to_string(),
            "--overcommit",
            "--mpi=pmix",
            "--kill-on-bad-exit=1",
            "--job-name=lazarus-it-srun",
            env!("CARGO_BIN_EXE_lazarus"),
        ])
        .args(common(&srun_dir))
        .args(["--comm", "mpi"])
        .env("OMPI_MCA_mpi_yield_when_idle", "1")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains(&format!("task 0 of {RANKS} (local 0)")),
        "the task comes from SLURM's variables: {t}"
    );
    assert_eq!(t.matches("done: 40 steps").count(), 1, "one report: {t}");
    // Rank-order sums: MPI ranks under srun agree bit for bit with thread ranks.
    assert_eq!(
        final_metrics(&srun_dir)["params_sha256"],
        final_metrics(&threads)["params_sha256"]
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(srun_dir.join("training_state.json")).unwrap(),
    )
    .unwrap();
    assert!(
        state["job"]["job_id"]
            .as_str()
            .is_some_and(|j| !j.is_empty()),
        "{state}"
    );
}

#[test]
fn an_sbatch_job_preempted_four_ways_ends_like_an_uninterrupted_run() {
    if !slurm_available() {
        return;
    }
    let t_start = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 200_000);
    let steps = JOB_STEPS.to_string();
    let args = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = JOB_TRAIN.iter().map(|s| s.to_string()).collect();
        v.extend(
            [
                "--steps",
                &steps,
                "--save-every",
                "20",
                "--log-every",
                "100",
                "--no-progress",
                "--data",
                data.to_str().unwrap(),
                "--run-dir",
                dir.to_str().unwrap(),
            ]
            .map(String::from),
        );
        v
    };

    let reference = tmp.path().join("reference");
    let o = lazarus()
        .args(args(&reference))
        .args(["--ranks", &RANKS.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let want = final_metrics(&reference)["params_sha256"].clone();

    let run_dir = tmp.path().join("job");
    let o = lazarus()
        .args([
            "sbatch",
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            &RANKS.to_string(),
            "--overcommit",
            "--srun-flags=--mpi=pmix",
            "--job-name",
            "lazarus-it-sbatch",
            "--",
        ])
        .args(args(&run_dir))
        .args(["--comm", "mpi"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let script = tmp.path().join("job.sh");
    std::fs::write(&script, &o.stdout).unwrap();
    let id = sh(
        "sbatch",
        &[
            "--parsable",
            "--chdir",
            tmp.path().to_str().unwrap(),
            script.to_str().unwrap(),
        ],
    )
    .trim()
    .to_string();
    let _guard = JobGuard(id.clone());
    let job = Job { id, run_dir };

    // 1. The scheduler requeues the job (SIGTERM to the batch script and the ranks).
    let step = job.wait_progress(0, 0, 60);
    sh("scontrol", &["requeue", &job.id]);
    job.wait_requeued_and_release(1);
    // 2. USR1 to the batch script alone (what --signal=B:USR1@T sends before the time limit);
    //    the trap forwards it and the script requeues the job itself.
    let step = job.wait_progress(1, step, 60);
    sh("scancel", &["--signal=USR1", "--batch", &job.id]);
    job.wait_requeued_and_release(2);
    // 3. USR1 to the script and every rank at once: each rank sees it twice.
    let step = job.wait_progress(2, step, 60);
    sh("scancel", &["--signal=USR1", "--full", &job.id]);
    job.wait_requeued_and_release(3);
    // 4. One rank dies: srun kills the others, the script requeues, work since the last commit
    //    is redone.
    job.wait_progress(3, step, 60);
    let pids = job.rank_pids();
    assert_eq!(pids.len(), RANKS, "rank processes: {pids:?}");
    // SAFETY: kill(2) on a rank process of our own job.
    assert_eq!(unsafe { libc::kill(pids[RANKS - 1], libc::SIGKILL) }, 0);
    job.wait_requeued_and_release(4);

    // On a loaded machine SLURM itself may requeue the job once more (a step cancel retried
    // after a timeout can reach the next attempt); such an attempt is released like the others.
    job.wait("completed", || {
        match job_field(&job.id, "JobState").as_deref() {
            Some("COMPLETED") => true,
            Some("PENDING") => {
                if sh("sinfo", &["-h", "-N", "-o", "%T"]).trim() == "idle" {
                    std::thread::sleep(Duration::from_secs(2));
                    // It may have started meanwhile; then the update fails, which is fine.
                    let _ = Command::new("scontrol")
                        .args(["update", &format!("jobid={}", job.id), "StartTime=now"])
                        .output();
                }
                false
            }
            _ => false,
        }
    });
    let out = job.out();
    assert!(
        job.run_dir.join("training_complete.marker").exists(),
        "{out}"
    );
    assert!(
        out.matches("preempted at step").count() >= 3,
        "three clean stops: {out}"
    );
    // Attempts 2-4 requeue themselves; the first may too, or be requeued before its script ends.
    assert!(out.matches("requeueing job").count() >= 3, "{out}");
    assert!(
        progress(&job.run_dir).is_some_and(|p| p.1 >= 4),
        "the job's restart count is recorded: {out}"
    );
    assert_eq!(
        final_metrics(&job.run_dir)["params_sha256"],
        want,
        "the preempted job differs from the uninterrupted run:\n{out}"
    );
    eprintln!(
        "sbatch job with 4 preemptions took {:.1} s in all",
        t_start.elapsed().as_secs_f64()
    );
}
