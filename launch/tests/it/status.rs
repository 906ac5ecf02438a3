//! `lazarus status` on runs that are complete, stopped, running and failed.

use super::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn tiny(data: &Path, dir: &Path, extra: &[&str]) -> Command {
    let mut c = lazarus();
    c.args(TINY_TRAIN)
        .args([
            "--data",
            data.to_str().unwrap(),
            "--run-dir",
            dir.to_str().unwrap(),
            "--save-every",
            "10",
        ])
        .args(extra);
    c
}

fn status_json(dir: &Path) -> (Option<i32>, serde_json::Value) {
    let o = run(&["status", dir.to_str().unwrap(), "--json"]);
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
    (o.status.code(), v)
}

#[test]
fn status_reports_complete_stopped_running_and_failed_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 100_000);
    let done = tmp.path().join("done");
    assert!(tiny(&data, &done, &["--steps", "20"])
        .output()
        .unwrap()
        .status
        .success());
    let (code, s) = status_json(&done);
    assert_eq!(code, Some(0), "{s}");
    assert_eq!(
        (
            s["state"].as_str(),
            s["step"].as_u64(),
            s["total_steps"].as_u64()
        ),
        (Some("complete"), Some(20), Some(20))
    );
    assert_eq!(s["newest_commit"], 20);
    assert!(s["loss"].as_f64().is_some() && s["tokens"].as_u64() == Some(20 * 4 * 16));
    let o = run(&["status", done.to_str().unwrap()]);
    assert!(text(&o).contains("step       20 of 20"), "{}", text(&o));

    let stopped = tmp.path().join("stopped");
    assert!(tiny(&data, &stopped, &["--steps", "40", "--stop-at", "10"])
        .output()
        .unwrap()
        .status
        .success());
    let (code, s) = status_json(&stopped);
    assert_eq!(code, Some(4), "{s}");
    assert_eq!(
        (s["state"].as_str(), s["newest_commit"].as_u64()),
        (Some("stopped"), Some(10))
    );

    // A failure after the run directory exists is recorded and reported.
    let o = tiny(
        &data,
        &stopped,
        &["--steps", "40", "--resume", "/nonexistent/ckpt"],
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let (code, s) = status_json(&stopped);
    assert_eq!(code, Some(1), "{s}");
    assert!(
        s["last_error"].as_str().unwrap().contains("cannot resume"),
        "{s}"
    );

    let running = tmp.path().join("running");
    let mut child = tiny(&data, &running, &["--steps", "1000000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !running.join("training_state.json").exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, s) = status_json(&running);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(code, Some(3), "{s}");
    assert_eq!(s["state"], "running");
    assert!(
        s["eta_s"].as_u64().is_some()
            && s["holder"]
                .as_str()
                .unwrap()
                .contains(&child.id().to_string()),
        "{s}"
    );

    let o = run(&["status", tmp.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("is not a run directory"), "{}", text(&o));
}
