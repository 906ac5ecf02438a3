//! `lazarus ranks`, the process-group launcher of NCCL runs, with plain shell commands as
//! ranks: every rank gets its place in the environment, a failed rank ends the group with its
//! exit code, and signals reach every rank. (NCCL itself needs a GPU; this needs none.)

use super::*;
use std::time::{Duration, Instant};

fn sh(script: &str) -> Vec<String> {
    ["sh", "-c", script].iter().map(|s| s.to_string()).collect()
}

fn ranks(nproc: usize, cmd: &[String]) -> Command {
    let mut c = lazarus();
    c.args([
        "ranks",
        "--nproc",
        &nproc.to_string(),
        "--kill-grace-ms",
        "2000",
        "--",
    ])
    .args(cmd);
    c
}

#[test]
fn every_rank_gets_its_place_and_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let script = format!(
        "echo \"$LAZARUS_RANK $LAZARUS_WORLD_SIZE $LAZARUS_LOCAL_RANK $LAZARUS_RENDEZVOUS_KEY\" > {}/$LAZARUS_RANK",
        out.display()
    );
    let o = ranks(3, &sh(&script)).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let mut keys = Vec::new();
    for r in 0..3 {
        let line = std::fs::read_to_string(out.join(r.to_string())).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[..3], [r.to_string(), "3".into(), r.to_string()], "{line}");
        keys.push(f[3].to_string());
    }
    assert!(
        keys.iter().all(|k| k == &keys[0] && !k.is_empty()),
        "{keys:?}"
    );
}

#[test]
fn a_failed_rank_ends_the_group_with_its_code() {
    // Rank 1 fails at once; the others would sleep for a minute.
    let t0 = Instant::now();
    let o = ranks(
        3,
        &sh("if [ \"$LAZARUS_RANK\" = 1 ]; then exit 7; fi; exec sleep 60"),
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(text(&o).contains("rank 1 failed"), "{}", text(&o));
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the sleeping ranks were not stopped: {:?}",
        t0.elapsed()
    );
}

#[test]
fn a_signal_to_the_group_reaches_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // Each rank writes a file when SIGTERM arrives, then exits 0 (a clean preemption).
    let script = format!(
        "trap 'echo stopped > {d}/$LAZARUS_RANK; exit 0' TERM; touch {d}/ready-$LAZARUS_RANK; \
         while true; do sleep 0.05; done"
    );
    let mut child = ranks(2, &sh(&script)).spawn().unwrap();
    let t0 = Instant::now();
    while !(0..2).all(|r| dir.path().join(format!("ready-{r}")).exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "ranks did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}");
    for r in 0..2 {
        let s = std::fs::read_to_string(dir.path().join(r.to_string())).unwrap();
        assert_eq!(s.trim(), "stopped");
    }
}

#[test]
fn nccl_in_a_build_without_cuda_says_how_to_get_it() {
    if cfg!(feature = "cuda") {
        eprintln!("built with cuda: the refusal of a CPU-only build is not tested here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = TINY_TRAIN.iter().map(|s| s.to_string()).collect();
    args.extend(
        [
            "--comm",
            "nccl",
            "--device",
            "cuda",
            "--steps",
            "2",
            "--run-dir",
        ]
        .map(String::from),
    );
    args.push(dir.path().join("run").display().to_string());
    let o = lazarus().args(&args).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("--features cuda"), "{}", text(&o));
}
