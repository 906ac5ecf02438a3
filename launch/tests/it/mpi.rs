//! Multi-process training under `mpirun` (built with `--features mpi`; skipped with a printed
//! reason when `mpirun` is missing).

use super::ranks::{assert_close, train_ranks};
use super::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn mpirun_available() -> bool {
    let ok = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: mpirun not found (install openmpi-bin)");
    }
    ok
}

fn mpirun(np: usize, data: &Path, dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args([
            "--oversubscribe",
            "-np",
            &np.to_string(),
            env!("CARGO_BIN_EXE_lazarus"),
        ])
        .args([
            "train",
            "--comm",
            "mpi",
            "--model",
            "d2",
            "--channels",
            "64",
            "--heads",
            "4",
            "--seq",
            "32",
            "--batch",
            "12",
        ])
        .args(["--save-every", "10", "--log-every", "5", "--no-progress"])
        .args([
            "--data",
            data.to_str().unwrap(),
            "--run-dir",
            dir.to_str().unwrap(),
        ])
        .args(extra);
    c
}

fn ok(mut c: Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

#[test]
fn mpi_ranks_train_like_thread_ranks_and_resume_bit_identically() {
    if !mpirun_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 200_000);
    let threads = tmp.path().join("threads");
    assert!(train_ranks(&data, &threads, 4, &[]).status.success());
    let one = tmp.path().join("one");
    assert!(train_ranks(&data, &one, 1, &[]).status.success());
    let mpi = tmp.path().join("mpi");
    let out = ok(mpirun(4, &data, &mpi, &["--steps", "40"]));
    assert_eq!(
        out.matches("done: 40 steps").count(),
        1,
        "only rank 0 reports: {out}"
    );
    // Both backends sum in rank order, so they agree bit for bit; one rank is within rounding.
    assert_eq!(
        final_metrics(&mpi)["params_sha256"],
        final_metrics(&threads)["params_sha256"]
    );
    assert_close(&one, &mpi);
    let cut = tmp.path().join("cut");
    ok(mpirun(
        4,
        &data,
        &cut,
        &["--steps", "40", "--stop-at", "20"],
    ));
    ok(mpirun(4, &data, &cut, &["--steps", "40"]));
    assert_eq!(
        final_metrics(&cut)["params_sha256"],
        final_metrics(&mpi)["params_sha256"]
    );
}

#[test]
fn sigkill_of_one_mpi_rank_ends_the_job_and_the_next_start_resumes() {
    if !mpirun_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 200_000);
    let dir = tmp.path().join("dead");
    let mut job = mpirun(
        4,
        &data,
        &dir,
        &["--steps", "100000", "--collective-timeout-ms", "5000"],
    );
    let mut child = job
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !dir.join("training_state.json").exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the job ended before its first commit: {st:?}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no commit within two minutes"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Kill one rank process (not rank 0's, not mpirun).
    let pids = String::from_utf8(
        Command::new("pgrep")
            .args(["-f", "--", "train --comm mpi"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let ranks: Vec<u32> = pids
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|&p| p != child.id())
        .collect();
    assert!(ranks.len() >= 4, "rank processes: {ranks:?}");
    let victim = ranks[ranks.len() - 1];
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let killed_at = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(!st.success(), "the job must fail when a rank dies");
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(5 + 20),
            "the job hung after a rank died"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert!(
        t.contains("rank") || t.contains("process"),
        "the failure should name what was lost: {t}"
    );
    // Every rank process is gone within the collective deadline plus a few seconds.
    let alive = |pid: &u32| Path::new(&format!("/proc/{pid}")).exists();
    while ranks.iter().any(alive) {
        assert!(
            killed_at.elapsed() < Duration::from_secs(5 + 20),
            "ranks {ranks:?} outlived the job"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The next start resumes from the last committed checkpoint and finishes.
    let out = ok(mpirun(4, &data, &dir, &["--steps", "60"]));
    assert!(out.contains("resumed from"), "{out}");
}
