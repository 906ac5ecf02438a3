//! `lazarus launch` survives a scripted run of mixed preemptions and failures and ends
//! bit-identical to an uninterrupted run.

use super::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn train_args(data: &Path, dir: &Path, steps: u64) -> Vec<String> {
    let mut v: Vec<String> = TINY_TRAIN
        .iter()
        .chain(&["--save-every", "20", "--log-every", "1000"])
        .map(|s| s.to_string())
        .collect();
    v.extend([
        "--steps".into(),
        steps.to_string(),
        "--data".into(),
        data.display().to_string(),
        "--run-dir".into(),
        dir.display().to_string(),
    ]);
    v
}

/// Pids of the rank processes (not the supervisor, not mpirun) of the run in `dir`.
fn rank_pids(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_rank = args.iter().any(|a| a == "train")
            && !args.iter().any(|a| a == "launch")
            && !args[0].ends_with("mpirun")
            && args.iter().any(|a| a == &needle);
        if is_rank {
            out.push(pid);
        }
    }
    out
}

fn heartbeat(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("heartbeat"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn kill(sig: &str, pids: &[u32]) {
    for p in pids {
        let _ = Command::new("kill").args([sig, &p.to_string()]).status();
    }
}

#[test]
fn launch_survives_five_mixed_preemptions_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 100_000);
    let steps = 2000;
    let reference = tmp.path().join("reference");
    let mut r = lazarus();
    r.args(train_args(&data, &reference, steps))
        .args(["--ranks", "2"]);
    assert!(r.output().unwrap().status.success());
    let dir = tmp.path().join("supervised");
    let mut sup = lazarus()
        .args([
            "launch",
            "--nproc",
            "2",
            "--restarts-max",
            "10",
            "--backoff-max-ms",
            "1000",
            "--",
        ])
        .args(train_args(&data, &dir, steps))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let events = [
        "-TERM:all",
        "-KILL:one",
        "-KILL:all",
        "-TERM:all",
        "-KILL:one",
    ];
    let mut last = 0;
    for ev in events {
        // Let the run make progress past a commit before each blow.
        loop {
            assert!(
                t0.elapsed() < Duration::from_secs(240),
                "the supervised run stalled before {ev}"
            );
            assert!(
                sup.try_wait().unwrap().is_none(),
                "the supervisor ended before {ev}"
            );
            let hb = heartbeat(&dir);
            if hb >= last + 60 && !rank_pids(&dir).is_empty() {
                last = hb;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (sig, who) = ev.split_once(':').unwrap();
        let pids = rank_pids(&dir);
        let targets: Vec<u32> = if who == "one" {
            pids[pids.len() - 1..].to_vec()
        } else {
            pids
        };
        kill(sig, &targets);
    }
    let st = loop {
        if let Some(st) = sup.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the supervised run did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let o = sup.wait_with_output().unwrap();
    assert!(st.success(), "{}", text(&o));
    assert!(text(&o).contains("restarting"), "{}", text(&o));
    assert_eq!(
        final_metrics(&dir)["params_sha256"],
        final_metrics(&reference)["params_sha256"]
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("training_state.json")).unwrap())
            .unwrap();
    assert!(state["restarts"].as_u64().unwrap() >= 5, "{state}");
}

#[test]
fn a_refused_train_command_is_not_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bad");
    // `--no-progress` given by the user too: the supervisor must not add it a second time.
    let t0 = Instant::now();
    let o = lazarus()
        .args(["launch", "--nproc", "1", "--backoff-ms", "5000", "--"])
        .args(["train", "--model", "d99", "--no-progress", "--run-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("d99") && t.contains("not restarting"), "{t}");
    assert!(!t.contains("restarting in"), "{t}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "it waited out a back-off: {t}"
    );
}
