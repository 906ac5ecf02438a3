//! Integration tests of lazarus-checkpoint: round trips, resharding, damage, async saves,
//! commit protocol, retention and the run lock, all on real files in temporary directories.

mod async_save;
mod damage;
mod lock;
mod reshard;
mod retention;
mod roundtrip;

use std::path::{Path, PathBuf};

use lazarus_checkpoint::{
    commit, shard_file_name, step_dir_name, write_shard, Compression, Dtype, ShardMeta, TensorSpec,
};

/// A deterministic pseudo-random f32 array (xorshift), so damage is never "the same bytes".
pub fn flat_array(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 10_000) as f32 / 100.0 - 50.0
        })
        .collect()
}

/// Little-endian bytes of `v`.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f32s from little-endian bytes.
pub fn from_f32_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// ZeRO-1 style slices of `total` elements over `world` ranks: ceil-sized, the last one shorter.
pub fn slices(total: usize, world: usize) -> Vec<(u64, usize)> {
    let chunk = total.div_ceil(world);
    (0..world)
        .map(|r| {
            let lo = (r * chunk).min(total);
            let hi = ((r + 1) * chunk).min(total);
            (lo as u64, hi - lo)
        })
        .collect()
}

/// The per-rank tensors of rank `rank`: its slices of each flat array plus a small "rng" tensor.
pub fn rank_tensors(
    arrays: &[(&str, &[f32])],
    rank: usize,
    world: usize,
) -> Vec<(TensorSpec, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, data) in arrays {
        let (off, len) = slices(data.len(), world)[rank];
        let spec = TensorSpec::flat(*name, Dtype::F32, off, len, data.len() as u64);
        out.push((spec, f32_bytes(&data[off as usize..off as usize + len])));
    }
    let rng: Vec<u8> = [rank as u64 * 7 + 1, 42, u64::MAX, 3]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    out.push((TensorSpec::new("rng", Dtype::U64, vec![2, 2]), rng));
    out.push((
        TensorSpec::new("cursor", Dtype::U8, vec![3]),
        vec![rank as u8, 9, 250],
    ));
    out
}

/// Writes every rank's shard of `step` and commits it; returns the step directory.
pub fn write_committed(
    root: &Path,
    step: u64,
    world: usize,
    arrays: &[(&str, &[f32])],
    compression: Compression,
) -> PathBuf {
    let dir = write_uncommitted(root, step, world, arrays, compression, 0..world);
    commit(
        &dir,
        step,
        world,
        "layout-1",
        serde_json::json!({ "step": step, "epoch": 1 }),
    )
    .expect("commit of complete shards");
    dir
}

/// Writes the shards of the given ranks of `step` without committing.
pub fn write_uncommitted(
    root: &Path,
    step: u64,
    world: usize,
    arrays: &[(&str, &[f32])],
    compression: Compression,
    ranks: std::ops::Range<usize>,
) -> PathBuf {
    let dir = root.join(step_dir_name(step));
    for rank in ranks {
        let tensors = rank_tensors(arrays, rank, world);
        let refs: Vec<(&TensorSpec, &[u8])> =
            tensors.iter().map(|(s, b)| (s, b.as_slice())).collect();
        let meta = ShardMeta {
            step,
            rank,
            world_size: world,
            layout_hash: "layout-1".into(),
        };
        let info = write_shard(&dir, &meta, &refs, compression).expect("write shard");
        assert_eq!(info.file, shard_file_name(rank, world));
    }
    dir
}
