//! Bad input gets a one-line error naming the problem, and exit code 2 (usage) or 1.

use super::*;

fn assert_fails(o: &Output, code: i32, needles: &[&str]) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(code), "{t}");
    for n in needles {
        assert!(t.contains(n), "expected `{n}` in: {t}");
    }
    assert!(!t.contains("panicked"), "{t}");
}

/// `lazarus train` of one d2 step on `data` into run directory `rd`, with `extra` flags.
fn train_on(data: &Path, rd: &Path, extra: &[&str]) -> Output {
    let (data, rd) = (data.to_str().unwrap(), rd.to_str().unwrap());
    let mut args = vec!["train", "--model", "d2", "--steps", "1"];
    args.extend_from_slice(extra);
    args.extend(["--data", data, "--run-dir", rd]);
    run(&args)
}

#[test]
fn bad_token_files_are_named_and_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 50_000);
    let train = data.join("synth_train_000000.bin");
    let bytes = std::fs::read(&train).unwrap();
    let truncated = tmp.path().join("trunc_train.bin");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let rd = tmp.path().join("r");
    let o = train_on(&truncated, &rd, &[]);
    assert_fails(&o, 1, &["trunc_train.bin", "truncated"]);
    let garbage = tmp.path().join("garbage.bin");
    std::fs::write(&garbage, vec![0xABu8; 5000]).unwrap();
    let o = train_on(&garbage, &rd, &[]);
    assert_fails(&o, 1, &["garbage.bin", "magic"]);
    let missing = tmp.path().join("missing_train.bin");
    let o = train_on(&missing, &rd, &[]);
    assert_fails(&o, 1, &["missing_train.bin", "os error 2"]);
    // The OS error is named once, not again as the cause of the message that holds it.
    assert_eq!(text(&o).matches("os error 2").count(), 1, "{}", text(&o));
}

#[test]
fn usage_errors_exit_2() {
    let o = run(&["train", "--model", "d7", "--steps", "1"]);
    assert_fails(&o, 2, &["unknown model preset `d7`"]);
    let o = run(&["train", "--steps", "-5"]);
    assert_fails(&o, 2, &["--steps", "positive"]);
    let o = run(&["train", "--bogus-flag"]);
    assert_fails(&o, 2, &["--bogus-flag"]);
}

#[test]
fn unwritable_run_directory_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 50_000);
    let file = tmp.path().join("a_file");
    std::fs::write(&file, b"x").unwrap();
    let rd = file.join("run");
    let o = run(&[
        "train",
        "--model",
        "d2",
        "--steps",
        "1",
        "--data",
        data.to_str().unwrap(),
        "--run-dir",
        rd.to_str().unwrap(),
    ]);
    assert_fails(&o, 1, &["run directory", "a_file"]);
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    let o = run(&["train", "--device", "cuda", "--steps", "1"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("CUDA") || t.contains("cuda"), "{t}");
}

#[test]
fn bf16_needs_the_gpu_and_an_unknown_precision_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 50_000);
    let rd = tmp.path().join("r");
    let o = train_on(&data, &rd, &["--precision", "bf16"]);
    assert_fails(
        &o,
        2,
        &["precision bf16 needs device cuda", "--device cuda"],
    );
    assert!(!rd.exists(), "nothing is written");
    let o = run(&["train", "--precision", "fp8", "--steps", "1"]);
    assert_fails(&o, 2, &["--precision", "fp8"]);
}
