//! Curriculum stages: a three-stage run (sequence length 64 -> 128 -> 256) under `lazarus
//! launch` with SIGKILLs in every stage ends bit-identical to an uninterrupted run; stages run
//! alone, stop and resume, are listed and reported by `status`; bad stage input is a clear error.

use super::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A staged config over `data`: three stages of `steps` steps each with the given model keys.
fn staged_config(dir: &Path, data: &Path, model_keys: &str, steps: u64) -> PathBuf {
    let path = dir.join("staged.toml");
    let text = format!(
        r#"model = "d2"
{model_keys}
data = {data:?}
seed = 11
save_every = 5
keep_last = 2
log_every = 1000

[[stages]]
name = "short"
steps = {steps}
seq = 64
batch = 4

[[stages]]
name = "mid"
steps = {steps}
seq = 128
batch = 2
lr = 5e-4
init_from = "weights"

[[stages]]
name = "long"
steps = {steps}
seq = 256
batch = 1
warmup_steps = 0
init_from = "weights_and_optimizer"
"#,
        data = data.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn train_staged(cfg: &Path, dir: &Path, extra: &[&str]) -> Output {
    let mut c = lazarus();
    c.args(["train", "--config", cfg.to_str().unwrap()])
        .args(["--run-dir", dir.to_str().unwrap()])
        .args(extra);
    c.output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

fn sha(dir: &Path) -> String {
    final_metrics(dir)["params_sha256"]
        .as_str()
        .unwrap()
        .to_string()
}

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Pids of the rank process of the run in `dir` (not the supervisor).
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
        if args.iter().any(|a| a == "train")
            && !args.iter().any(|a| a == "launch")
            && args.iter().any(|a| a == &needle)
        {
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

#[test]
fn three_stage_run_survives_sigkills_in_each_stage_under_launch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 200_000);
    let steps = 30;
    let cfg = staged_config(tmp.path(), &data, "", steps);
    let reference = tmp.path().join("reference");
    ok(train_staged(&cfg, &reference, &[]));
    let dir = tmp.path().join("supervised");
    let mut sup = lazarus()
        .args([
            "launch",
            "--nproc",
            "1",
            "--restarts-max",
            "10",
            "--backoff-max-ms",
            "100",
            "--",
        ])
        .args(["train", "--config", cfg.to_str().unwrap()])
        .args(["--run-dir", dir.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Run steps of the whole run: stage `short` is 1..=30, `mid` 31..=60, `long` 61..=90. The
    // second kill lands in `mid` before (or about at) its first commit, so that stage starts
    // again from `short`'s final checkpoint; the others resume from their own commits.
    let kill_at = [12, 32, 47, 75];
    let t0 = Instant::now();
    let mut killed_at = Vec::new();
    for at in kill_at {
        loop {
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "the supervised run stalled before run step {at}"
            );
            assert!(
                sup.try_wait().unwrap().is_none(),
                "the supervisor ended before run step {at}"
            );
            if heartbeat(&dir) >= at && !rank_pids(&dir).is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for p in rank_pids(&dir) {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
        killed_at.push(heartbeat(&dir));
    }
    // One kill in `short`, two in `mid`, one in `long`.
    let stage_of = |step: u64| (step - 1) / steps;
    let stages: Vec<u64> = killed_at.iter().map(|&s| stage_of(s)).collect();
    assert_eq!(stages, [0, 1, 1, 2], "killed at run steps {killed_at:?}");
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
    let out = text(&o);
    assert!(out.matches("restarting").count() >= kill_at.len(), "{out}");
    assert!(out.contains("stage 2 of 3 `mid`"), "{out}");
    assert_eq!(sha(&dir), sha(&reference));
    let fm = final_metrics(&dir);
    assert_eq!(fm["step"], 3 * steps);
    // Tokens of all stages: 30 x (4 x 64 + 2 x 128 + 1 x 256).
    assert_eq!(fm["tokens"], 30 * 768);
    let state = json_file(&dir.join("training_state.json"));
    assert_eq!(state["complete"], true, "{state}");
    assert_eq!(state["stage"]["name"], "long", "{state}");
    assert!(state["restarts"].as_u64().unwrap() >= 1, "{state}");
    for s in ["short", "mid", "long"] {
        assert!(
            dir.join("stages")
                .join(s)
                .join("training_complete.marker")
                .exists(),
            "stage {s} not complete"
        );
    }
    // The checkpoints record their stage.
    let m = json_file(&dir.join("stages/mid/checkpoints/step_000000030/COMMITTED"));
    assert_eq!(m["training_state"]["stage"]["name"], "mid");
    assert_eq!(m["training_state"]["config"]["seq"], 128);
    assert_eq!(m["training_state"]["model"]["block_size"], 256);
}

#[test]
fn stages_stop_resume_run_alone_and_show_in_status_and_list() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 120_000);
    let cfg = staged_config(tmp.path(), &data, "channels = 32\nheads = 2", 10);
    let reference = tmp.path().join("reference");
    ok(train_staged(&cfg, &reference, &[]));
    let dir = tmp.path().join("run");

    // Stopped in the middle of stage 2: status names the stage and counts all stages' steps.
    let out = ok(train_staged(&cfg, &dir, &["--stop-at", "14"]));
    assert!(out.contains("stopped after step 14"), "{out}");
    let o = run(&["status", dir.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (s["step"].as_u64(), s["total_steps"].as_u64()),
        (Some(14), Some(30))
    );
    assert_eq!(s["stage"]["name"], "mid", "{s}");
    assert_eq!(
        (s["stage"]["index"].as_u64(), s["stage"]["step"].as_u64()),
        (Some(1), Some(4))
    );
    let o = run(&["status", dir.to_str().unwrap()]);
    assert!(
        text(&o).contains("stage      2 of 3 `mid`, step 4 of 10"),
        "{}",
        text(&o)
    );

    // Stage 3 alone cannot start before stage 2 has finished; nothing is written for it.
    let o = train_staged(&cfg, &dir, &["--stage", "long"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("run stage `mid` to its end first"),
        "{}",
        text(&o)
    );
    assert!(!dir.join("stages/long").exists());

    // Stage 2 alone resumes where it stopped and ends; the run as a whole is not complete.
    let out = ok(train_staged(&cfg, &dir, &["--stage", "mid"]));
    assert!(out.contains("resumed from"), "{out}");
    assert!(!out.contains("stage 3 of 3"), "{out}");
    assert!(dir.join("stages/mid/training_complete.marker").exists());
    assert!(!dir.join("training_complete.marker").exists());
    let o = train_staged(&cfg, &dir, &["--list-stages"]);
    let list = ok(o);
    let state_of = |name: &str| {
        list.lines()
            .find(|l| l.contains(&format!(" {name} ")))
            .unwrap_or_else(|| panic!("{name} not in {list}"))
            .to_string()
    };
    assert!(state_of("short").ends_with("complete"), "{list}");
    assert!(state_of("mid").ends_with("complete"), "{list}");
    assert!(state_of("long").ends_with("not started"), "{list}");
    assert!(state_of("mid").contains("weights "), "{list}");
    assert!(state_of("long").contains("21-30"), "{list}");

    // The rest of the run skips the finished stages and ends where the uninterrupted run did.
    let out = ok(train_staged(&cfg, &dir, &[]));
    assert!(out.contains("stage 1 of 3 `short` is complete"), "{out}");
    assert!(out.contains("stage 3 of 3 `long`: 10 steps"), "{out}");
    assert_eq!(sha(&dir), sha(&reference));
    let o = run(&["status", dir.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (s["state"].as_str(), s["step"].as_u64()),
        (Some("complete"), Some(30))
    );
    // The final weights of the whole run are sampled from as in a run without stages.
    let o = run(&[
        "sample",
        "--run-dir",
        dir.to_str().unwrap(),
        "--tokens",
        "8",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // eval takes the last stage's newest checkpoint, or a named stage's, at its sequence length.
    let d = dir.to_str().unwrap();
    for (stage, seq) in [(None, 256), (Some("short"), 64)] {
        let mut args = vec!["eval", "--run-dir", d, "--json", "--max-windows", "4"];
        args.extend(stage.iter().flat_map(|s| ["--stage", *s]));
        let o = run(&args);
        assert!(o.status.success(), "{}", text(&o));
        let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(e["stage"], stage.unwrap_or("long"), "{e}");
        assert_eq!(
            (e["seq"].as_u64(), e["step"].as_u64()),
            (Some(seq), Some(10)),
            "{e}"
        );
    }
}

#[test]
fn bad_stage_input_is_a_clear_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 50_000);
    let cfg = staged_config(tmp.path(), &data, "channels = 32\nheads = 2", 5);
    let dir = tmp.path().join("run");
    let fails = |o: Output, code: i32, needle: &str| {
        let t = text(&o);
        assert_eq!(o.status.code(), Some(code), "{t}");
        assert!(t.contains(needle), "expected `{needle}` in: {t}");
        assert!(!t.contains("panicked"), "{t}");
        assert_eq!(t.trim().lines().count(), 1, "one line: {t}");
    };
    fails(
        train_staged(&cfg, &dir, &["--stage", "nope"]),
        2,
        "unknown stage `nope`: the config has stages short, mid, long",
    );
    fails(
        train_staged(&cfg, &dir, &["--resume", "/some/ckpt"]),
        2,
        "--resume PATH is for runs without stages",
    );
    let base = std::fs::read_to_string(&cfg).unwrap();
    let bad = |name: &str, text: String| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cases = [
        (
            bad(
                "dup.toml",
                base.replace("name = \"long\"", "name = \"mid\""),
            ),
            "two stages are named `mid`",
        ),
        (
            bad("nosteps.toml", base.replacen("steps = 5\n", "", 1)),
            "missing field `steps`",
        ),
        (
            bad(
                "first.toml",
                base.replacen("batch = 4\n", "batch = 4\ninit_from = \"weights\"\n", 1),
            ),
            "stage `short` is the first stage",
        ),
        (
            bad(
                "key.toml",
                base.replacen("batch = 4\n", "batch = 4\nsteps_typo = 3\n", 1),
            ),
            "unknown field `steps_typo`",
        ),
        (
            bad("block.toml", format!("block_size = 128\n{base}")),
            "stage `long`: seq (256) is longer than block_size (128)",
        ),
        (
            bad(
                "name.toml",
                base.replace("name = \"mid\"", "name = \"../up\""),
            ),
            "has the name `../up`",
        ),
        (
            bad("init.toml", base.replace("\"weights\"", "\"everything\"")),
            "unknown variant `everything`",
        ),
    ];
    for (path, needle) in cases {
        fails(train_staged(&path, &dir, &[]), 2, needle);
    }
    assert!(!dir.exists(), "no bad config writes anything");
    // --stage on a config without stages.
    let o = run(&[
        "train",
        "--stage",
        "mid",
        "--steps",
        "1",
        "--data",
        data.to_str().unwrap(),
    ]);
    fails(o, 2, "the config has no [[stages]]");
}

#[test]
fn staged_run_on_two_ranks_stops_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 120_000);
    let cfg = staged_config(tmp.path(), &data, "channels = 32\nheads = 2", 8);
    // Every stage's batch must divide by the two ranks.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("batch = 1\n", "batch = 2\n");
    std::fs::write(&cfg, text).unwrap();
    let reference = tmp.path().join("reference");
    ok(train_staged(&cfg, &reference, &["--ranks", "2"]));
    let dir = tmp.path().join("run");
    ok(train_staged(
        &cfg,
        &dir,
        &["--ranks", "2", "--stop-at", "13"],
    ));
    let out = ok(train_staged(&cfg, &dir, &["--ranks", "2"]));
    assert!(out.contains("resumed from"), "{out}");
    assert_eq!(sha(&dir), sha(&reference));
    assert!(dir.join("training_complete.marker").exists());
}

#[test]
fn launch_of_one_stage_with_the_run_dir_in_the_config_ends_when_that_stage_is_done() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 100_000);
    let cfg = staged_config(tmp.path(), &data, "channels = 32\nheads = 2", 6);
    let dir = tmp.path().join("from-config");
    let body = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("run_dir = {:?}\n{body}", dir.display().to_string()),
    )
    .unwrap();
    let mut child = lazarus()
        .args(["launch", "--nproc", "1", "--"])
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--stage",
            "short",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > std::time::Duration::from_secs(120) {
            let _ = child.kill();
            panic!("lazarus launch of one stage did not end: it kept restarting the stage");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("lazarus launch: training complete"), "{t}");
    assert!(!t.contains("restarting"), "{t}");
    assert!(dir.join("stages/short/training_complete.marker").exists());
    assert!(!dir.join("training_complete.marker").exists());
}
