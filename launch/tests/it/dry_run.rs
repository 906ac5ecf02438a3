//! `lazarus train --dry-run`: a d12 batch that cannot fit a stated memory budget fails with the
//! numbers; one that fits prints the estimate and writes nothing; the estimate is within 20% of
//! the peak resident memory of the real run; the run directory's checkpoints are checked.

use super::*;
use std::process::Stdio;

/// The "total per rank ... (N bytes)" number of a dry run's output.
fn per_rank_bytes(out: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.contains("total per rank"))
        .unwrap_or_else(|| panic!("no total in: {out}"));
    let inner = line.split('(').nth(1).unwrap().split(' ').next().unwrap();
    inner.parse().unwrap()
}

fn dry(data: &Path, dir: &Path, extra: &[&str]) -> Output {
    let mut c = lazarus();
    c.args(["train", "--dry-run", "--data", data.to_str().unwrap()])
        .args(["--run-dir", dir.to_str().unwrap()])
        .args(extra);
    c.output().unwrap()
}

#[test]
fn d12_batch_that_cannot_fit_fails_with_the_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 300_000);
    let dir = tmp.path().join("run");
    let o = dry(
        &data,
        &dir,
        &[
            "--model",
            "d12",
            "--batch",
            "32",
            "--seq",
            "1024",
            "--memory-budget-gib",
            "8",
        ],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    let err = t.lines().find(|l| l.starts_with("error: ")).expect(&t);
    for needle in [
        "batch 32 x seq 1024 does not fit",
        "activations",
        "8.00 GiB (8589934592 bytes, --memory-budget-gib)",
        "at most --batch",
    ] {
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    }
    // The number in the error is the estimate printed above it, and it exceeds the budget.
    let need: u64 = err
        .split("need ")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect(err);
    assert_eq!(need, per_rank_bytes(&t));
    assert!(need > 8 << 30);
    // The advised batch does fit.
    let advised: String = err
        .split("at most --batch ")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let o = dry(
        &data,
        &dir,
        &[
            "--model",
            "d12",
            "--batch",
            &advised,
            "--seq",
            "1024",
            "--memory-budget-gib",
            "8",
            "--dry-run-steps",
            "0",
        ],
    );
    assert!(o.status.success(), "batch {advised}: {}", text(&o));
    assert!(!dir.exists(), "a dry run writes nothing");
}

#[test]
fn d12_batch_that_fits_prints_the_estimate_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 100_000);
    let dir = tmp.path().join("run");
    let o = dry(
        &data,
        &dir,
        &[
            "--model",
            "d12",
            "--batch",
            "1",
            "--seq",
            "32",
            "--memory-budget-gib",
            "64",
            "--dry-run-steps",
            "1",
        ],
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for needle in [
        "85.2", // million parameters of d12 with a byte vocabulary and block size 32
        "parameters ",
        "gradients ",
        "optimizer state (AdamW m, v)",
        "activations ",
        "checkpoint staging ",
        "one checkpoint is",
        "fits",
        "writable",
        "no committed checkpoint",
        "time per step",
        "all checks passed",
    ] {
        assert!(t.contains(needle), "expected `{needle}` in: {t}");
    }
    // The estimate covers at least the f32 parameters, gradients, m, v and staged copies.
    let n = 85_277_184u64; // d12, vocab 256, block 32
    assert!(per_rank_bytes(&t) > 4 * n * 9, "{t}");
    assert!(!dir.exists(), "a dry run writes nothing");
}

/// Peak resident memory of a child process, from wait4's rusage.
// The child is reaped by wait4, which std's Child does not know about.
#[allow(clippy::zombie_processes)]
fn run_peak_rss(mut c: Command) -> (std::process::ExitStatus, u64) {
    let child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child with valid out-pointers.
    let rc = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    assert_eq!(rc, child.id() as libc::pid_t);
    use std::os::unix::process::ExitStatusExt;
    (
        std::process::ExitStatus::from_raw(status),
        ru.ru_maxrss as u64 * 1024,
    )
}

#[test]
fn estimate_is_within_20_percent_of_the_real_runs_peak_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 100_000);
    for (i, shape) in [
        ["--batch", "1", "--ranks", "1"],
        ["--batch", "4", "--ranks", "2"],
    ]
    .iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("run{i}"));
        let model = ["--model", "d6", "--seq", "64"];
        let o = dry(
            &data,
            &dir,
            &[&model[..], &shape[..], &["--dry-run-steps", "0"]].concat(),
        );
        assert!(o.status.success(), "{}", text(&o));
        let ranks: u64 = shape[3].parse().unwrap();
        let estimate = per_rank_bytes(&text(&o)) * ranks;
        let mut c = lazarus();
        c.args(["train", "--steps", "2", "--val-batches", "1"])
            .args(model)
            .args(shape)
            .args([
                "--data",
                data.to_str().unwrap(),
                "--run-dir",
                dir.to_str().unwrap(),
            ]);
        let (st, peak) = run_peak_rss(c);
        assert!(st.success(), "{shape:?}: {st}");
        let ratio = peak as f64 / estimate as f64;
        assert!(
            (0.8..=1.2).contains(&ratio),
            "{shape:?}: peak RSS {peak} bytes vs estimate {estimate}: ratio {ratio:.3}"
        );
    }
}

#[test]
fn run_directory_checkpoints_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 50_000);
    let dir = tmp.path().join("run");
    let mut c = lazarus();
    c.args(TINY_TRAIN).args([
        "--steps",
        "4",
        "--data",
        data.to_str().unwrap(),
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(c.output().unwrap().status.success());
    let tiny = &TINY_TRAIN[1..];
    // The same shape resumes.
    let o = dry(
        &data,
        &dir,
        &[tiny, &["--steps", "8", "--dry-run-steps", "0"]].concat(),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("newest step 4 of 4"), "{}", text(&o));
    assert!(
        text(&o).contains("compatible, training resumes there"),
        "{}",
        text(&o)
    );
    // Another shape would be refused by training, so the dry run fails.
    let mut wider = tiny.to_vec();
    let at = wider.iter().position(|a| *a == "--channels").unwrap();
    wider[at + 1] = "64";
    wider.extend(["--dry-run-steps", "0"]);
    let o = dry(&data, &dir, &wider);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("training would refuse it") && text(&o).contains("64 channels"),
        "{}",
        text(&o)
    );
    // --resume never with committed checkpoints, and a run directory under a file.
    let o = dry(
        &data,
        &dir,
        &[tiny, &["--resume", "never", "--dry-run-steps", "0"]].concat(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("--resume never"), "{}", text(&o));
    let file = tmp.path().join("a_file");
    std::fs::write(&file, b"x").unwrap();
    let o = dry(
        &data,
        &file.join("run"),
        &[tiny, &["--dry-run-steps", "0"]].concat(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("is not a directory"), "{}", text(&o));
}

/// `--dry-run --device cuda`: in a build without CUDA, or on a machine without a GPU, the dry
/// run stops with an error that says which; with a GPU (a build with `cuda`, a device present)
/// a d12 batch far beyond the GPU's memory fails with the device numbers and a batch that fits.
#[test]
fn dry_run_on_cuda_checks_the_gpu_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 300_000);
    let dir = tmp.path().join("run");
    let args = ["--device", "cuda", "--model", "d12", "--seq", "1024"];
    let o = dry(&data, &dir, &[&args[..], &["--batch", "4096"]].concat());
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    let err = t.lines().find(|l| l.starts_with("error: ")).expect(&t);
    if !t.contains("GPU memory per rank") {
        assert!(
            err.contains("--features cuda") || err.contains("libcuda.so.1"),
            "a run that cannot reach a GPU says why: {err}"
        );
        assert!(!dir.exists(), "nothing is written");
        return;
    }
    for needle in [
        "batch 4096 x seq 1024 does not fit on the GPU",
        "activations",
        "free",
        "at most --batch",
    ] {
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    }
    let o = dry(
        &data,
        &dir,
        &[&args[..], &["--batch", "1", "--dry-run-steps", "0"]].concat(),
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("fits") && t.contains("pinned snapshot"), "{t}");
}
