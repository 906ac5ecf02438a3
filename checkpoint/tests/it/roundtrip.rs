//! Write -> commit -> discover -> verify -> read, with and without zstd, and the shard read by
//! the `safetensors` crate.

use lazarus_checkpoint::{
    discover_committed, list_checkpoints, open_verified, shard_file_name, Compression, EntryStatus,
    CHUNK_BYTES,
};
use safetensors::SafeTensors;

use crate::{f32_bytes, flat_array, rank_tensors, write_committed};

fn round_trip(compression: Compression) {
    let tmp = tempfile::tempdir().expect("tempdir");
    // More than one 4 MiB chunk, and a length that is not a multiple of anything nice.
    let big = flat_array(CHUNK_BYTES / 4 * 2 + 12_345, 1);
    let small = flat_array(1001, 2);
    let arrays: [(&str, &[f32]); 2] = [("params", &big), ("m", &small)];
    let dir = write_committed(tmp.path(), 120, 2, &arrays, compression);

    let found = discover_committed(tmp.path()).expect("discover");
    assert_eq!(found.len(), 1);
    let (found_dir, manifest) = &found[0];
    assert_eq!(found_dir, &dir);
    assert_eq!(manifest.step, 120);
    assert_eq!(manifest.world_size, 2);
    assert_eq!(manifest.training_state["epoch"], 1);
    let entries = list_checkpoints(tmp.path()).expect("list");
    assert!(matches!(entries[0].status, EntryStatus::Committed(_)));
    assert!(entries[0].size_bytes > 0);

    let open = open_verified(&dir, manifest, &[0, 1]).expect("verifies");
    for rank in 0..2 {
        for (spec, bytes) in rank_tensors(&arrays, rank, 2) {
            let got = open.tensor(rank, &spec.name).expect("tensor present");
            assert_eq!(
                got.as_ref(),
                bytes.as_slice(),
                "rank {rank} tensor {}",
                spec.name
            );
        }
    }
    for (name, data) in arrays {
        let mut out = vec![0u8; data.len() * 4];
        open.read_flat(name, 0, &mut out)
            .expect("read whole flat array");
        assert_eq!(out, f32_bytes(data), "{name}");
        // An interior range crossing the shard boundary.
        let (lo, hi) = (data.len() / 2 - 7, data.len() / 2 + 9);
        let mut part = vec![0u8; (hi - lo) * 4];
        open.read_flat(name, lo as u64, &mut part)
            .expect("read part");
        assert_eq!(part, f32_bytes(&data[lo..hi]));
    }
    let mut too_far = vec![0u8; 8];
    let err = open
        .read_flat("m", 1000, &mut too_far)
        .expect_err("past the end");
    assert!(err.to_string().contains("exceed"), "{err}");
    assert!(open.tensor(0, "nope").is_err());
    assert!(!dir.join(format!("{}.tmp", shard_file_name(0, 2))).exists());
}

#[test]
fn round_trip_uncompressed() {
    round_trip(Compression::None);
}

#[test]
fn round_trip_zstd() {
    round_trip(Compression::Zstd { level: 3 });
}

#[test]
fn shard_opens_with_the_safetensors_crate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = flat_array(5000, 3);
    let arrays: [(&str, &[f32]); 1] = [("params", &data)];
    let dir = write_committed(tmp.path(), 7, 2, &arrays, Compression::None);
    for rank in 0..2 {
        let bytes = std::fs::read(dir.join(shard_file_name(rank, 2))).expect("read shard");
        let st = SafeTensors::deserialize(&bytes).expect("safetensors parses our shard");
        for (spec, want) in rank_tensors(&arrays, rank, 2) {
            let view = st.tensor(&spec.name).expect("tensor listed");
            assert_eq!(view.data(), want.as_slice(), "{}", spec.name);
            assert_eq!(view.shape(), spec.shape.as_slice());
            assert_eq!(format!("{:?}", view.dtype()), spec.dtype.as_str());
        }
        let (_, md) = SafeTensors::read_metadata(&bytes).expect("metadata");
        let md = md.metadata().clone().expect("__metadata__ present");
        assert_eq!(md["format"], "lazarus-ckpt");
        assert_eq!(md["rank"], rank.to_string());
        assert_eq!(md["checksum_algo"], "xxh3-64/4MiB-tree");
        // Data starts 8-byte aligned.
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        assert_eq!((8 + n) % 8, 0);
    }
    // A compressed shard is still valid safetensors (its tensors are U8 byte strings).
    let dir = write_committed(tmp.path(), 8, 1, &arrays, Compression::Zstd { level: 1 });
    let bytes = std::fs::read(dir.join(shard_file_name(0, 1))).expect("read shard");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors parses compressed shard");
    assert_eq!(
        format!("{:?}", st.tensor("params").expect("listed").dtype()),
        "U8"
    );
}
