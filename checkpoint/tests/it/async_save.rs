//! The asynchronous writer and the commit protocol: saves, stalls, failed saves that are
//! reported once and never committed, and disk-full handling.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lazarus_checkpoint::{
    discover_committed, open_verified, shard_file_name, step_dir_name, write_shard, AsyncWriter,
    CheckpointError, CheckpointManager, Compression, Dtype, ShardMeta, TensorSpec, COMMITTED_FILE,
};
use lazarus_comm::SingleRank;

use crate::flat_array;

const WAIT: Duration = Duration::from_secs(120);

fn specs(n: usize) -> Vec<TensorSpec> {
    vec![
        TensorSpec::flat("params", Dtype::F32, 0, n, n as u64),
        TensorSpec::new("step", Dtype::U64, vec![1]),
    ]
}

fn fill_step(st: &mut lazarus_checkpoint::Staging<'_>, data: &[f32], step: u64) {
    st.f32_mut("params")
        .expect("params staged")
        .copy_from_slice(data);
    st.copy_from("step", &step.to_le_bytes())
        .expect("step staged");
}

#[test]
fn async_writer_saves_polls_and_orders() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = flat_array(3 << 20, 1); // 12 MiB: the first save is likely still running
    let mut w = AsyncWriter::new(
        tmp.path(),
        0,
        1,
        "l".into(),
        specs(data.len()),
        Compression::None,
    )
    .expect("writer");
    assert_eq!(w.latest_durable_step(), None);
    let s1 = w.save(1, |st| fill_step(st, &data, 1)).expect("save 1");
    assert!(s1.stall > Duration::ZERO && s1.copy > Duration::ZERO);
    assert_eq!(s1.bytes, data.len() as u64 * 4 + 8);
    let s2 = w.save(2, |st| fill_step(st, &data, 2)).expect("save 2");
    // Save 2 could only start once save 1 had finished: its outcome is already here.
    assert!(s2.stall >= s2.wait && s2.stall > Duration::ZERO);
    let first = w.poll();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].step, 1);
    assert!(first[0].result.is_ok());
    w.wait_idle(WAIT).expect("idle");
    let second = w.poll();
    assert_eq!(second.len(), 1);
    let info = second[0].result.as_ref().expect("save 2 ok");
    assert_eq!(info.file, shard_file_name(0, 1));
    assert_eq!(w.latest_durable_step(), Some(2));
    assert!(w.poll().is_empty(), "an outcome is reported once");
    assert!(tmp.path().join(step_dir_name(2)).join(&info.file).exists());
}

#[test]
fn manager_commits_at_step_boundary() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let comm = SingleRank::new();
    let data = flat_array(10_000, 2);
    let mut mgr = CheckpointManager::new(
        tmp.path(),
        0,
        1,
        "l".into(),
        specs(data.len()),
        Compression::None,
        3,
    )
    .expect("manager");
    mgr.save(5, serde_json::json!({ "step": 5, "tokens": 1234 }), |st| {
        fill_step(st, &data, 5)
    })
    .expect("save");
    let mut committed = None;
    for _ in 0..1000 {
        let r = mgr.step_boundary(&comm).expect("boundary");
        assert!(r.failed_saves.is_empty() && r.failed_commit.is_none());
        if r.committed.is_some() {
            committed = r.committed;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(committed, Some(5));
    assert_eq!(mgr.last_committed(), Some(5));
    let found = discover_committed(tmp.path()).expect("discover");
    assert_eq!(found[0].1.step, 5);
    assert_eq!(found[0].1.training_state["tokens"], 1234);
    // Nothing new to commit: the next boundary commits nothing.
    assert_eq!(mgr.step_boundary(&comm).expect("boundary").committed, None);
}

#[test]
fn saves_that_became_durable_without_a_boundary_between_are_all_committed() {
    // Step 5's save finishes only while step 6's is being started (save waits for it), so no
    // boundary saw 5 durable on its own; it must still be committed and kept, not treated as
    // an abandoned directory by retention.
    let tmp = tempfile::tempdir().expect("tempdir");
    let comm = SingleRank::new();
    let data = flat_array(10_000, 4);
    let mut mgr = CheckpointManager::new(
        tmp.path(),
        0,
        1,
        "l".into(),
        specs(data.len()),
        Compression::None,
        3,
    )
    .expect("manager");
    for step in [5, 6] {
        mgr.save(step, serde_json::json!({ "step": step }), |st| {
            fill_step(st, &data, step)
        })
        .expect("save");
    }
    let r = mgr.finish(&comm, Duration::from_secs(30)).expect("finish");
    assert_eq!(r.committed, Some(6));
    let steps: Vec<u64> = discover_committed(tmp.path())
        .expect("discover")
        .iter()
        .map(|(_, m)| m.step)
        .collect();
    assert_eq!(steps, vec![6, 5]);
}

#[test]
fn failed_save_is_reported_not_committed_and_next_save_works() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let comm = SingleRank::new();
    let data = flat_array(10_000, 3);
    let mut mgr = CheckpointManager::new(
        tmp.path(),
        0,
        1,
        "l".into(),
        specs(data.len()),
        Compression::None,
        3,
    )
    .expect("manager");
    mgr.save(5, serde_json::json!({ "step": 5 }), |st| {
        fill_step(st, &data, 5)
    })
    .expect("save 5");
    assert_eq!(mgr.finish(&comm, WAIT).expect("finish").committed, Some(5));

    // Step 7's directory path is taken by a regular file: the write must fail.
    let blocker = tmp.path().join(step_dir_name(7));
    fs::write(&blocker, b"in the way").expect("blocker");
    mgr.save(7, serde_json::json!({ "step": 7 }), |st| {
        fill_step(st, &data, 7)
    })
    .expect("save 7 starts");
    let r = mgr.finish(&comm, WAIT).expect("finish");
    assert_eq!(r.committed, None);
    assert_eq!(r.failed_saves.len(), 1, "{:?}", r.failed_saves);
    assert_eq!(r.failed_saves[0].0, 7);
    let msg = r.failed_saves[0].1.to_string();
    assert!(msg.contains("step_000000007"), "{msg}");
    assert!(
        mgr.step_boundary(&comm)
            .expect("boundary")
            .failed_saves
            .is_empty(),
        "reported once"
    );

    // The older checkpoint is intact and still the newest committed one.
    let found = discover_committed(tmp.path()).expect("discover");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].1.step, 5);
    open_verified(&found[0].0, &found[0].1, &[0]).expect("step 5 still verifies");

    // The writer is still usable.
    fs::remove_file(&blocker).expect("unblock");
    mgr.save(8, serde_json::json!({ "step": 8 }), |st| {
        fill_step(st, &data, 8)
    })
    .expect("save 8");
    assert_eq!(mgr.finish(&comm, WAIT).expect("finish").committed, Some(8));
}

#[test]
fn commit_is_refused_when_a_shard_is_not_on_disk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let comm = SingleRank::new();
    let data = flat_array(1000, 4);
    let mut mgr = CheckpointManager::new(
        tmp.path(),
        0,
        1,
        "l".into(),
        specs(data.len()),
        Compression::None,
        3,
    )
    .expect("manager");
    // The save reports success, but the shard disappears before the boundary: the on-disk
    // check of the commit must catch it rather than trust the durable-step agreement.
    mgr.save(3, serde_json::json!({}), |st| fill_step(st, &data, 3))
        .expect("save");
    mgr.wait_idle(WAIT).expect("idle");
    let shard = tmp
        .path()
        .join(step_dir_name(3))
        .join(shard_file_name(0, 1));
    fs::remove_file(&shard).expect("remove shard");
    let r = mgr.step_boundary(&comm).expect("boundary");
    assert_eq!(r.committed, None);
    assert!(r.failed_saves.is_empty());
    let (step, err) = r.failed_commit.expect("commit refused");
    assert_eq!(step, 3);
    assert!(matches!(err, CheckpointError::MissingShard { .. }), "{err}");
    assert!(err.to_string().contains("shard-00000-of-00001"), "{err}");
    assert!(!tmp
        .path()
        .join(step_dir_name(3))
        .join(COMMITTED_FILE)
        .exists());
    // The refused step is not retried; the next save commits normally.
    assert!(mgr
        .step_boundary(&comm)
        .expect("boundary")
        .failed_commit
        .is_none());
    mgr.save(4, serde_json::json!({}), |st| fill_step(st, &data, 4))
        .expect("save");
    assert_eq!(mgr.finish(&comm, WAIT).expect("finish").committed, Some(4));
}

/// Mounts a 1 MiB tmpfs on `dir`; `Err` with the reason when that is not possible here.
fn mount_tiny_tmpfs(dir: &Path) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[test]
fn disk_full_is_a_clear_error_and_leaves_no_tmp() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("tiny");
    fs::create_dir(&mnt).expect("mkdir");
    if let Err(why) = mount_tiny_tmpfs(&mnt) {
        println!("skipping disk-full test: {why}");
        return;
    }
    let big = vec![7u8; 4 << 20];
    let spec = TensorSpec::new("blob", Dtype::U8, vec![big.len()]);
    let meta = ShardMeta {
        step: 1,
        rank: 0,
        world_size: 1,
        layout_hash: "l".into(),
    };
    let dir = mnt.join(step_dir_name(1));
    let result = write_shard(&dir, &meta, &[(&spec, &big)], Compression::None);
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .map(|rd| rd.flatten().collect())
        .unwrap_or_default();
    let small = vec![1u8; 1000];
    let spec_small = TensorSpec::new("blob", Dtype::U8, vec![small.len()]);
    let after = write_shard(&dir, &meta, &[(&spec_small, &small)], Compression::None);
    let _ = Command::new("umount").arg(&mnt).status();
    let err = result.expect_err("4 MiB cannot fit in 1 MiB");
    assert!(matches!(err, CheckpointError::NoSpace { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("shard-00000-of-00001.safetensors.tmp"),
        "{err}"
    );
    assert!(leftovers.is_empty(), "no .tmp left behind: {leftovers:?}");
    after.expect("a shard that fits is written afterwards");
}
