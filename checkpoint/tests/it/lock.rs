//! The run-directory lock: exclusive while its holder lives, replaced when the holder is dead.

use std::fs;
use std::process::Command;

use lazarus_checkpoint::{CheckpointError, LockHolder, RunLock, LOCK_FILE};

#[test]
fn second_acquire_fails_naming_the_holder() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (lock, note) = RunLock::acquire(tmp.path()).expect("first acquire");
    assert!(note.is_none());
    let err = RunLock::acquire(tmp.path()).expect_err("held");
    assert!(matches!(err, CheckpointError::Locked { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    assert!(msg.contains(&lock.holder().host), "{msg}");
    drop(lock);
    assert!(!tmp.path().join(LOCK_FILE).exists(), "released on drop");
    RunLock::acquire(tmp.path()).expect("free again");
}

#[test]
fn stale_lock_of_a_dead_process_is_replaced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = {
        let (lock, _) = RunLock::acquire(tmp.path()).expect("acquire");
        lock.holder().host.clone()
    };
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead_pid = child.id();
    child.wait().expect("wait");
    let stale = LockHolder {
        host: host.clone(),
        pid: dead_pid,
        started_unix_ms: 1,
    };
    fs::write(
        tmp.path().join(LOCK_FILE),
        serde_json::to_vec(&stale).expect("json"),
    )
    .expect("write");
    let (lock, note) = RunLock::acquire(tmp.path()).expect("stale lock replaced");
    let note = note.expect("a note about the stale lock");
    assert!(
        note.contains("stale") && note.contains(&dead_pid.to_string()),
        "{note}"
    );
    assert_eq!(lock.holder().pid, std::process::id());
    drop(lock);

    // A lock from another host cannot be checked, so it is respected.
    let remote = LockHolder {
        host: format!("{host}-elsewhere"),
        pid: dead_pid,
        started_unix_ms: 1,
    };
    fs::write(
        tmp.path().join(LOCK_FILE),
        serde_json::to_vec(&remote).expect("json"),
    )
    .expect("write");
    let err = RunLock::acquire(tmp.path()).expect_err("remote lock");
    assert!(err.to_string().contains("-elsewhere"), "{err}");
}
