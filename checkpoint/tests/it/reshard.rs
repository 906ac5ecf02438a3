//! Resharding: flat arrays written by one world size are read back by another.

use lazarus_checkpoint::{discover_committed, flat_shards_for, open_verified, Compression};

use crate::{f32_bytes, flat_array, slices, write_committed};

fn reshard(old_world: usize, new_world: usize, compression: Compression) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let params = flat_array(100_003, 11);
    let m = flat_array(100_003, 12);
    let v = flat_array(100_003, 13);
    let arrays: [(&str, &[f32]); 3] = [("params", &params), ("adam_m", &m), ("adam_v", &v)];
    write_committed(tmp.path(), 50, old_world, &arrays, compression);
    let (dir, manifest) = discover_committed(tmp.path()).expect("discover").remove(0);
    for (name, data) in arrays {
        let mut gathered = Vec::new();
        for (off, len) in slices(data.len(), new_world) {
            let needed = flat_shards_for(&manifest, name, off..off + len as u64);
            assert!(!needed.is_empty() || len == 0);
            let open = open_verified(&dir, &manifest, &needed).expect("verify needed shards");
            let mut out = vec![0u8; len * 4];
            open.read_flat(name, off, &mut out).expect("read new slice");
            gathered.extend_from_slice(&out);
        }
        assert_eq!(
            gathered,
            f32_bytes(data),
            "{name}: {old_world} -> {new_world}"
        );
    }
}

#[test]
fn four_ranks_to_two_and_three() {
    reshard(4, 2, Compression::None);
    reshard(4, 3, Compression::None);
}

#[test]
fn two_ranks_to_four() {
    reshard(2, 4, Compression::None);
}

#[test]
fn compressed_four_ranks_to_three() {
    reshard(4, 3, Compression::Zstd { level: 1 });
}

#[test]
fn reading_from_an_unopened_shard_names_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let params = flat_array(1000, 1);
    write_committed(tmp.path(), 5, 4, &[("params", &params)], Compression::None);
    let (dir, manifest) = discover_committed(tmp.path()).expect("discover").remove(0);
    assert_eq!(flat_shards_for(&manifest, "params", 240..260), vec![0, 1]);
    let open = open_verified(&dir, &manifest, &[0]).expect("verify shard 0");
    let mut out = vec![0u8; 20 * 4];
    let err = open
        .read_flat("params", 240, &mut out)
        .expect_err("shard 1 not open");
    assert!(err.to_string().contains("shard 1"), "{err}");
}
