//! Retention: the newest committed checkpoints stay, stale partial ones go, in-flight ones stay.

use std::fs;

use lazarus_checkpoint::{
    apply_retention, list_checkpoints, step_dir_name, Compression, COMMITTED_FILE,
};

use crate::{flat_array, write_committed, write_uncommitted};

#[test]
fn keep_last_two() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let data = flat_array(100, 1);
    let arrays: [(&str, &[f32]); 1] = [("params", &data)];
    for step in [10, 20, 30] {
        write_committed(root, step, 1, &arrays, Compression::None);
    }
    write_uncommitted(root, 5, 1, &arrays, Compression::None, 0..1);
    write_uncommitted(root, 25, 1, &arrays, Compression::None, 0..1);
    write_uncommitted(root, 40, 1, &arrays, Compression::None, 0..1); // a save in flight
    let invalid = root.join(step_dir_name(15));
    fs::create_dir(&invalid).expect("mkdir");
    fs::write(invalid.join(COMMITTED_FILE), b"garbage").expect("write");
    fs::write(root.join("unrelated.txt"), b"keep me").expect("write");

    let mut removed = apply_retention(root, 2).expect("retention");
    removed.sort();
    let want: Vec<_> = [5, 10, 15, 25]
        .iter()
        .map(|s| root.join(step_dir_name(*s)))
        .collect();
    assert_eq!(removed, want);
    let left: Vec<_> = list_checkpoints(root)
        .expect("list")
        .into_iter()
        .map(|e| e.dir_step)
        .collect();
    assert_eq!(left, vec![Some(20), Some(30), Some(40)]);
    assert!(root.join("unrelated.txt").exists());
}

#[test]
fn keep_last_zero_keeps_the_newest_committed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = flat_array(100, 1);
    let arrays: [(&str, &[f32]); 1] = [("params", &data)];
    for step in [1, 2] {
        write_committed(tmp.path(), step, 1, &arrays, Compression::None);
    }
    let removed = apply_retention(tmp.path(), 0).expect("retention");
    assert_eq!(removed, vec![tmp.path().join(step_dir_name(1))]);
    assert!(tmp
        .path()
        .join(step_dir_name(2))
        .join(COMMITTED_FILE)
        .exists());
    assert!(apply_retention(tmp.path(), 0)
        .expect("retention")
        .is_empty());
}

#[test]
fn no_commit_means_nothing_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = flat_array(10, 1);
    write_uncommitted(
        tmp.path(),
        5,
        1,
        &[("params", &data)],
        Compression::None,
        0..1,
    );
    assert!(apply_retention(tmp.path(), 1)
        .expect("retention")
        .is_empty());
    assert!(tmp.path().join(step_dir_name(5)).exists());
}
