//! Data-parallel training across ranks (threads in one process, and MPI processes when built
//! with the `mpi` feature): same loss curve as one rank, bit-identical repeats and resumes at the
//! same world size, and resumes onto another world size.

use super::*;

/// Tolerances between world sizes, where only f32 rounding of the gradient sums differs:
/// per-step loss within 1e-3 relative, final parameters within 1e-4 absolute.
const LOSS_REL_TOL: f64 = 1e-3;
const PARAM_ABS_TOL: f32 = 1e-4;

pub fn train_ranks(data: &Path, dir: &Path, ranks: usize, extra: &[&str]) -> Output {
    let mut c = lazarus();
    c.args([
        "train",
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
        "--steps",
        "40",
    ])
    .args([
        "--save-every",
        "10",
        "--log-every",
        "5",
        "--ranks",
        &ranks.to_string(),
    ])
    .args([
        "--data",
        data.to_str().unwrap(),
        "--run-dir",
        dir.to_str().unwrap(),
    ])
    .args(extra);
    c.output().unwrap()
}

fn ok(o: Output) {
    assert!(o.status.success(), "{}", text(&o));
}

pub fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        // Live stats records (`"kind": "stats"`) sit between the step records.
        .filter(|v| v.get("kind").is_none())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

pub fn params(dir: &Path) -> Vec<f32> {
    std::fs::read(dir.join("final_params.bin"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn assert_close(a: &Path, b: &Path) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(
        la.iter().map(|x| x.0).collect::<Vec<_>>(),
        lb.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    for ((s, x), (_, y)) in la.iter().zip(&lb) {
        assert!(
            (x - y).abs() <= LOSS_REL_TOL * x.abs(),
            "step {s}: loss {x} vs {y}"
        );
    }
    let (pa, pb) = (params(a), params(b));
    let worst = pa
        .iter()
        .zip(&pb)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= PARAM_ABS_TOL, "parameters differ by up to {worst}");
}

#[test]
fn four_thread_ranks_match_one_rank_and_repeat_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 200_000);
    let one = tmp.path().join("one");
    let (four, again) = (tmp.path().join("four"), tmp.path().join("again"));
    ok(train_ranks(&data, &one, 1, &[]));
    ok(train_ranks(&data, &four, 4, &[]));
    ok(train_ranks(&data, &again, 4, &[]));
    assert_close(&one, &four);
    assert_eq!(
        final_metrics(&four)["params_sha256"],
        final_metrics(&again)["params_sha256"]
    );
    // Each rank wrote its own shard.
    let step = four.join("checkpoints/step_000000040");
    for r in 0..4 {
        assert!(step
            .join(format!("shard-0000{r}-of-00004.safetensors"))
            .exists());
    }
}

#[test]
fn resume_at_the_same_world_size_is_bit_identical_and_reshard_resumes_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 200_000);
    let whole = tmp.path().join("whole");
    ok(train_ranks(&data, &whole, 4, &[]));
    let cut = tmp.path().join("cut");
    ok(train_ranks(&data, &cut, 4, &["--stop-at", "20"]));
    ok(train_ranks(&data, &cut, 4, &[]));
    assert_eq!(
        final_metrics(&whole)["params_sha256"],
        final_metrics(&cut)["params_sha256"]
    );
    for (from, to) in [(4, 2), (2, 4), (4, 3)] {
        let dir = tmp.path().join(format!("reshard-{from}-{to}"));
        ok(train_ranks(&data, &dir, from, &["--stop-at", "20"]));
        let o = train_ranks(&data, &dir, to, &[]);
        assert!(o.status.success(), "{from}->{to}: {}", text(&o));
        assert!(
            text(&o).contains(&format!("written by {from} rank(s)")),
            "{}",
            text(&o)
        );
        assert_close(&whole, &dir);
    }
}

#[test]
fn batch_not_divisible_by_ranks_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 50_000);
    let o = train_ranks(&data, &tmp.path().join("x"), 5, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("multiple of the number of ranks"),
        "{}",
        text(&o)
    );
}
