//! The `ckpt` suite: how long an async checkpoint save stalls the caller, how long until it is
//! durable, and how fast a checkpoint restores (also resharded 4 -> 3), each against what the
//! raw disk does with the same bytes, for optimizer-state-shaped data of several sizes; and,
//! where a Python with torch is found, the same state through PyTorch's checkpointing (the
//! peer, `torch_peer.rs`) next to Lazarus with the state split into as many shards.

use crate::machine::Machine;
use crate::torch_peer::{self, PeerOutput, TorchPeer};
use anyhow::{anyhow, ensure, Context, Result};
use lazarus_checkpoint::{
    commit, flat_shards_for, open_verified, step_dir_name, write_shard, AsyncWriter, Compression,
    Dtype, Manifest, ShardInfo, ShardMeta, TensorSpec, COMMITTED_FILE,
};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The flat arrays of the synthetic optimizer state, as the trainer names them.
const ARRAYS: [&str; 3] = ["params", "adam_m", "adam_v"];
/// Layout hash written into the benchmark's shards (opaque to the checkpoint crate).
const LAYOUT_HASH: &str = "lazarus-bench-ckpt";
/// Longest wait for one save to become durable.
const DURABLE_WAIT_S_MAX: u64 = 900;
/// Sleep between polls of the writer while waiting for durability.
const DURABLE_POLL_US: u64 = 250;
/// World size the resharded checkpoint is written with, and the one it is restored as.
const RESHARD_WORLD_OLD: usize = 4;
const RESHARD_WORLD_NEW: usize = 3;
/// Elements generated per seed of the synthetic state (so it does not depend on thread count).
const GEN_CHUNK_ELEMS: usize = 1 << 20;
/// Largest state size accepted, in MiB.
const SIZE_MIB_MAX: u64 = 1 << 20;
const BYTES_PER_GB: f64 = 1e9;

/// Whether to measure compressed saves too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressArg {
    None,
    Zstd,
}

/// Options of the ckpt suite.
#[derive(Debug, clap::Args)]
pub struct CkptArgs {
    /// State sizes in MiB (params, adam_m and adam_v together, a third each).
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024,2048", value_parser = parse_mib)]
    sizes_mib: Vec<u64>,
    /// Directory on the disk to measure; a temporary directory is made inside and removed after.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Also measure saves compressed with zstd.
    #[arg(long, value_enum, default_value_t = CompressArg::None)]
    compress: CompressArg,
    /// zstd level for `--compress zstd`.
    #[arg(long, default_value_t = 1)]
    zstd_level: i32,
    /// Repetitions (the median is reported) for sizes up to `--small-mib`; larger ones run once.
    #[arg(long, default_value_t = 3)]
    reps_small: usize,
    #[arg(long, default_value_t = 256)]
    small_mib: u64,
    /// Seed of the synthetic state.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Python with torch for the PyTorch peer [default: $LAZARUS_BENCH_PYTHON, else python3].
    /// Without torch the peer is skipped and the results say why.
    #[arg(long)]
    torch_python: Option<PathBuf>,
    /// Ranks of the PyTorch DCP peer, and shards of the Lazarus save compared with it; 0 skips
    /// the peer.
    #[arg(long, default_value_t = 2)]
    peer_ranks: usize,
}

/// Parses one state size in MiB: a whole number from 1 to `SIZE_MIB_MAX`.
fn parse_mib(s: &str) -> std::result::Result<u64, String> {
    let v: u64 = s
        .trim()
        .parse()
        .map_err(|e| format!("`{s}` is not a whole number of MiB: {e}"))?;
    if v == 0 || v > SIZE_MIB_MAX {
        return Err(format!("{v} MiB is outside 1..={SIZE_MIB_MAX}"));
    }
    Ok(v)
}

/// Elements per array for a state of `mib` MiB split into three f32 arrays.
fn elems_for(mib: u64) -> usize {
    ((mib << 20) / (4 * ARRAYS.len() as u64)) as usize
}

/// Elements `[start, end)` that rank `rank` of `world` owns of an array of `n` elements.
fn slice_range(n: usize, world: usize, rank: usize) -> Range<usize> {
    assert!(rank < world, "rank {rank} is not below world size {world}");
    n * rank / world..n * (rank + 1) / world
}

fn median(xs: &[f64]) -> f64 {
    assert!(!xs.is_empty(), "median of nothing");
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

fn gbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / BYTES_PER_GB / seconds.max(1e-9)
}

// ---------------------------------------------------------------------------------------------
// Synthetic state

/// Three flat f32 arrays of equal length, like the trainer's parameters and AdamW moments.
struct State {
    arrays: [Vec<f32>; 3],
}

impl State {
    fn zeroed(n: usize) -> Self {
        State {
            arrays: [vec![0.0; n], vec![0.0; n], vec![0.0; n]],
        }
    }

    fn elems(&self) -> usize {
        self.arrays[0].len()
    }

    fn bytes(&self) -> u64 {
        self.arrays.iter().map(|a| (a.len() * 4) as u64).sum()
    }

    /// Fills every array with a value that matches no real state, which also faults the pages
    /// in, so a read measured next neither pays for page faults nor passes on stale data.
    fn poison(&mut self) {
        for a in &mut self.arrays {
            a.fill(f32::NAN);
        }
    }

    fn same_bits(&self, other: &State) -> bool {
        self.arrays
            .iter()
            .zip(&other.arrays)
            .all(|(a, b)| f32_bytes(a) == f32_bytes(b))
    }
}

/// The bytes of an f32 slice.
fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding, so all `size_of_val(v)` bytes are initialized; u8 has
    // alignment 1; the shared borrow keeps `v` alive and unchanged while the view lives.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The bytes of an f32 slice, mutably.
fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in `f32_bytes`; the exclusive borrow makes this the only view, and every byte
    // pattern written through it is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An approximately standard normal value (Irwin-Hall of four uniforms, scaled to variance 1).
fn normalish(rng: &mut u64) -> f32 {
    let (a, b) = (splitmix64(rng), splitmix64(rng));
    let u = |w: u64| (w as u32) as f32 / 4_294_967_296.0;
    let sum = u(a) + u(a >> 32) + u(b) + u(b >> 32);
    (sum - 2.0) * 3f32.sqrt()
}

/// Fills chunk `chunk` of array `which` deterministically: weights ~ N(0, 0.02), first moments
/// ~ N(0, 1e-3), second moments their squares (positive, tiny), as AdamW state looks.
fn fill_chunk(out: &mut [f32], which: usize, chunk: usize, seed: u64) {
    let mut rng =
        seed ^ ((which as u64) << 56) ^ (chunk as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    for x in out {
        let g = normalish(&mut rng);
        *x = match which {
            0 => 0.02 * g,
            1 => 1e-3 * g,
            _ => (1e-3 * g) * (1e-3 * g),
        };
    }
}

/// The synthetic state of `n` elements per array, generated on all cores.
fn synth_state(n: usize, seed: u64) -> State {
    let mut st = State::zeroed(n);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let mut jobs: Vec<(usize, usize, &mut [f32])> = Vec::new();
    for (which, a) in st.arrays.iter_mut().enumerate() {
        for (chunk, c) in a.chunks_mut(GEN_CHUNK_ELEMS).enumerate() {
            jobs.push((which, chunk, c));
        }
    }
    let per_thread = jobs.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for group in jobs.chunks_mut(per_thread) {
            s.spawn(move || {
                for (which, chunk, c) in group.iter_mut() {
                    fill_chunk(c, *which, *chunk, seed);
                }
            });
        }
    });
    st
}

// ---------------------------------------------------------------------------------------------
// Page cache

/// Drops of the page cache tried and done.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct CacheLog {
    attempts: u32,
    dropped: u32,
}

impl CacheLog {
    /// Flushes dirty pages and asks the kernel to drop clean cached pages, so that the next
    /// read comes from the disk; this fails without root or under a read-only `/proc`.
    fn drop_caches(&mut self) {
        sync_all_filesystems();
        self.attempts += 1;
        if fs::write("/proc/sys/vm/drop_caches", "3").is_ok() {
            self.dropped += 1;
        }
    }

    fn describe(&self) -> &'static str {
        match (self.attempts, self.dropped) {
            (0, _) => "no reads measured",
            (a, d) if a == d => "cold cache: page cache dropped before every read measurement",
            (_, 0) => "warm cache: dropping the page cache failed, reads may come from memory",
            _ => "mixed: dropping the page cache failed before some read measurements",
        }
    }
}

/// Writes back every dirty page, so that none is written during the next measurement.
fn sync_all_filesystems() {
    // SAFETY: sync(2) takes no arguments and touches no memory of this process.
    unsafe { libc::sync() };
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// One async save: the caller's stall and the time until the writer reports it durable.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct AsyncSample {
    pub stall_s: f64,
    pub copy_s: f64,
    pub durable_s: f64,
    pub stored_bytes: u64,
}

/// One restore as `world` ranks, one after another.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RestoreSample {
    pub total_s: f64,
    pub rank_max_s: f64,
    pub verify_s: f64,
    pub bytes_verified: u64,
}

/// Everything measured in one repetition at one size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Sample {
    pub raw_write_s: f64,
    pub raw_fsync_s: f64,
    pub raw_read_s: f64,
    pub save: AsyncSample,
    pub commit_s: f64,
    pub restore: RestoreSample,
    pub sync_save_s: f64,
    pub reshard_write_s: f64,
    pub reshard: RestoreSample,
}

/// The scratch space and page-cache log shared by all measurements.
struct Bench {
    root: PathBuf,
    cache: CacheLog,
    next_step: u64,
}

impl Bench {
    fn ckpt_root(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    fn new_step(&mut self) -> (u64, PathBuf) {
        self.next_step += 1;
        (
            self.next_step,
            self.ckpt_root().join(step_dir_name(self.next_step)),
        )
    }
}

fn flat_specs(n: usize, world: usize, rank: usize) -> Vec<TensorSpec> {
    let r = slice_range(n, world, rank);
    ARRAYS
        .iter()
        .map(|name| TensorSpec::flat(*name, Dtype::F32, r.start as u64, r.len(), n as u64))
        .collect()
}

/// A plain sequential write of the state to a new file, then `sync_all`: the disk's limit.
/// Returns the seconds of the whole and of the `sync_all` alone.
fn raw_write(path: &Path, st: &State) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for a in &st.arrays {
        f.write_all(f32_bytes(a))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let t_sync = Instant::now();
    f.sync_all()
        .with_context(|| format!("fsync of {}", path.display()))?;
    Ok((t0.elapsed().as_secs_f64(), t_sync.elapsed().as_secs_f64()))
}

/// A plain sequential read of the file `raw_write` wrote, into `out`.
fn raw_read(path: &Path, out: &mut State) -> Result<f64> {
    let t0 = Instant::now();
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    for a in &mut out.arrays {
        f.read_exact(f32_bytes_mut(a))
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Polls `w` until it reports `step` durable; returns the seconds since `t0` and the shard.
fn wait_durable(w: &mut AsyncWriter, step: u64, t0: Instant) -> Result<(f64, ShardInfo)> {
    let deadline = Duration::from_secs(DURABLE_WAIT_S_MAX);
    let mut info = None;
    loop {
        for o in w.poll() {
            if o.step == step {
                info = Some(
                    o.result
                        .with_context(|| format!("async save of step {step}"))?,
                );
            }
        }
        if w.latest_durable_step().is_some_and(|s| s >= step) {
            let s = t0.elapsed().as_secs_f64();
            let info = info.context("writer reported the step durable without its outcome")?;
            return Ok((s, info));
        }
        ensure!(
            t0.elapsed() < deadline,
            "step {step} not durable after {DURABLE_WAIT_S_MAX} s"
        );
        std::thread::sleep(Duration::from_micros(DURABLE_POLL_US));
    }
}

/// An async save with nothing in flight: the stall of `save`, then the wait until durable.
fn async_save(w: &mut AsyncWriter, step: u64, st: &State) -> Result<AsyncSample> {
    let [p, m, v] = &st.arrays;
    async_save_arrays(w, step, [p, m, v])
}

/// `async_save` of the given slices of the three arrays (the writer's tensors must match).
fn async_save_arrays(w: &mut AsyncWriter, step: u64, arrays: [&[f32]; 3]) -> Result<AsyncSample> {
    ensure!(w.in_flight_step().is_none(), "a save is already in flight");
    let mut fill_err = None;
    let t0 = Instant::now();
    let stats = w
        .save(step, |stg| {
            for (name, a) in ARRAYS.iter().zip(arrays) {
                if let Err(e) = stg.copy_from(name, f32_bytes(a)) {
                    fill_err.get_or_insert(e);
                }
            }
        })
        .with_context(|| format!("starting the async save of step {step}"))?;
    let stall_s = t0.elapsed().as_secs_f64();
    if let Some(e) = fill_err {
        return Err(e).context("copying the state into the staging buffer");
    }
    let (durable_s, info) = wait_durable(w, step, t0)?;
    Ok(AsyncSample {
        stall_s,
        copy_s: stats.copy.as_secs_f64(),
        durable_s,
        stored_bytes: info.tensors.values().map(|t| t.stored_bytes).sum(),
    })
}

fn commit_step(dir: &Path, step: u64, world: usize) -> Result<f64> {
    let t0 = Instant::now();
    commit(dir, step, world, LAYOUT_HASH, serde_json::json!({}))
        .with_context(|| format!("committing {}", dir.display()))?;
    Ok(t0.elapsed().as_secs_f64())
}

/// A synchronous save as `world` ranks one after another (`write_shard` each), then `commit`.
fn sync_save(dir: &Path, step: u64, st: &State, world: usize) -> Result<f64> {
    let n = st.elems();
    let t0 = Instant::now();
    for rank in 0..world {
        let specs = flat_specs(n, world, rank);
        let r = slice_range(n, world, rank);
        let tensors: Vec<(&TensorSpec, &[u8])> = specs
            .iter()
            .zip(&st.arrays)
            .map(|(s, a)| (s, f32_bytes(&a[r.clone()])))
            .collect();
        let meta = ShardMeta {
            step,
            rank,
            world_size: world,
            layout_hash: LAYOUT_HASH.to_string(),
        };
        write_shard(dir, &meta, &tensors, Compression::None)
            .with_context(|| format!("writing shard {rank} of {world} in {}", dir.display()))?;
    }
    commit_step(dir, step, world)?;
    Ok(t0.elapsed().as_secs_f64())
}

/// What one rank's restore did: seconds verifying, bytes of the shards it verified.
struct RankRestore {
    verify_s: f64,
    bytes_verified: u64,
}

/// Restores rank `rank` of `world` of a checkpoint of arrays of `n` elements: verifies only the
/// shards `flat_shards_for` names for its slice, then reads its slice of every array into
/// `out` (its slices of params, adam_m, adam_v).
fn restore_rank(
    dir: &Path,
    manifest: &Manifest,
    (n, world, rank): (usize, usize, usize),
    out: [&mut [f32]; 3],
) -> Result<RankRestore> {
    let t0 = Instant::now();
    let r = slice_range(n, world, rank);
    let mut shards: Vec<usize> = ARRAYS
        .iter()
        .flat_map(|a| flat_shards_for(manifest, a, r.start as u64..r.end as u64))
        .collect();
    shards.sort_unstable();
    shards.dedup();
    let ck = open_verified(dir, manifest, &shards)
        .with_context(|| format!("verifying shards {shards:?} of {}", dir.display()))?;
    let verify_s = t0.elapsed().as_secs_f64();
    let bytes_verified = shards.iter().map(|&i| manifest.shards[i].size).sum::<u64>();
    for (name, a) in ARRAYS.iter().zip(out) {
        assert_eq!(a.len(), r.len(), "output slice of `{name}` for rank {rank}");
        ck.read_flat(name, r.start as u64, f32_bytes_mut(a))
            .with_context(|| format!("reading `{name}` [{}, {})", r.start, r.end))?;
    }
    Ok(RankRestore {
        verify_s,
        bytes_verified,
    })
}

/// Splits each array of `out` into the slices of the `world` ranks: `[rank][array]`.
fn rank_slices(out: &mut State, world: usize) -> Vec<[&mut [f32]; 3]> {
    let n = out.elems();
    let mut per_rank: Vec<Vec<&mut [f32]>> = (0..world).map(|_| Vec::with_capacity(3)).collect();
    for a in &mut out.arrays {
        let mut rest: &mut [f32] = a;
        for (rank, slices) in per_rank.iter_mut().enumerate() {
            let len = slice_range(n, world, rank).len();
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
            slices.push(head);
            rest = tail;
        }
    }
    per_rank
        .into_iter()
        .map(|v| v.try_into().expect("one slice of each of the three arrays"))
        .collect()
}

/// Restores all arrays into `out` as `world_new` ranks, one after another.
fn restore_as(dir: &Path, world_new: usize, out: &mut State) -> Result<RestoreSample> {
    let n = out.elems();
    let t0 = Instant::now();
    let manifest = Manifest::read(&dir.join(COMMITTED_FILE))
        .with_context(|| format!("reading the manifest of {}", dir.display()))?;
    let (mut rank_max_s, mut verify_s, mut bytes_verified) = (0f64, 0f64, 0u64);
    for (rank, slices) in rank_slices(out, world_new).into_iter().enumerate() {
        let t_rank = Instant::now();
        let rr = restore_rank(dir, &manifest, (n, world_new, rank), slices)?;
        verify_s += rr.verify_s;
        bytes_verified += rr.bytes_verified;
        rank_max_s = rank_max_s.max(t_rank.elapsed().as_secs_f64());
    }
    Ok(RestoreSample {
        total_s: t0.elapsed().as_secs_f64(),
        rank_max_s,
        verify_s,
        bytes_verified,
    })
}

/// Restores all arrays into `out` as `world` ranks at once, one thread per rank, as the ranks
/// of a job would. Returns the seconds of the whole.
fn restore_parallel(dir: &Path, world: usize, out: &mut State) -> Result<f64> {
    let n = out.elems();
    let t0 = Instant::now();
    let manifest = Manifest::read(&dir.join(COMMITTED_FILE))
        .with_context(|| format!("reading the manifest of {}", dir.display()))?;
    let manifest = &manifest;
    std::thread::scope(|s| {
        let handles: Vec<_> = rank_slices(out, world)
            .into_iter()
            .enumerate()
            .map(|(rank, slices)| {
                s.spawn(move || restore_rank(dir, manifest, (n, world, rank), slices))
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow!("a restoring rank panicked"))?
                .map(|_| ())
        })
    })?;
    Ok(t0.elapsed().as_secs_f64())
}

/// `restore_parallel` from a cold cache, checking the bits came back.
fn cold_restore_parallel(
    b: &mut Bench,
    dir: &Path,
    world: usize,
    st: &State,
    out: &mut State,
) -> Result<f64> {
    out.poison();
    b.cache.drop_caches();
    let total_s = restore_parallel(dir, world, out)?;
    ensure!(
        out.same_bits(st),
        "restore of {} as {world} parallel ranks returned different bits",
        dir.display()
    );
    Ok(total_s)
}

fn remove_dir(dir: &Path) -> Result<()> {
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Restores `dir` as `world_new` ranks from a cold cache and checks the bits came back.
fn cold_restore(
    b: &mut Bench,
    dir: &Path,
    world_new: usize,
    st: &State,
    out: &mut State,
) -> Result<RestoreSample> {
    out.poison();
    b.cache.drop_caches();
    let s = restore_as(dir, world_new, out)?;
    ensure!(
        out.same_bits(st),
        "restore of {} as {world_new} ranks returned different bits",
        dir.display()
    );
    Ok(s)
}

/// The raw-disk write (whole, fsync alone) and read of the state.
fn raw_pair(b: &mut Bench, st: &State, out: &mut State) -> Result<((f64, f64), f64)> {
    let path = b.root.join("raw.bin");
    // Earlier measurements' dirty pages must not be written back during this one.
    sync_all_filesystems();
    let w = raw_write(&path, st)?;
    out.poison();
    b.cache.drop_caches();
    let r = raw_read(&path, out)?;
    ensure!(out.same_bits(st), "raw read returned different bits");
    fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok((w, r))
}

/// One repetition of every measurement at one size, with `w` an idle uncompressed writer.
fn one_rep(b: &mut Bench, w: &mut AsyncWriter, st: &State, out: &mut State) -> Result<Sample> {
    let ((raw_write_s, raw_fsync_s), raw_read_s) = raw_pair(b, st, out)?;

    let (step, dir) = b.new_step();
    sync_all_filesystems();
    let save = async_save(w, step, st)?;
    let commit_s = commit_step(&dir, step, 1)?;
    let restore = cold_restore(b, &dir, 1, st, out)?;
    remove_dir(&dir)?;

    let (step, dir) = b.new_step();
    sync_all_filesystems();
    let sync_save_s = sync_save(&dir, step, st, 1)?;
    remove_dir(&dir)?;

    let (step, dir) = b.new_step();
    sync_all_filesystems();
    let reshard_write_s = sync_save(&dir, step, st, RESHARD_WORLD_OLD)?;
    let reshard = cold_restore(b, &dir, RESHARD_WORLD_NEW, st, out)?;
    remove_dir(&dir)?;

    Ok(Sample {
        raw_write_s,
        raw_fsync_s,
        raw_read_s,
        save,
        commit_s,
        restore,
        sync_save_s,
        reshard_write_s,
        reshard,
    })
}

// ---------------------------------------------------------------------------------------------
// Against the PyTorch peer

/// One writer per rank of `world`, each for its slice of every array.
fn sharded_writers(b: &Bench, n: usize, world: usize) -> Result<Vec<AsyncWriter>> {
    (0..world)
        .map(|rank| {
            AsyncWriter::new(
                &b.ckpt_root(),
                rank,
                world,
                LAYOUT_HASH.to_string(),
                flat_specs(n, world, rank),
                Compression::None,
            )
            .with_context(|| format!("starting the async writer of rank {rank} of {world}"))
        })
        .collect()
}

/// All ranks save their slices at once, each from its own thread as the ranks of a job would;
/// the stall and time to durable of the slowest rank.
fn sharded_save(ws: &mut [AsyncWriter], step: u64, st: &State) -> Result<AsyncSample> {
    let (n, world) = (st.elems(), ws.len());
    let samples = std::thread::scope(|s| {
        let handles: Vec<_> = ws
            .iter_mut()
            .enumerate()
            .map(|(rank, w)| {
                let r = slice_range(n, world, rank);
                let [p, m, v] = &st.arrays;
                let arrays = [&p[r.clone()], &m[r.clone()], &v[r]];
                s.spawn(move || async_save_arrays(w, step, arrays))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a saving rank panicked"))?)
            .collect::<Result<Vec<_>>>()
    })?;
    let max = |f: fn(&AsyncSample) -> f64| samples.iter().map(f).fold(0.0, f64::max);
    Ok(AsyncSample {
        stall_s: max(|s| s.stall_s),
        copy_s: max(|s| s.copy_s),
        durable_s: max(|s| s.durable_s),
        stored_bytes: samples.iter().map(|s| s.stored_bytes).sum(),
    })
}

/// Lazarus with the state in N shards, in seconds: the cold save's stall, then medians.
#[derive(Debug, Clone, Copy)]
struct ShardedTimes {
    stall_cold_s: f64,
    stall_s: f64,
    /// Until every shard is durable and `COMMITTED` is written.
    durable_s: f64,
    restore_s: f64,
}

/// Lazarus with the state in `world` shards: a cold save, then `reps` saves, each committed
/// and restored by `world` parallel ranks.
fn measure_sharded(
    b: &mut Bench,
    world: usize,
    reps: usize,
    st: &State,
    out: &mut State,
) -> Result<ShardedTimes> {
    let mut ws = sharded_writers(b, st.elems(), world)?;
    let (step, dir) = b.new_step();
    sync_all_filesystems();
    let cold = sharded_save(&mut ws, step, st)?;
    remove_dir(&dir)?;
    let (mut stalls, mut durables, mut restores) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let (step, dir) = b.new_step();
        sync_all_filesystems();
        let save = sharded_save(&mut ws, step, st)?;
        let commit_s = commit_step(&dir, step, world)?;
        stalls.push(save.stall_s);
        durables.push(save.durable_s + commit_s);
        restores.push(cold_restore_parallel(b, &dir, world, st, out)?);
        remove_dir(&dir)?;
    }
    Ok(ShardedTimes {
        stall_cold_s: cold.stall_s,
        stall_s: median(&stalls),
        durable_s: median(&durables),
        restore_s: median(&restores),
    })
}

/// Lazarus and PyTorch side by side at one size. Times in ms (medians); ratios below 1 mean
/// Lazarus took less time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerRow {
    pub ranks: usize,
    pub torch_version: String,
    /// What the Lazarus numbers of this row measured.
    pub lazarus_measures: String,
    pub torch_save_measures: String,
    pub dcp_measures: String,
    /// Lazarus, the state in `ranks` shards: the slowest rank's stall.
    pub lazarus_stall_ms: f64,
    pub lazarus_stall_cold_ms: f64,
    /// Until every shard is durable and `COMMITTED` is written.
    pub lazarus_durable_ms: f64,
    /// `ranks` ranks restoring at once, checksums verified, from a cold cache.
    pub lazarus_restore_ms: f64,
    /// Lazarus, one writer with the whole state (the row's durable plus commit).
    pub lazarus_one_writer_durable_ms: f64,
    pub torch_save_blocking_ms: f64,
    pub torch_save_durable_ms: f64,
    pub dcp_save_ms: f64,
    pub dcp_save_durable_ms: f64,
    pub dcp_async_blocking_ms: f64,
    pub dcp_async_blocking_cold_ms: f64,
    pub dcp_async_durable_ms: f64,
    pub dcp_load_ms: f64,
    pub dcp_load_cold_cache: bool,
    /// Lazarus stall (N shards) / DCP async_save blocking.
    pub stall_over_dcp_async_blocking: f64,
    /// Lazarus durable (N shards) / DCP async_save durable.
    pub durable_over_dcp_async_durable: f64,
    /// Lazarus durable (one writer) / torch.save durable.
    pub one_writer_durable_over_torch_save_durable: f64,
    /// Lazarus restore (N ranks) / DCP load (N ranks).
    pub restore_over_dcp_load: f64,
    pub peer_runtime_s: f64,
}

/// What the Lazarus side of a `PeerRow` measured.
fn lazarus_measures(world: usize) -> String {
    format!(
        "{world} AsyncWriters in one process, one per rank, each its 1/{world} of every array, \
         saving at once from {world} threads; times of the slowest rank; durable includes the \
         commit; restore by {world} threads at once, checksums verified"
    )
}

fn peer_row(world: usize, laz: ShardedTimes, one_writer_ms: f64, t: &PeerOutput) -> PeerRow {
    let (stall_cold, stall) = (ms(laz.stall_cold_s), ms(laz.stall_s));
    let (durable, restore) = (ms(laz.durable_s), ms(laz.restore_s));
    PeerRow {
        ranks: world,
        torch_version: t.torch_version.clone(),
        lazarus_measures: lazarus_measures(world),
        torch_save_measures: t.torch_save_measures.clone(),
        dcp_measures: t.dcp_measures.clone(),
        lazarus_stall_ms: stall,
        lazarus_stall_cold_ms: stall_cold,
        lazarus_durable_ms: durable,
        lazarus_restore_ms: restore,
        lazarus_one_writer_durable_ms: one_writer_ms,
        torch_save_blocking_ms: t.torch_save.blocking_ms,
        torch_save_durable_ms: t.torch_save.durable_ms,
        dcp_save_ms: t.dcp_save.blocking_ms,
        dcp_save_durable_ms: t.dcp_save.durable_ms,
        dcp_async_blocking_ms: t.dcp_async_save.blocking_ms,
        dcp_async_blocking_cold_ms: t.dcp_async_save.cold_blocking_ms,
        dcp_async_durable_ms: t.dcp_async_save.durable_ms,
        dcp_load_ms: t.dcp_load.ms,
        dcp_load_cold_cache: t.dcp_load.cold_cache,
        stall_over_dcp_async_blocking: stall / t.dcp_async_save.blocking_ms,
        durable_over_dcp_async_durable: durable / t.dcp_async_save.durable_ms,
        one_writer_durable_over_torch_save_durable: one_writer_ms / t.torch_save.durable_ms,
        restore_over_dcp_load: restore / t.dcp_load.ms,
        peer_runtime_s: t.runtime_s,
    }
}

// ---------------------------------------------------------------------------------------------
// Results

/// Compressed saves at one size (medians).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZstdRow {
    pub level: i32,
    pub stored_bytes: u64,
    /// Stored bytes over state bytes.
    pub ratio: f64,
    pub stall_cold_ms: f64,
    pub stall_ms: f64,
    pub durable_ms: f64,
    pub persist_gbps: f64,
    pub restore_ms: f64,
    pub restore_gbps: f64,
}

/// All numbers at one size: medians over `reps`; `*_cold_*` from the first save into a staging
/// buffer never touched before. Bandwidths in GB/s (1e9 bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub size_mib: u64,
    pub state_bytes: u64,
    pub elems_per_array: usize,
    pub reps: usize,
    pub raw_write_ms: f64,
    /// The `sync_all` part of `raw_write_ms` (the rest is the copy into the page cache).
    pub raw_fsync_ms: f64,
    pub raw_write_gbps: f64,
    pub raw_read_ms: f64,
    pub raw_read_gbps: f64,
    pub stall_cold_ms: f64,
    pub durable_cold_ms: f64,
    pub stall_ms: f64,
    pub stall_copy_ms: f64,
    pub durable_ms: f64,
    pub persist_gbps: f64,
    pub commit_ms: f64,
    pub sync_save_ms: f64,
    pub restore_ms: f64,
    pub restore_verify_ms: f64,
    pub restore_gbps: f64,
    pub reshard_write_ms: f64,
    pub reshard_restore_ms: f64,
    pub reshard_rank_max_ms: f64,
    pub reshard_bytes_verified: u64,
    pub persist_over_raw_write: f64,
    pub stall_over_sync_save: f64,
    pub restore_over_raw_read: f64,
    pub zstd: Option<ZstdRow>,
    /// Lazarus against the PyTorch peer at this size (absent when the peer was not run).
    #[serde(default)]
    pub peer: Option<PeerRow>,
    /// Why the peer failed at this size, when it did.
    #[serde(default)]
    pub peer_error: Option<String>,
    /// The machine's 1-minute load average when this size finished: above the core count,
    /// other work shared the CPU and the disk with the measurement.
    #[serde(default)]
    pub load_1m: Option<f64>,
    /// Every repetition, in seconds.
    pub samples: Vec<Sample>,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    suite: &'static str,
    machine: Machine,
    dir: String,
    page_cache: &'static str,
    cache_drops: CacheLog,
    runtime_s: f64,
    peer: PeerStatus,
    rows: &'a [Row],
}

fn ms(s: f64) -> f64 {
    s * 1e3
}

fn row_from(mib: u64, bytes: u64, n: usize, cold: AsyncSample, samples: &[Sample]) -> Row {
    let med = |f: &dyn Fn(&Sample) -> f64| median(&samples.iter().map(f).collect::<Vec<_>>());
    let (raw_w, raw_r) = (med(&|s| s.raw_write_s), med(&|s| s.raw_read_s));
    let (stall, durable) = (med(&|s| s.save.stall_s), med(&|s| s.save.durable_s));
    let (sync, restore) = (med(&|s| s.sync_save_s), med(&|s| s.restore.total_s));
    let (raw_write_gbps, raw_read_gbps) = (gbps(bytes, raw_w), gbps(bytes, raw_r));
    let (persist_gbps, restore_gbps) = (gbps(bytes, durable), gbps(bytes, restore));
    Row {
        size_mib: mib,
        state_bytes: bytes,
        elems_per_array: n,
        reps: samples.len(),
        raw_write_ms: ms(raw_w),
        raw_fsync_ms: ms(med(&|s| s.raw_fsync_s)),
        raw_write_gbps,
        raw_read_ms: ms(raw_r),
        raw_read_gbps,
        stall_cold_ms: ms(cold.stall_s),
        durable_cold_ms: ms(cold.durable_s),
        stall_ms: ms(stall),
        stall_copy_ms: ms(med(&|s| s.save.copy_s)),
        durable_ms: ms(durable),
        persist_gbps,
        commit_ms: ms(med(&|s| s.commit_s)),
        sync_save_ms: ms(sync),
        restore_ms: ms(restore),
        restore_verify_ms: ms(med(&|s| s.restore.verify_s)),
        restore_gbps,
        reshard_write_ms: ms(med(&|s| s.reshard_write_s)),
        reshard_restore_ms: ms(med(&|s| s.reshard.total_s)),
        reshard_rank_max_ms: ms(med(&|s| s.reshard.rank_max_s)),
        reshard_bytes_verified: samples[0].reshard.bytes_verified,
        persist_over_raw_write: persist_gbps / raw_write_gbps,
        stall_over_sync_save: stall / sync,
        restore_over_raw_read: restore_gbps / raw_read_gbps,
        zstd: None,
        peer: None,
        peer_error: None,
        load_1m: None,
        samples: samples.to_vec(),
    }
}

/// The Markdown table, one row per size; zstd columns only when some row has them.
pub fn table(rows: &[Row]) -> String {
    let z = rows.iter().any(|r| r.zstd.is_some());
    let mut s = String::from(
        "| state | stall ms (cold) | sync save ms | stall/sync | durable ms | persist GB/s | raw write GB/s | persist/raw | restore GB/s | raw read GB/s | restore/raw | reshard 4->3 ms |",
    );
    s.push_str(if z {
        " zstd ratio | zstd persist GB/s | zstd restore GB/s |\n"
    } else {
        "\n"
    });
    s.push_str(&"|---".repeat(12 + if z { 3 } else { 0 }));
    s.push_str("|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} MiB | {:.1} ({:.1}) | {:.0} | {:.3} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            r.size_mib,
            r.stall_ms,
            r.stall_cold_ms,
            r.sync_save_ms,
            r.stall_over_sync_save,
            r.durable_ms,
            r.persist_gbps,
            r.raw_write_gbps,
            r.persist_over_raw_write,
            r.restore_gbps,
            r.raw_read_gbps,
            r.restore_over_raw_read,
            r.reshard_restore_ms,
        ));
        match (&r.zstd, z) {
            (Some(zr), _) => s.push_str(&format!(
                " {:.3} | {:.2} | {:.2} |\n",
                zr.ratio, zr.persist_gbps, zr.restore_gbps
            )),
            (None, true) => s.push_str(" - | - | - |\n"),
            (None, false) => s.push('\n'),
        }
    }
    s
}

/// What the peer table compares, in one paragraph.
pub const PEER_NOTE: &str = "Lazarus (N shards): N async writers in one process, one per \
rank, each its 1/N of every array, started together; durable = every shard fsynced and \
COMMITTED written; restore = N ranks at once with checksums verified, cold cache. DCP: N gloo \
ranks (processes), DTensor Shard(0), FileSystemWriter defaults; blocking = until async_save \
returns its future; durable = the future's result plus fsync of the files and directory; load \
does not verify checksums. Lazarus (1 writer) and torch.save: one process, the whole state, \
one file. Ratios below 1: Lazarus took less time.";

/// The Lazarus-against-PyTorch table, one row per size that has peer numbers.
pub fn peer_table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| state | ranks | Lazarus stall ms | DCP async_save blocking ms | stall/DCP | Lazarus durable ms | DCP async durable ms | durable/DCP | Lazarus 1-writer durable ms | torch.save durable ms | 1-writer/torch.save | Lazarus restore ms | DCP load ms | restore/DCP load |\n",
    );
    s.push_str(&"|---".repeat(14));
    s.push_str("|\n");
    for (r, p) in rows.iter().filter_map(|r| r.peer.as_ref().map(|p| (r, p))) {
        s.push_str(&format!(
            "| {} MiB | {} | {:.1} | {:.1} | {:.3} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} |\n",
            r.size_mib,
            p.ranks,
            p.lazarus_stall_ms,
            p.dcp_async_blocking_ms,
            p.stall_over_dcp_async_blocking,
            p.lazarus_durable_ms,
            p.dcp_async_durable_ms,
            p.durable_over_dcp_async_durable,
            p.lazarus_one_writer_durable_ms,
            p.torch_save_durable_ms,
            p.one_writer_durable_over_torch_save_durable,
            p.lazarus_restore_ms,
            p.dcp_load_ms,
            p.restore_over_dcp_load,
        ));
    }
    s
}

fn print_details(r: &Row) {
    println!(
        "{} MiB ({} reps): stall {:.1} ms (copy {:.1}; cold staging {:.1}), durable {:.0} ms \
         (cold {:.0}), commit {:.1} ms, sync save {:.0} ms; raw write {:.0} ms (fsync {:.0}), \
         raw read {:.0} ms; \
         restore {:.0} ms (verify {:.0}); reshard 4->3: write {:.0} ms, restore {:.0} ms \
         (slowest rank {:.0}, {:.0} MiB verified)",
        r.size_mib,
        r.reps,
        r.stall_ms,
        r.stall_copy_ms,
        r.stall_cold_ms,
        r.durable_ms,
        r.durable_cold_ms,
        r.commit_ms,
        r.sync_save_ms,
        r.raw_write_ms,
        r.raw_fsync_ms,
        r.raw_read_ms,
        r.restore_ms,
        r.restore_verify_ms,
        r.reshard_write_ms,
        r.reshard_restore_ms,
        r.reshard_rank_max_ms,
        r.reshard_bytes_verified as f64 / (1 << 20) as f64,
    );
    println!(
        "  ratios: persist/raw write {:.2}, stall/sync save {:.4}, restore/raw read {:.2}; \
         load average {}",
        r.persist_over_raw_write,
        r.stall_over_sync_save,
        r.restore_over_raw_read,
        r.load_1m.map_or("unknown".into(), |l| format!("{l:.2}"))
    );
    if let Some(p) = &r.peer {
        println!(
            "  vs PyTorch {} on {} ranks: Lazarus stall {:.1} ms (cold {:.1}) vs DCP async_save \
             blocking {:.1} ms (cold {:.1}); durable {:.0} vs {:.0} ms (DCP save {:.0}); one \
             writer {:.0} ms vs torch.save {:.0} ms (blocking {:.0}); restore {:.0} vs DCP load \
             {:.0} ms",
            p.torch_version,
            p.ranks,
            p.lazarus_stall_ms,
            p.lazarus_stall_cold_ms,
            p.dcp_async_blocking_ms,
            p.dcp_async_blocking_cold_ms,
            p.lazarus_durable_ms,
            p.dcp_async_durable_ms,
            p.dcp_save_durable_ms,
            p.lazarus_one_writer_durable_ms,
            p.torch_save_durable_ms,
            p.torch_save_blocking_ms,
            p.lazarus_restore_ms,
            p.dcp_load_ms,
        );
    }
    if let Some(z) = &r.zstd {
        println!(
            "  zstd-{}: ratio {:.3}, stall {:.1} ms (cold {:.1}), durable {:.0} ms ({:.2} GB/s of state), restore {:.0} ms ({:.2} GB/s)",
            z.level, z.ratio, z.stall_ms, z.stall_cold_ms, z.durable_ms, z.persist_gbps, z.restore_ms, z.restore_gbps
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Driver

fn new_writer(b: &Bench, n: usize, compression: Compression) -> Result<AsyncWriter> {
    AsyncWriter::new(
        &b.ckpt_root(),
        0,
        1,
        LAYOUT_HASH.to_string(),
        flat_specs(n, 1, 0),
        compression,
    )
    .context("starting the async writer")
}

/// A first save into the untouched staging buffer (page faults included), then removed.
fn cold_save(b: &mut Bench, w: &mut AsyncWriter, st: &State) -> Result<AsyncSample> {
    let (step, dir) = b.new_step();
    sync_all_filesystems();
    let s = async_save(w, step, st)?;
    remove_dir(&dir)?;
    Ok(s)
}

/// Compressed saves at one size: a cold one, then `reps` measured saves and cold restores.
fn measure_zstd(
    b: &mut Bench,
    level: i32,
    reps: usize,
    st: &State,
    out: &mut State,
) -> Result<ZstdRow> {
    let mut w = new_writer(b, st.elems(), Compression::Zstd { level })?;
    let cold = cold_save(b, &mut w, st)?;
    let mut saves = Vec::with_capacity(reps);
    let mut restores = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (step, dir) = b.new_step();
        sync_all_filesystems();
        saves.push(async_save(&mut w, step, st)?);
        commit_step(&dir, step, 1)?;
        restores.push(cold_restore(b, &dir, 1, st, out)?.total_s);
        remove_dir(&dir)?;
    }
    let bytes = st.bytes();
    let durable = median(&saves.iter().map(|s| s.durable_s).collect::<Vec<_>>());
    let restore = median(&restores);
    let stored_bytes = saves[0].stored_bytes;
    Ok(ZstdRow {
        level,
        stored_bytes,
        ratio: stored_bytes as f64 / bytes as f64,
        stall_cold_ms: ms(cold.stall_s),
        stall_ms: ms(median(&saves.iter().map(|s| s.stall_s).collect::<Vec<_>>())),
        durable_ms: ms(durable),
        persist_gbps: gbps(bytes, durable),
        restore_ms: ms(restore),
        restore_gbps: gbps(bytes, restore),
    })
}

/// Lazarus with `world` shards, then the PyTorch peer, at the size of `row`; a failure of the
/// peer is recorded in the row, one of Lazarus is an error.
fn add_peer(
    b: &mut Bench,
    peer: &TorchPeer,
    world: usize,
    (st, out): (&State, &mut State),
    row: &mut Row,
) -> Result<()> {
    ensure!(
        world <= st.elems(),
        "more peer ranks than elements per array"
    );
    let laz = measure_sharded(b, world, row.reps, st, out)
        .with_context(|| format!("measuring Lazarus with {world} shards"))?;
    sync_all_filesystems();
    match peer.run(st.elems(), world, row.reps, &b.root) {
        Ok(t) => row.peer = Some(peer_row(world, laz, row.durable_ms + row.commit_ms, &t)),
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("the PyTorch peer failed at {} MiB: {msg}", row.size_mib);
            row.peer_error = Some(msg);
        }
    }
    Ok(())
}

fn measure_size(b: &mut Bench, mib: u64, args: &CkptArgs, peer: Option<&TorchPeer>) -> Result<Row> {
    let n = elems_for(mib);
    ensure!(n > 0, "{mib} MiB is too small for three arrays");
    let st = synth_state(n, args.seed);
    let mut out = State::zeroed(n);
    let reps = if mib <= args.small_mib {
        args.reps_small
    } else {
        1
    };
    let mut w = new_writer(b, n, Compression::None)?;
    let cold = cold_save(b, &mut w, &st)?;
    let samples = (0..reps)
        .map(|_| one_rep(b, &mut w, &st, &mut out))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("measuring {mib} MiB"))?;
    drop(w);
    let mut row = row_from(mib, st.bytes(), n, cold, &samples);
    if args.compress == CompressArg::Zstd {
        let z = measure_zstd(b, args.zstd_level, reps, &st, &mut out)
            .with_context(|| format!("measuring {mib} MiB with zstd"))?;
        row.zstd = Some(z);
    }
    if let Some(peer) = peer {
        add_peer(b, peer, args.peer_ranks, (&st, &mut out), &mut row)?;
    }
    row.load_1m = load_1m();
    Ok(row)
}

/// The 1-minute load average, if `/proc/loadavg` can be read.
fn load_1m() -> Option<f64> {
    let text = fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Whether the PyTorch peer ran, and with what.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// `measured`, `skipped` (with the reason) or `failed` (every size's row says why).
    pub status: String,
    pub reason: Option<String>,
    pub python: String,
    pub torch_version: Option<String>,
    pub ranks: usize,
}

/// Finds the peer's Python, or says why the peer is skipped.
fn find_peer(args: &CkptArgs) -> (Option<TorchPeer>, PeerStatus) {
    let python = torch_peer::resolve_python(args.torch_python.as_deref());
    let found = if args.peer_ranks == 0 {
        Err("--peer-ranks is 0".to_string())
    } else {
        torch_peer::probe(&python)
    };
    let mut status = PeerStatus {
        status: "measured".into(),
        reason: None,
        python: python.display().to_string(),
        torch_version: None,
        ranks: args.peer_ranks,
    };
    match found {
        Ok(p) => {
            println!(
                "PyTorch peer: torch {} from {}, {} ranks",
                p.torch_version, status.python, args.peer_ranks
            );
            status.torch_version = Some(p.torch_version.clone());
            (Some(p), status)
        }
        Err(reason) => {
            println!("skipped the PyTorch peer: {reason}");
            status.status = "skipped".into();
            status.reason = Some(reason);
            (None, status)
        }
    }
}

/// Runs the suite, prints details, ratios and the table, writes `ckpt-<date>.json`
/// (`ckpt-<date>-zstd.json` with `--compress zstd`).
pub fn run(args: &CkptArgs, out: &Path) -> Result<()> {
    ensure!(args.reps_small > 0, "--reps-small must be positive");
    ensure!(!args.sizes_mib.is_empty(), "--sizes-mib is empty");
    ensure!(
        (1..=22).contains(&args.zstd_level),
        "--zstd-level must be in 1..=22"
    );
    let t0 = Instant::now();
    fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("bench-tmp-ckpt-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a scratch directory in {}", args.dir.display()))?;
    let mut b = Bench {
        root: scratch.path().to_path_buf(),
        cache: CacheLog::default(),
        next_step: 0,
    };
    let dir = fs::canonicalize(&b.root).unwrap_or_else(|_| b.root.clone());
    println!("scratch directory {}", dir.display());
    let (peer, mut peer_status) = find_peer(args);
    let mut rows = Vec::with_capacity(args.sizes_mib.len());
    for &mib in &args.sizes_mib {
        let row = measure_size(&mut b, mib, args, peer.as_ref())?;
        print_details(&row);
        rows.push(row);
    }
    if peer.is_some() && rows.iter().all(|r| r.peer.is_none()) {
        peer_status.status = "failed".into();
    }
    scratch
        .close()
        .with_context(|| format!("removing {}", dir.display()))?;
    let runtime_s = t0.elapsed().as_secs_f64();
    let machine = Machine::current();
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let suffix = if args.compress == CompressArg::Zstd {
        "-zstd"
    } else {
        ""
    };
    let path = out.join(format!("ckpt-{}{suffix}.json", &machine.date_utc[..10]));
    let report = Report {
        suite: "ckpt",
        machine,
        dir: dir.display().to_string(),
        page_cache: b.cache.describe(),
        cache_drops: b.cache,
        runtime_s,
        peer: peer_status,
        rows: &rows,
    };
    fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "page cache: {} ({}/{} drops)",
        report.page_cache, b.cache.dropped, b.cache.attempts
    );
    println!("runtime {runtime_s:.1} s");
    print!("{}", table(&rows));
    if rows.iter().any(|r| r.peer.is_some()) {
        println!();
        print!("{}", peer_table(&rows));
        println!("{}", PEER_NOTE);
    }
    println!("wrote {}", path.display());
    Ok(())
}

/// A row with made-up numbers, for tests of the code that reads results.
#[cfg(test)]
pub fn example_row(mib: u64, with_peer: bool) -> Row {
    let save = AsyncSample {
        stall_s: 0.02,
        copy_s: 0.02,
        durable_s: 1.0,
        stored_bytes: 100,
    };
    let restore = RestoreSample {
        total_s: 0.5,
        rank_max_s: 0.2,
        verify_s: 0.3,
        bytes_verified: 150,
    };
    let s = Sample {
        raw_write_s: 0.8,
        raw_fsync_s: 0.5,
        raw_read_s: 0.4,
        save,
        commit_s: 0.001,
        restore,
        sync_save_s: 1.0,
        reshard_write_s: 1.1,
        reshard: restore,
    };
    let mut row = row_from(mib, mib << 20, 10, save, &[s]);
    if with_peer {
        let t = |b: f64, d: f64| torch_peer::SaveTimes {
            cold_blocking_ms: 2.0 * b,
            cold_durable_ms: 2.0 * d,
            blocking_ms: b,
            durable_ms: d,
        };
        let out = PeerOutput {
            torch_version: "2.15.0".into(),
            ranks: 2,
            elems_per_array: 10,
            state_bytes: 120,
            reps: 1,
            torch_save_measures: "one process".into(),
            dcp_measures: "2 gloo ranks".into(),
            torch_save: t(500.0, 800.0),
            dcp_save: t(900.0, 950.0),
            dcp_async_save: t(200.0, 1000.0),
            dcp_load: torch_peer::LoadTimes {
                cold_ms: 700.0,
                ms: 600.0,
                cold_cache: true,
            },
            runtime_s: 10.0,
        };
        let laz = ShardedTimes {
            stall_cold_s: 0.03,
            stall_s: 0.01,
            durable_s: 0.5,
            restore_s: 0.3,
        };
        row.peer = Some(peer_row(2, laz, 1001.0, &out));
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_reject() {
        assert_eq!(parse_mib("64"), Ok(64));
        assert_eq!(parse_mib(" 2048 "), Ok(2048));
        assert!(parse_mib("0").is_err());
        assert!(parse_mib("1.5").is_err());
        assert!(parse_mib("-3").is_err());
        assert!(parse_mib(&(SIZE_MIB_MAX + 1).to_string()).is_err());
        assert_eq!(elems_for(12), 1 << 20);
    }

    #[test]
    fn slices_tile_the_array() {
        for (n, w) in [(10, 3), (7, 4), (1 << 20, 3), (2, 4)] {
            let mut at = 0;
            for r in 0..w {
                let s = slice_range(n, w, r);
                assert_eq!(s.start, at);
                at = s.end;
            }
            assert_eq!(at, n);
        }
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[5.0]), 5.0);
    }

    #[test]
    fn synthetic_state_is_deterministic_and_weight_like() {
        let a = synth_state(3 * GEN_CHUNK_ELEMS / 2, 7);
        let b = synth_state(3 * GEN_CHUNK_ELEMS / 2, 7);
        assert!(a.same_bits(&b));
        let p = &a.arrays[0];
        let mean = p.iter().map(|&x| f64::from(x)).sum::<f64>() / p.len() as f64;
        let var = p.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / p.len() as f64;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 1e-3, "std {}", var.sqrt());
        assert!(a.arrays[2].iter().all(|&v| v >= 0.0));
    }

    fn row(mib: u64, zstd: bool) -> Row {
        let cold = AsyncSample {
            stall_s: 0.02,
            copy_s: 0.02,
            durable_s: 1.0,
            stored_bytes: 100,
        };
        let r = RestoreSample {
            total_s: 0.5,
            rank_max_s: 0.2,
            verify_s: 0.3,
            bytes_verified: 150,
        };
        let s = Sample {
            raw_write_s: 0.8,
            raw_fsync_s: 0.5,
            raw_read_s: 0.4,
            save: cold,
            commit_s: 0.001,
            restore: r,
            sync_save_s: 1.0,
            reshard_write_s: 1.1,
            reshard: r,
        };
        let mut row = row_from(mib, mib << 20, 10, cold, &[s]);
        row.zstd = zstd.then_some(ZstdRow {
            level: 1,
            stored_bytes: 90,
            ratio: 0.9,
            stall_cold_ms: 20.0,
            stall_ms: 10.0,
            durable_ms: 900.0,
            persist_gbps: 0.1,
            restore_ms: 600.0,
            restore_gbps: 0.2,
        });
        row
    }

    #[test]
    fn peer_ratios_divide_the_right_numbers() {
        let p = example_row(64, true).peer.unwrap();
        assert_eq!(p.lazarus_stall_ms, 10.0);
        assert_eq!(p.stall_over_dcp_async_blocking, 10.0 / 200.0);
        assert_eq!(p.durable_over_dcp_async_durable, 500.0 / 1000.0);
        assert_eq!(p.one_writer_durable_over_torch_save_durable, 1001.0 / 800.0);
        assert_eq!(p.restore_over_dcp_load, 300.0 / 600.0);
        let t = peer_table(&[example_row(64, true), example_row(256, false)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert_eq!(lines[0].matches('|').count(), lines[2].matches('|').count());
        assert!(
            lines[2].starts_with("| 64 MiB | 2 | 10.0 | 200.0 | 0.050 | 500 | 1000 | 0.50 |"),
            "{t}"
        );
    }

    #[test]
    fn sharded_saves_restore_the_same_bits_in_parallel() {
        let tmp = tempfile::tempdir().unwrap();
        let b = Bench {
            root: tmp.path().to_path_buf(),
            cache: CacheLog::default(),
            next_step: 0,
        };
        let st = synth_state(1001, 3);
        let mut ws = sharded_writers(&b, st.elems(), 3).unwrap();
        let dir = b.ckpt_root().join(step_dir_name(1));
        let save = sharded_save(&mut ws, 1, &st).unwrap();
        assert_eq!(save.stored_bytes, st.bytes());
        assert!(save.durable_s >= save.stall_s);
        commit_step(&dir, 1, 3).unwrap();
        for world in [3, 2] {
            let mut out = State::zeroed(st.elems());
            out.poison();
            restore_parallel(&dir, world, &mut out).unwrap();
            assert!(out.same_bits(&st), "restore as {world} ranks");
        }
    }

    #[test]
    fn without_torch_the_peer_is_skipped_with_the_reason() {
        #[derive(clap::Parser)]
        struct W {
            #[command(flatten)]
            a: CkptArgs,
        }
        let w = <W as clap::Parser>::try_parse_from(["x", "--torch-python", "/nonexistent/py"]);
        let (peer, status) = find_peer(&w.unwrap().a);
        assert!(peer.is_none());
        assert_eq!(status.status, "skipped");
        assert!(status.reason.unwrap().contains("/nonexistent/py"));
        let w = <W as clap::Parser>::try_parse_from(["x", "--peer-ranks", "0"]).unwrap();
        let (peer, status) = find_peer(&w.a);
        assert!(peer.is_none());
        assert_eq!(status.reason.as_deref(), Some("--peer-ranks is 0"));
    }

    #[test]
    fn rank_slices_tile_each_array() {
        let mut st = State::zeroed(10);
        let slices = rank_slices(&mut st, 3);
        assert_eq!(slices.len(), 3);
        let lens: Vec<usize> = slices.iter().map(|s| s[0].len()).collect();
        assert_eq!(lens, [3, 3, 4]);
        assert!(slices
            .iter()
            .all(|s| s[0].len() == s[1].len() && s[1].len() == s[2].len()));
    }

    #[test]
    fn table_has_one_line_per_size_and_matching_columns() {
        for zstd in [false, true] {
            let t = table(&[row(64, zstd), row(256, false)]);
            let lines: Vec<&str> = t.lines().collect();
            assert_eq!(lines.len(), 4, "{t}");
            let cols = lines[0].matches('|').count();
            assert!(lines.iter().all(|l| l.matches('|').count() == cols), "{t}");
            assert!(
                lines[2].starts_with("| 64 MiB | 20.0 (20.0) | 1000 | 0.020 |"),
                "{t}"
            );
            assert_eq!(lines[0].contains("zstd"), zstd);
        }
    }
}
