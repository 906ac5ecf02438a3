//! The MPI backend under `mpirun` (feature `mpi`): the `mpi_check` example's collectives on 3 and
//! 4 ranks, a rank killed mid-run, and a hung rank that trips the other ranks' watchdogs. Each
//! test skips, saying why, when `mpirun` is not on PATH, and bounds its wait for `mpirun`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

/// How often a test polls `mpirun` and the pid files.
const POLL_MS: u64 = 50;

/// `mpirun` when it is on PATH; `None` (after printing why the test is skipped) otherwise.
fn mpirun() -> Option<&'static str> {
    let found = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        println!("skipped: `mpirun` is not on PATH (apt-get install openmpi-bin libopenmpi-dev)");
    }
    found.then_some("mpirun")
}

/// The `mpi_check` example, which `cargo test --features mpi` builds next to the test binaries.
fn mpi_check_exe() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = profile_dir.join("examples").join("mpi_check");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test -p lazarus-comm --features mpi` (which builds examples) \
         or `cargo build -p lazarus-comm --features mpi --example mpi_check` first",
        path.display()
    );
    path
}

/// Starts `mpirun -np <ranks> --oversubscribe mpi_check <args>` with output to files in `dir`.
fn spawn_mpirun(mpirun: &str, ranks: usize, args: &[&str], dir: &Path) -> Child {
    Command::new(mpirun)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["-np", &ranks.to_string(), "--oversubscribe"])
        .arg(mpi_check_exe())
        .args(args)
        .stdout(File::create(dir.join("stdout")).expect("stdout file"))
        .stderr(File::create(dir.join("stderr")).expect("stderr file"))
        .spawn()
        .expect("start mpirun")
}

/// Waits at most `limit` for `child`; on expiry asks `mpirun` to stop its ranks (SIGTERM is
/// forwarded), then kills it, and fails the test.
fn wait_bounded(child: &mut Child, limit: Duration, dir: &Path) -> (ExitStatus, Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().expect("poll mpirun") {
            return (status, start.elapsed());
        }
        thread::sleep(Duration::from_millis(POLL_MS));
    }
    // SAFETY: signalling our own child process by its pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    thread::sleep(Duration::from_secs(3));
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "mpirun still running after {limit:?}; output:\n{}",
        output(dir)
    );
}

fn output(dir: &Path) -> String {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    format!(
        "--- stdout\n{}--- stderr\n{}",
        read("stdout"),
        read("stderr")
    )
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn mpi_collectives_match_the_reference_on_3_and_4_ranks() {
    let Some(mpirun) = mpirun() else { return };
    for ranks in [3, 4] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = spawn_mpirun(mpirun, ranks, &["check", "60000"], dir.path());
        let (status, _) = wait_bounded(&mut child, Duration::from_secs(120), dir.path());
        let out = output(dir.path());
        assert!(status.success(), "{ranks} ranks: {status}\n{out}");
        assert_eq!(out.matches("check ok").count(), ranks, "{out}");
    }
}

#[test]
fn mpi_rank_killed_mid_loop_takes_the_job_down() {
    let Some(mpirun) = mpirun() else { return };
    let (ranks, timeout_ms) = (4, 5_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let pid_dir = dir.path().to_str().expect("utf-8 temp path").to_string();
    let mut child = spawn_mpirun(
        mpirun,
        ranks,
        &["loop", &timeout_ms.to_string(), &pid_dir],
        dir.path(),
    );
    let pid_file = |r: usize| dir.path().join(format!("rank-{r}.pid"));
    let start = Instant::now();
    while !(0..ranks).all(|r| pid_file(r).exists()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "ranks did not start"
        );
        assert!(
            child.try_wait().expect("poll").is_none(),
            "{}",
            output(dir.path())
        );
        thread::sleep(Duration::from_millis(POLL_MS));
    }
    let pids: Vec<i32> = (0..ranks)
        .map(|r| {
            std::fs::read_to_string(pid_file(r))
                .expect("pid")
                .trim()
                .parse()
                .expect("pid")
        })
        .collect();
    // Let the ranks get well into their loop of collectives, then kill rank 2 outright.
    thread::sleep(Duration::from_millis(1000));
    // SAFETY: signalling a process this test started (through mpirun) by its pid.
    assert_eq!(unsafe { libc::kill(pids[2], libc::SIGKILL) }, 0);
    let limit = Duration::from_millis(timeout_ms) + Duration::from_secs(20);
    let (status, _) = wait_bounded(&mut child, limit, dir.path());
    assert!(
        !status.success(),
        "mpirun must fail\n{}",
        output(dir.path())
    );
    let settle = Instant::now();
    while pids.iter().any(|&p| alive(p)) && settle.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(POLL_MS));
    }
    let survivors: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(survivors.is_empty(), "ranks still alive: {survivors:?}");
}

#[test]
fn mpi_hung_rank_trips_the_watchdog_of_the_others() {
    let Some(mpirun) = mpirun() else { return };
    let timeout_ms = 2_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = spawn_mpirun(mpirun, 3, &["hang", &timeout_ms.to_string()], dir.path());
    let limit = Duration::from_millis(timeout_ms) + Duration::from_secs(20);
    let (status, waited) = wait_bounded(&mut child, limit, dir.path());
    let out = output(dir.path());
    assert!(!status.success(), "{out}");
    assert!(
        waited >= Duration::from_millis(timeout_ms),
        "{waited:?}\n{out}"
    );
    assert!(
        out.contains("MPI collective `barrier` on rank") && out.contains("within 2000 ms"),
        "{out}"
    );
}
