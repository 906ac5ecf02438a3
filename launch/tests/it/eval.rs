//! `lazarus eval` (validation loss and bits per byte of a checkpoint) and `lazarus sample
//! --checkpoint`.

use super::*;

fn eval_json(args: &[&str]) -> serde_json::Value {
    let o = run(&[&["eval", "--json"], args].concat());
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn trained(tmp: &Path) -> PathBuf {
    let data = synth_data(tmp, 100_000);
    let dir = tmp.join("run");
    let mut c = lazarus();
    c.args(TINY_TRAIN).args([
        "--steps",
        "30",
        "--save-every",
        "10",
        "--keep-last",
        "5",
        "--val-batches",
        "2",
        "--data",
        data.to_str().unwrap(),
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    dir
}

#[test]
fn eval_gives_the_loss_and_bits_per_byte_of_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = trained(tmp.path());
    let d = dir.to_str().unwrap();
    // The windows the loop validated on (2 batches of 4) give its validation loss.
    let e = eval_json(&["--run-dir", d, "--checkpoint", "30", "--max-windows", "8"]);
    let val = final_metrics(&dir)["val_loss"].as_f64().unwrap();
    let loss = e["loss"].as_f64().unwrap();
    assert!(
        (loss - val).abs() < 1e-5 * val,
        "eval {loss} vs training's {val}"
    );
    assert_eq!(
        (e["windows"].as_u64(), e["tokens"].as_u64()),
        (Some(8), Some(8 * 16))
    );
    // Byte-level data: one byte per token, so bits per byte are bits per token.
    assert_eq!(e["bytes_per_token"], 1.0);
    let bpb = e["bits_per_byte"].as_f64().unwrap();
    assert!((bpb - loss / std::f64::consts::LN_2).abs() < 1e-9, "{e}");
    // By default: the newest checkpoint on the whole validation split; earlier ones are worse.
    let all = eval_json(&["--run-dir", d]);
    assert_eq!(all["step"], 30);
    assert!(all["windows"].as_u64().unwrap() > 8, "{all}");
    let early = eval_json(&["--run-dir", d, "--checkpoint", "10"]);
    assert!(
        early["loss"].as_f64() > all["loss"].as_f64(),
        "{early} vs {all}"
    );
    let o = run(&["eval", "--run-dir", d]);
    assert!(text(&o).contains("bits/byte"), "{}", text(&o));
    // A step without a committed checkpoint, and a directory that is no run.
    let o = run(&["eval", "--run-dir", d, "--checkpoint", "7"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("no committed checkpoint of step 7")
            && t.contains("committed steps: 10, 20, 30"),
        "{t}"
    );
    assert_eq!(t.trim().lines().count(), 1, "{t}");
    let o = run(&["eval", "--run-dir", tmp.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("is not a run directory"), "{}", text(&o));
    let o = run(&["eval", "--run-dir", d, "--stage", "x"]);
    assert!(text(&o).contains("a run without stages"), "{}", text(&o));
}

#[test]
fn bits_per_byte_of_gpt2_tokens_count_the_bytes_of_each_token() {
    let tmp = tempfile::tempdir().unwrap();
    let txt = tmp.path().join("book.txt");
    std::fs::write(
        &txt,
        "It was the best of times, it was the worst of times. ".repeat(300),
    )
    .unwrap();
    let data = tmp.path().join("gpt2");
    let o = run(&[
        "data",
        "prepare",
        "--text",
        txt.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let dir = tmp.path().join("run");
    let mut c = lazarus();
    c.args(TINY_TRAIN).args([
        "--steps",
        "2",
        "--data",
        data.to_str().unwrap(),
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(c.output().unwrap().status.success());
    let e = eval_json(&["--run-dir", dir.to_str().unwrap()]);
    let (loss, bpt, bpb) = (
        e["loss"].as_f64().unwrap(),
        e["bytes_per_token"].as_f64().unwrap(),
        e["bits_per_byte"].as_f64().unwrap(),
    );
    // English BPE tokens are several bytes long; bits per byte divide by that.
    assert!((2.0..6.0).contains(&bpt), "{e}");
    assert!(
        (bpb - loss / std::f64::consts::LN_2 / bpt).abs() < 1e-9,
        "{e}"
    );
}

#[test]
fn sample_takes_the_weights_of_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = trained(tmp.path());
    let d = dir.to_str().unwrap();
    let greedy = |extra: &[&str]| {
        let base = [
            "sample",
            "--run-dir",
            d,
            "--prompt",
            "The ",
            "--tokens",
            "24",
            "--temperature",
            "0",
        ];
        let o = run(&[&base[..], extra].concat());
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // The final checkpoint holds the final weights.
    let last = greedy(&["--checkpoint", "30"]);
    assert_eq!(last, greedy(&[]));
    // 24 byte tokens after the prompt (a tiny model may well generate spaces).
    assert!(
        last.starts_with("The ") && last.len() > "The ".len() + 24,
        "{last:?}"
    );
    let first = greedy(&["--checkpoint", "10"]);
    assert!(first.starts_with("The "), "{first}");
    let o = run(&["sample", "--run-dir", d, "--checkpoint", "99"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("no committed checkpoint of step 99"),
        "{}",
        text(&o)
    );
}
