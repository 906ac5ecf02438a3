//! `lazarus ckpt ls|verify|inspect|prune|export-hf` against checkpoints written here with the
//! checkpoint crate's API (`write_shard` + `commit`), so these tests do not depend on training.

use super::{run, text};
use lazarus_trainer::checkpoint::{
    commit, shard_file_name, step_dir_name, write_shard, Compression, Dtype, ShardMeta, TensorSpec,
    COMMITTED_FILE,
};
use lazarus_trainer::layout::Layout;
use lazarus_trainer::state::{TrainingState, ADAM_M, ADAM_V, PARAMS};
use lazarus_trainer::{ModelConfig, TrainConfig};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Output;

/// L=1, NH=2, C=8, V=10 padded to Vp=128, maxT=4: 1944 parameters.
fn tiny() -> ModelConfig {
    ModelConfig {
        layers: 1,
        heads: 2,
        channels: 8,
        vocab: 10,
        padded_vocab: 128,
        block_size: 4,
    }
}

fn layout() -> Layout {
    Layout::gpt2(&tiny())
}

/// Parameter `i` of the checkpoint of step `step`: exact in f32, and different in every step,
/// so an exported value names the step and the flat index it came from.
fn param(step: u64, i: usize) -> f32 {
    (step as usize * 10_000 + i) as f32
}

fn state_json(step: u64, world: usize) -> serde_json::Value {
    let model = tiny();
    let state = TrainingState {
        step,
        total_steps: 100,
        optimizer_steps: step,
        samples: step * 8,
        tokens: step * 32,
        epoch: 0,
        position: step * 8,
        lr: 1e-3,
        model,
        layout_hash: layout().hash(),
        world_size: world,
        config: TrainConfig::default(),
        metrics: Vec::new(),
        restarts: 0,
        stage: None,
    };
    let mut v = serde_json::to_value(&state).expect("a training state serializes");
    v["metrics"] = json!([{"step": step, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75,
        "ms": 12.0, "tokens_per_s": 2000.0}]);
    v
}

/// Writes the shards of `ranks` (of `world`) for `step`: ZeRO-1 slices of params, m and v.
fn write_shards(root: &Path, step: u64, world: usize, ranks: &[usize]) -> PathBuf {
    let (total, hash) = (layout().total, layout().hash());
    let dir = root.join(step_dir_name(step));
    let per = total.div_ceil(world);
    for &r in ranks {
        let own = (r * per).min(total)..((r + 1) * per).min(total);
        // m and v are scaled copies of the parameters: distinct arrays, predictable values.
        let arrays: [(&str, f32); 3] = [(PARAMS, 1.0), (ADAM_M, 0.5), (ADAM_V, 0.25)];
        let specs: Vec<TensorSpec> = arrays
            .iter()
            .map(|(n, _)| {
                TensorSpec::flat(*n, Dtype::F32, own.start as u64, own.len(), total as u64)
            })
            .collect();
        let data: Vec<Vec<u8>> = arrays
            .iter()
            .map(|&(_, scale)| {
                own.clone()
                    .flat_map(|i| (param(step, i) * scale).to_le_bytes())
                    .collect()
            })
            .collect();
        let tensors: Vec<(&TensorSpec, &[u8])> = specs
            .iter()
            .zip(&data)
            .map(|(s, d)| (s, d.as_slice()))
            .collect();
        let meta = ShardMeta {
            step,
            rank: r,
            world_size: world,
            layout_hash: hash.clone(),
        };
        write_shard(&dir, &meta, &tensors, Compression::None).expect("write shard");
    }
    dir
}

/// A committed checkpoint of `step` over `world` ranks.
fn save(root: &Path, step: u64, world: usize) -> PathBuf {
    let ranks: Vec<usize> = (0..world).collect();
    let dir = write_shards(root, step, world, &ranks);
    commit(&dir, step, world, &layout().hash(), state_json(step, world)).expect("commit");
    dir
}

/// A save that never finished: rank 0 of 2 wrote its shard, nobody committed.
fn save_uncommitted(root: &Path, step: u64) -> PathBuf {
    write_shards(root, step, 2, &[0])
}

/// A step directory whose `COMMITTED` is garbage.
fn save_garbage(root: &Path, step: u64) -> PathBuf {
    let dir = write_shards(root, step, 1, &[0]);
    std::fs::write(dir.join(COMMITTED_FILE), b"{ not a manifest").unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Runs `lazarus ckpt ARGS`, asserts exit status `code` and no panic, returns stdout+stderr.
fn ckpt(args: &[&str], code: i32) -> String {
    let mut all = vec!["ckpt"];
    all.extend_from_slice(args);
    let o: Output = run(&all);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(code), "lazarus {all:?}:\n{t}");
    assert!(!t.contains("panicked"), "lazarus {all:?} panicked:\n{t}");
    t
}

/// The `STEP ... STATUS` rows of `ckpt ls`: (step, world, status).
fn ls_rows(out: &str) -> Vec<(String, String, String)> {
    out.lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // STEP WORLD SIZE(2 words) AGE(2 words) STATUS...
            (f[0].to_string(), f[1].to_string(), f[6..].join(" "))
        })
        .collect()
}

#[test]
fn ls_orders_by_step_and_shows_every_status() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let root = run_dir.join("checkpoints");
    // Created newest step first, so modification times run opposite to steps.
    save(&root, 30, 2);
    save_uncommitted(&root, 25);
    save(&root, 20, 1);
    save_garbage(&root, 15);
    save(&root, 10, 2);

    let out = ckpt(&["ls", s(&run_dir)], 0);
    let rows = ls_rows(&out);
    let steps: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(steps, ["10", "15", "20", "25", "30"], "{out}");
    assert_eq!(rows[0].1, "2");
    assert_eq!(rows[0].2, "committed");
    assert_eq!(rows[1].1, "-");
    assert!(rows[1].2.starts_with("invalid: "), "{out}");
    assert!(rows[1].2.contains("step_000000015"), "{out}");
    assert_eq!((rows[2].1.as_str(), rows[2].2.as_str()), ("1", "committed"));
    assert_eq!(rows[3].2, "uncommitted");
    assert_eq!(rows[4].2, "committed");
    assert!(
        out.contains("3 committed, 1 uncommitted, 1 invalid"),
        "{out}"
    );
    assert!(out.contains("KiB") && out.contains("s ago"), "{out}");

    // The checkpoints folder itself is accepted too, and --json says the same.
    let json: serde_json::Value =
        serde_json::from_str(&ckpt(&["ls", s(&root), "--json"], 0)).expect("ls --json is JSON");
    let rows = json.as_array().expect("an array");
    let steps: Vec<u64> = rows.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [10, 15, 20, 25, 30]);
    let status: Vec<&str> = rows.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(
        status,
        [
            "committed",
            "invalid",
            "committed",
            "uncommitted",
            "committed"
        ]
    );
    assert_eq!(rows[2]["world_size"], 1);
    assert!(rows[1]["reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(rows[0]["size_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn ls_and_friends_explain_empty_and_missing_run_dirs() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("fresh");
    std::fs::create_dir_all(&empty).unwrap();
    let out = ckpt(&["ls", s(&empty)], 0);
    assert!(
        out.contains("no checkpoints in") && out.contains("does not exist"),
        "{out}"
    );
    assert_eq!(ckpt(&["ls", s(&empty), "--json"], 0).trim(), "[]");
    let out = ckpt(&["verify", s(&empty)], 1);
    assert!(out.contains("no committed checkpoint in"), "{out}");
    let out = ckpt(
        &["export-hf", s(&empty), "--out", s(&tmp.path().join("hf"))],
        1,
    );
    assert!(out.contains("no committed checkpoint in"), "{out}");

    let missing = tmp.path().join("nope");
    for sub in ["ls", "verify", "inspect"] {
        let out = ckpt(&[sub, s(&missing)], 1);
        assert!(
            out.contains("does not exist") && out.contains(s(&missing)),
            "{sub}: {out}"
        );
        assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
    }
    let out = ckpt(&["prune", s(&missing), "--keep-last", "1"], 1);
    assert!(out.contains("does not exist"), "{out}");
    assert!(!missing.exists(), "prune must not create the run directory");
}

#[test]
fn verify_passes_then_names_the_damaged_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let root = run_dir.join("checkpoints");
    save(&root, 10, 2);
    let newest = save(&root, 20, 2);
    save_uncommitted(&root, 25);

    let out = ckpt(&["verify", s(&run_dir)], 0);
    assert_eq!(out.matches(" OK ").count(), 2, "{out}");
    assert!(out.contains("2 checkpoints: all verified"), "{out}");
    assert!(
        out.contains("1 uncommitted step directory skipped"),
        "{out}"
    );

    // Flip one byte of tensor data in rank 1's shard of step 20.
    let shard = newest.join(shard_file_name(1, 2));
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();

    let out = ckpt(&["verify", s(&run_dir)], 1);
    let failed: Vec<&str> = out.lines().filter(|l| l.contains("FAILED")).collect();
    assert_eq!(failed.len(), 1, "{out}");
    assert!(
        failed[0].contains("20") && failed[0].contains("shard-00001-of-00002.safetensors"),
        "{out}"
    );
    assert!(failed[0].contains("checksum mismatch"), "{out}");
    assert!(
        out.lines().any(|l| l.contains("10") && l.contains(" OK ")),
        "{out}"
    );
    assert!(out.contains("1 of 2 checkpoints"), "{out}");

    ckpt(&["verify", s(&run_dir), "--step", "10"], 0);
    let out = ckpt(&["verify", s(&run_dir), "--step", "20"], 1);
    assert!(out.contains("shard-00001-of-00002"), "{out}");
    let out = ckpt(&["verify", s(&run_dir), "--step", "25"], 1);
    assert!(out.contains("not committed"), "{out}");
    let out = ckpt(&["verify", s(&run_dir), "--step", "99"], 1);
    assert!(out.contains("no checkpoint of step 99"), "{out}");

    // The damaged newest checkpoint is not exported; an older one still is.
    let hf = tmp.path().join("hf");
    let out = ckpt(&["export-hf", s(&run_dir), "--out", s(&hf)], 1);
    assert!(
        out.contains("step 20") && out.contains("shard-00001-of-00002"),
        "{out}"
    );
    assert!(!hf.join("model.safetensors").exists());
    ckpt(
        &["export-hf", s(&run_dir), "--step", "10", "--out", s(&hf)],
        0,
    );

    // A garbage COMMITTED is a failure too.
    save_garbage(&root, 30);
    let out = ckpt(&["verify", s(&run_dir), "--step", "30"], 1);
    assert!(
        out.contains("FAILED") && out.contains("bad manifest"),
        "{out}"
    );
}

#[test]
fn inspect_shows_manifest_state_and_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let root = run_dir.join("checkpoints");
    save(&root, 10, 2);
    save(&root, 20, 2);
    save_uncommitted(&root, 25);
    let total = layout().total;
    assert_eq!(total, 1944);

    let out = ckpt(&["inspect", s(&run_dir)], 0);
    assert!(
        out.contains("step_000000020"),
        "newest committed by default: {out}"
    );
    assert!(
        out.contains(&format!("layout hash   {}", layout().hash())),
        "{out}"
    );
    assert!(out.contains("world size    2"), "{out}");
    assert!(out.contains("UTC"), "{out}");
    assert!(out.contains("step 20 of 100, 640 tokens"), "{out}");
    assert!(
        out.contains(
            "1 layers, 2 heads, 8 channels, vocab 10 (padded 128), block size 4; 1944 parameters"
        ),
        "{out}"
    );
    assert!(out.contains("last metrics  step 20: loss 2.5000"), "{out}");
    assert!(out.contains("shard 0 of 2"), "{out}");
    for name in [PARAMS, ADAM_M, ADAM_V] {
        let row = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}: {out}"));
        assert!(
            row.contains("F32") && row.contains("[972]") && row.contains("[0, 972) of 1944"),
            "{row}"
        );
        assert!(row.contains("3.8 KiB"), "{row}");
    }

    let out = ckpt(&["inspect", s(&run_dir), "--step", "10", "--shard", "1"], 0);
    assert!(
        out.contains("step_000000010") && out.contains("shard 1 of 2"),
        "{out}"
    );
    assert!(out.contains("[972, 1944) of 1944"), "{out}");

    let out = ckpt(&["inspect", s(&run_dir), "--shard", "2"], 1);
    assert!(out.contains("no shard 2"), "{out}");
    let out = ckpt(&["inspect", s(&run_dir), "--step", "25"], 1);
    assert!(
        out.contains("step 25") && out.contains("not committed"),
        "{out}"
    );
    let out = ckpt(&["inspect", s(&run_dir), "--step", "7"], 1);
    assert!(out.contains("no checkpoint of step 7"), "{out}");
}

/// The paths after `prefix` on the lines of `out` that start with it, sorted.
fn listed(out: &str, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = out
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|rest| PathBuf::from(rest.split("  (").next().unwrap().trim()))
        .collect();
    v.sort();
    v
}

#[test]
fn prune_dry_run_removes_nothing_and_prune_removes_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let root = run_dir.join("checkpoints");
    let c10 = save(&root, 10, 2);
    let u15 = save_uncommitted(&root, 15);
    let c20 = save(&root, 20, 1);
    let g25 = save_garbage(&root, 25);
    let c30 = save(&root, 30, 2);
    let c40 = save(&root, 40, 2);
    let u50 = save_uncommitted(&root, 50);
    let all = [&c10, &u15, &c20, &g25, &c30, &c40, &u50];

    let dry = ckpt(&["prune", s(&run_dir), "--keep-last", "2", "--dry-run"], 0);
    assert!(
        all.iter().all(|d| d.exists()),
        "dry run removed something: {dry}"
    );
    let planned = listed(&dry, "would remove ");
    assert_eq!(
        planned,
        [c10.clone(), u15.clone(), c20.clone(), g25.clone()],
        "{dry}"
    );
    assert!(dry.contains("nothing was removed"), "{dry}");

    let out = ckpt(&["prune", s(&run_dir), "--keep-last", "2"], 0);
    assert_eq!(listed(&out, "removed "), planned, "{out}");
    for d in &planned {
        assert!(!d.exists(), "{} should be gone: {out}", d.display());
    }
    // The newest two commits stay, and so does a save newer than the newest commit (in flight).
    assert!(c30.exists() && c40.exists() && u50.exists(), "{out}");
    assert!(
        !run_dir.join("lazarus.lock").exists(),
        "prune must release the run lock"
    );

    // keep-last 0 still keeps the newest committed checkpoint.
    let out = ckpt(&["prune", s(&run_dir), "--keep-last", "0"], 0);
    assert_eq!(
        listed(&out, "removed "),
        std::slice::from_ref(&c30),
        "{out}"
    );
    assert!(c40.exists() && u50.exists());
}

#[test]
fn export_hf_writes_a_tied_unpadded_gpt2() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let root = run_dir.join("checkpoints");
    save(&root, 10, 2);
    // Three ranks: shard boundaries at elements 648 and 1296 fall inside wte and attn.c_proj.
    save(&root, 20, 3);
    save_uncommitted(&root, 30);
    let hf = tmp.path().join("hf");

    let out = ckpt(&["export-hf", s(&run_dir), "--out", s(&hf)], 0);
    assert!(
        out.contains("exported step 20"),
        "newest committed by default: {out}"
    );
    check_export(&hf, 20);
    let out = ckpt(
        &["export-hf", s(&run_dir), "--step", "10", "--out", s(&hf)],
        0,
    );
    assert!(out.contains("exported step 10"), "{out}");
    check_export(&hf, 10);

    let out = ckpt(
        &["export-hf", s(&run_dir), "--step", "30", "--out", s(&hf)],
        1,
    );
    assert!(
        out.contains("step 30") && out.contains("not committed"),
        "{out}"
    );
    let out = ckpt(
        &["export-hf", s(&run_dir), "--step", "11", "--out", s(&hf)],
        1,
    );
    assert!(out.contains("no checkpoint of step 11"), "{out}");
    let usage = run(&["ckpt", "export-hf", s(&run_dir)]);
    assert_eq!(
        usage.status.code(),
        Some(2),
        "--out is required: {}",
        text(&usage)
    );
}

/// Checks `dir` holds the Hugging Face export of the checkpoint of `step`.
fn check_export(dir: &Path, step: u64) {
    let (m, l) = (tiny(), layout());
    let c = m.channels;
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().as_ref().expect("__metadata__");
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));

    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut want: Vec<String> = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
        .iter()
        .map(|n| format!("transformer.{n}"))
        .collect();
    for suffix in [
        "ln_1.weight",
        "ln_1.bias",
        "attn.c_attn.weight",
        "attn.c_attn.bias",
        "attn.c_proj.weight",
        "attn.c_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ] {
        want.push(format!("transformer.h.0.{suffix}"));
    }
    want.sort();
    assert_eq!(names, want, "no lm_head: the head is tied to wte");

    let values = |name: &str, shape: &[usize]| -> Vec<f32> {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        assert_eq!(t.shape(), shape, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    // wte keeps the V real rows, not the Vp padded ones.
    let wte = values("transformer.wte.weight", &[m.vocab, c]);
    let want: Vec<f32> = (0..m.vocab * c)
        .map(|i| param(step, l.wte.start + i))
        .collect();
    assert_eq!(wte, want);
    let wpe = values("transformer.wpe.weight", &[m.block_size, c]);
    assert_eq!(wpe[5], param(step, l.wpe.start + 5));
    let lnf = values("transformer.ln_f.bias", &[c]);
    assert_eq!(lnf[c - 1], param(step, l.lnf_b.end - 1));
    let bias = values("transformer.h.0.attn.c_attn.bias", &[3 * c]);
    assert_eq!(bias[17], param(step, l.blocks[0].qkv_b.start + 17));

    // Conv1D weights are (in, out): HF[i][o] is our (out, in) row o, column i.
    for (suffix, oc, ic) in [
        ("attn.c_attn.weight", 3 * c, c),
        ("attn.c_proj.weight", c, c),
        ("mlp.c_fc.weight", 4 * c, c),
        ("mlp.c_proj.weight", c, 4 * c),
    ] {
        let hf = values(&format!("transformer.h.0.{suffix}"), &[ic, oc]);
        let ours = l.get(&format!("h.0.{suffix}")).unwrap().offset;
        for (i, o) in [
            (0, 0),
            (0, 1),
            (1, 0),
            (ic - 1, oc - 1),
            (ic / 2, oc - 3),
            (ic - 2, 5),
        ] {
            assert_eq!(
                hf[i * oc + o],
                param(step, ours + o * ic + i),
                "{suffix}[{i}][{o}]"
            );
        }
    }

    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "gpt2");
    assert_eq!(cfg["architectures"], json!(["GPT2LMHeadModel"]));
    assert_eq!(cfg["vocab_size"], 10);
    assert_eq!(
        (cfg["n_layer"].as_u64(), cfg["n_head"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(
        (cfg["n_embd"].as_u64(), cfg["n_positions"].as_u64()),
        (Some(8), Some(4))
    );
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["layer_norm_epsilon"].as_f64(), Some(1e-5));
}
