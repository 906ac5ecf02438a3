//! Damaged checkpoints are detected with a message naming the file and the problem, and the
//! agreed restore falls back to an older committed checkpoint.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use lazarus_checkpoint::{
    commit, discover_committed, list_checkpoints, open_verified, restore_agreed, shard_file_name,
    step_dir_name, CheckpointError, Compression, EntryStatus, Manifest, COMMITTED_FILE,
    QUARANTINE_DIR,
};
use lazarus_comm::SingleRank;

use crate::{flat_array, write_committed, write_uncommitted};

/// A committed W=2 checkpoint at step 10; returns (root guard, dir, manifest).
fn fresh() -> (tempfile::TempDir, PathBuf, Manifest) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = flat_array(3000, 5);
    let dir = write_committed(tmp.path(), 10, 2, &[("params", &data)], Compression::None);
    let manifest = Manifest::read(&dir.join(COMMITTED_FILE)).expect("manifest");
    (tmp, dir, manifest)
}

fn verify_err(dir: &Path, manifest: &Manifest) -> CheckpointError {
    open_verified(dir, manifest, &[0, 1]).expect_err("damage must be detected")
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = fs::read(path).expect("read");
    bytes[at as usize] ^= 0x40;
    fs::write(path, bytes).expect("write");
}

fn assert_mentions(err: &CheckpointError, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "`{msg}` should mention `{p}`");
    }
}

#[test]
fn truncated_shard() {
    let (_tmp, dir, m) = fresh();
    let path = dir.join(shard_file_name(1, 2));
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    f.set_len(m.shards[1].size - 5).expect("truncate");
    let err = verify_err(&dir, &m);
    assert_mentions(
        &err,
        &["shard-00001-of-00002", "truncated", "manifest says"],
    );
}

#[test]
fn zero_length_shard() {
    let (_tmp, dir, m) = fresh();
    let path = dir.join(shard_file_name(0, 2));
    OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(0)
        .expect("truncate");
    let err = verify_err(&dir, &m);
    assert_mentions(&err, &["shard-00000-of-00002", "file is 0 bytes"]);
}

#[test]
fn flipped_byte_in_tensor_data() {
    let (_tmp, dir, m) = fresh();
    let path = dir.join(shard_file_name(1, 2));
    // The last byte belongs to the last tensor in the data section.
    flip_byte(&path, m.shards[1].size - 1);
    let err = verify_err(&dir, &m);
    assert!(
        matches!(err, CheckpointError::ChecksumMismatch { .. }),
        "{err}"
    );
    assert_mentions(
        &err,
        &["shard-00001-of-00002", "checksum mismatch", "tensor"],
    );
}

#[test]
fn flipped_byte_in_header() {
    let (_tmp, dir, m) = fresh();
    let path = dir.join(shard_file_name(0, 2));
    flip_byte(&path, 40);
    let err = verify_err(&dir, &m);
    assert_mentions(&err, &["shard-00000-of-00002", "damaged shard"]);
}

#[test]
fn missing_shard() {
    let (_tmp, dir, m) = fresh();
    fs::remove_file(dir.join(shard_file_name(1, 2))).expect("remove");
    let err = verify_err(&dir, &m);
    assert!(matches!(err, CheckpointError::MissingShard { .. }), "{err}");
    assert_mentions(&err, &["shard-00001-of-00002", "missing"]);
    // Even a rank that reads only shard 0 sees that the checkpoint is incomplete.
    assert!(open_verified(&dir, &m, &[0]).is_err());
}

#[test]
fn extra_shard_file() {
    let (_tmp, dir, m) = fresh();
    fs::write(dir.join(shard_file_name(3, 4)), b"left over").expect("write");
    let err = verify_err(&dir, &m);
    assert!(matches!(err, CheckpointError::ExtraShard { .. }), "{err}");
    assert_mentions(&err, &["shard-00003-of-00004", "does not belong"]);
}

#[test]
fn garbage_committed_is_invalid() {
    let (tmp, dir, _m) = fresh();
    fs::write(dir.join(COMMITTED_FILE), b"{ this is not json").expect("write");
    let entries = list_checkpoints(tmp.path()).expect("list");
    match &entries[0].status {
        EntryStatus::Invalid(reason) => {
            assert!(
                reason.contains("COMMITTED") && reason.contains("not a valid manifest"),
                "{reason}"
            )
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(discover_committed(tmp.path()).expect("discover").is_empty());
}

#[test]
fn directory_step_disagrees_with_manifest() {
    let (tmp, dir, _m) = fresh();
    fs::rename(&dir, tmp.path().join(step_dir_name(11))).expect("rename");
    let entries = list_checkpoints(tmp.path()).expect("list");
    assert_eq!(entries[0].dir_step, Some(11));
    match &entries[0].status {
        EntryStatus::Invalid(reason) => assert!(
            reason.contains("says step 10") && reason.contains("step 11"),
            "{reason}"
        ),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn commit_refuses_when_a_shard_is_missing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = flat_array(100, 1);
    let dir = write_uncommitted(
        tmp.path(),
        3,
        2,
        &[("params", &data)],
        Compression::None,
        0..1,
    );
    let err = commit(&dir, 3, 2, "layout-1", serde_json::Value::Null).expect_err("rank 1 missing");
    assert!(matches!(err, CheckpointError::MissingShard { .. }), "{err}");
    assert_mentions(&err, &["shard-00001-of-00002"]);
    assert!(!dir.join(COMMITTED_FILE).exists());
    // A shard of another step in its place is refused too.
    let other = write_uncommitted(
        tmp.path(),
        4,
        2,
        &[("params", &data)],
        Compression::None,
        1..2,
    );
    fs::rename(
        other.join(shard_file_name(1, 2)),
        dir.join(shard_file_name(1, 2)),
    )
    .expect("move");
    let err = commit(&dir, 3, 2, "layout-1", serde_json::Value::Null).expect_err("wrong step");
    assert_mentions(&err, &["header says step 4"]);
    assert!(!dir.join(COMMITTED_FILE).exists());
}

#[test]
fn commit_refuses_shards_of_another_world_size() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = flat_array(100, 1);
    let arrays: [(&str, &[f32]); 1] = [("params", &data)];
    // An earlier life with 4 ranks left one shard of step 6; now 2 ranks write step 6.
    write_uncommitted(tmp.path(), 6, 4, &arrays, Compression::None, 3..4);
    let dir = write_uncommitted(tmp.path(), 6, 2, &arrays, Compression::None, 0..2);
    let err = commit(&dir, 6, 2, "layout-1", serde_json::Value::Null).expect_err("foreign shard");
    assert!(matches!(err, CheckpointError::ExtraShard { .. }), "{err}");
    assert_mentions(&err, &["shard-00003-of-00004"]);
    assert!(!dir.join(COMMITTED_FILE).exists());
}

#[test]
fn restore_falls_back_to_older_committed_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let old = flat_array(2000, 1);
    let new = flat_array(2000, 2);
    write_committed(tmp.path(), 10, 1, &[("params", &old)], Compression::None);
    let newer = write_committed(tmp.path(), 20, 1, &[("params", &new)], Compression::None);
    let m = Manifest::read(&newer.join(COMMITTED_FILE)).expect("manifest");
    flip_byte(&newer.join(shard_file_name(0, 1)), m.shards[0].size - 100);
    // An uncommitted, newer directory (a save that never finished).
    write_uncommitted(
        tmp.path(),
        30,
        1,
        &[("params", &new)],
        Compression::None,
        0..1,
    );

    let comm = SingleRank::new();
    let out = restore_agreed(tmp.path(), &comm, &|m: &Manifest| {
        (0..m.world_size).collect()
    })
    .expect("restore runs");
    let ck = out.checkpoint.expect("falls back to step 10");
    assert_eq!(ck.manifest().step, 10);
    let mut buf = vec![0u8; old.len() * 4];
    ck.read_flat("params", 0, &mut buf).expect("read");
    assert_eq!(buf, crate::f32_bytes(&old));
    assert_eq!(out.rejected.len(), 1, "{:?}", out.rejected);
    assert_eq!(out.rejected[0].step, Some(20));
    assert!(
        out.rejected[0].reason.contains("checksum mismatch"),
        "{}",
        out.rejected[0].reason
    );
    // Newer directories are cleared so the resumed run can write those steps again.
    assert_eq!(out.discarded.len(), 2, "{:?}", out.discarded);
    assert!(!newer.exists());
    assert!(!tmp.path().join(step_dir_name(30)).exists());
    let q: Vec<_> = fs::read_dir(tmp.path().join(QUARANTINE_DIR))
        .expect("quarantine")
        .collect();
    assert_eq!(
        q.len(),
        1,
        "the rejected committed checkpoint is kept for inspection"
    );
}

#[test]
fn restore_with_nothing_usable_returns_none() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let comm = SingleRank::new();
    let out = restore_agreed(tmp.path(), &comm, &|_: &Manifest| vec![0]).expect("restore runs");
    assert!(out.checkpoint.is_none());
    assert!(out.rejected.is_empty());
}
