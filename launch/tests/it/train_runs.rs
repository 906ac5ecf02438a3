//! Training runs from the command line: determinism, run-directory files, sampling.

use super::*;

fn train_d2(data: &Path, run_dir: &Path, steps: u32, seed: u32) -> Output {
    run(&[
        "train",
        "--model",
        "d2",
        "--steps",
        &steps.to_string(),
        "--seed",
        &seed.to_string(),
        "--data",
        data.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--batch",
        "4",
        "--seq",
        "32",
        "--log-every",
        "50",
    ])
}

#[test]
fn two_runs_with_the_same_seed_are_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 200_000);
    let (a, b, c) = (
        tmp.path().join("A"),
        tmp.path().join("B"),
        tmp.path().join("C"),
    );
    for (dir, seed) in [(&a, 1), (&b, 1), (&c, 2)] {
        let o = train_d2(&data, dir, 200, seed);
        assert!(o.status.success(), "{}", text(&o));
    }
    let (ma, mb, mc) = (final_metrics(&a), final_metrics(&b), final_metrics(&c));
    assert_eq!(ma["params_sha256"], mb["params_sha256"]);
    assert_ne!(ma["params_sha256"], mc["params_sha256"]);
    assert_eq!(ma["step"], 200);
    assert_eq!(ma["tokens"], 200 * 4 * 32);
    // The hash in final_metrics.json is the hash of the saved final weights.
    let bytes = std::fs::read(a.join("final_params.bin")).unwrap();
    let digest = {
        use std::fmt::Write;
        let d = sha256(&bytes);
        d.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    assert_eq!(ma["params_sha256"], serde_json::Value::String(digest));
    for f in [
        "config.toml",
        "metrics.jsonl",
        "training_complete.marker",
        "model.json",
    ] {
        assert!(a.join(f).exists(), "{f} missing");
    }
    // Loss went down on the learnable synthetic corpus.
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(a.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(ma["final_loss"].as_f64().unwrap() < first["loss"].as_f64().unwrap());
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    // Minimal use of the system's sha256sum keeps the test free of another dependency.
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

#[test]
fn config_file_is_read_and_flags_win() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 100_000);
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"d2\"\nsteps = 7\nseq = 16\nbatch = 2\ndata = {:?}\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let rd = tmp.path().join("R");
    let o = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "3",
        "--run-dir",
        rd.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(final_metrics(&rd)["step"], 3);
    let resolved = std::fs::read_to_string(rd.join("config.toml")).unwrap();
    assert!(
        resolved.contains("steps = 3") && resolved.contains("seq = 16"),
        "{resolved}"
    );
}

#[test]
fn sample_continues_a_prompt_from_final_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 100_000);
    let rd = tmp.path().join("S");
    let o = train_d2(&data, &rd, 20, 3);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&[
        "sample",
        "--run-dir",
        rd.to_str().unwrap(),
        "--prompt",
        "The cat",
        "--tokens",
        "40",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("The cat"), "{out}");
    assert!(out.trim_end().len() > "The cat".len() + 10, "{out}");
}

#[test]
fn data_prepare_tokenises_text_with_gpt2_and_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let txt = tmp.path().join("book.txt");
    std::fs::write(
        &txt,
        "It was the best of times, it was the worst of times. ".repeat(200),
    )
    .unwrap();
    for tok in ["gpt2", "bytes"] {
        let out = tmp.path().join(tok);
        let o = run(&[
            "data",
            "prepare",
            "--text",
            txt.to_str().unwrap(),
            "--tokenizer",
            tok,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let train = std::fs::read(out.join("book_train_000000.bin")).unwrap();
        let vocab = i32::from_le_bytes(train[12..16].try_into().unwrap());
        assert_eq!(vocab, if tok == "gpt2" { 50257 } else { 256 });
        assert!(out.join("book_val_000000.bin").exists());
    }
    // A GPT-2-tokenised file trains a (tiny) model with the padded vocabulary.
    let rd = tmp.path().join("G");
    let o = run(&[
        "train",
        "--model",
        "d2",
        "--channels",
        "32",
        "--heads",
        "2",
        "--steps",
        "2",
        "--seq",
        "16",
        "--batch",
        "2",
        "--data",
        tmp.path().join("gpt2").to_str().unwrap(),
        "--run-dir",
        rd.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("vocab 50257 (padded 50304)"),
        "{}",
        text(&o)
    );
}

#[test]
fn embedded_default_run_halves_the_loss() {
    // `lazarus train` with no arguments, in an empty directory: it must make its own data and
    // train the default model until the loss has fallen by at least half.
    let tmp = tempfile::tempdir().unwrap();
    let o = lazarus()
        .arg("train")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(tmp
        .path()
        .join("data/synth/synth_train_000000.bin")
        .exists());
    let rd = tmp.path().join("runs/default");
    let metrics = std::fs::read_to_string(rd.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(first["step"], 1);
    let fm = final_metrics(&rd);
    let (l0, l1) = (
        first["loss"].as_f64().unwrap(),
        fm["final_loss"].as_f64().unwrap(),
    );
    assert!(l1 <= l0 / 2.0, "loss fell only from {l0} to {l1}");
}
