//! The NCCL backend (feature `cuda`). On any machine: the whole `NcclComm` path (library checks,
//! the file rendezvous, the owner thread, every collective on host and device buffers, the
//! watchdog's abort) against stand-in CUDA and NCCL libraries built from `stub/*.c` with the
//! system C compiler, in a child process whose LD_LIBRARY_PATH holds them; the stand-in sums in
//! rank order, so results must equal the threads backend's bit for bit. On a machine with a GPU
//! and NCCL: the real libraries with one rank, and with two when there are two GPUs. A test that
//! cannot run prints why and passes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use cudarc::driver::CudaContext;
use lazarus_comm::nccl::libraries_available;
use lazarus_comm::{CommError, Communicator, NcclComm, SingleRank, ThreadsComm};

/// Names the scenario a child process runs; unset in an ordinary test run.
const SCENARIO_ENV: &str = "LAZARUS_NCCL_STUB_SCENARIO";
/// What a child prints when its scenario passed, so the parent knows it ran (a filter that
/// matches no test would also exit 0).
const SCENARIO_PASSED: &str = "stub scenario passed:";
/// Bound on one child process; the scenarios take seconds.
const CHILD_LIMIT_MS: u64 = 120_000;
const CHILD_POLL_MS: u64 = 20;
/// Deadline of collectives that are meant to complete.
const TIMEOUT_MS_OK: u64 = 30_000;
/// Deadline of collectives that are meant to time out.
const TIMEOUT_MS_HANG: u64 = 300;

// ---------------------------------------------------------------------------------------------
// Scripts: the same collectives on any backend, results as bit patterns.

/// A deterministic value of element `i` on rank `rank`, spread over several binades so that the
/// order of addition shows in the low bits.
fn value(rank: usize, i: usize) -> f32 {
    let mut h = ((rank as u64) << 40) ^ (i as u64) ^ 0x9e37_79b9_7f4a_7c15;
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let mantissa = (h & 0xff_ffff) as f32 / 16_777_216.0 - 0.5;
    mantissa * 2f32.powi((h >> 24) as i32 % 16 - 8)
}

fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| value(rank, i)).collect()
}

fn input_f64(rank: usize, len: usize) -> Vec<f64> {
    (0..len)
        .map(|i| f64::from(value(rank, i)) * 1.000_000_1)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u64> {
    v.iter().map(|x| u64::from(x.to_bits())).collect()
}

fn bits64(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

const LENS: [usize; 5] = [0, 1, 7, 1000, 40_000];

/// Every `Communicator` method on rank-dependent data; one entry per call.
fn host_script(c: &dyn Communicator) -> Vec<Vec<u64>> {
    let (r, w) = (c.rank(), c.world_size());
    let mut out = Vec::new();
    for len in LENS {
        let mut buf = input(r, len);
        c.all_reduce_sum_f32(&mut buf).unwrap();
        out.push(bits(&buf));
        let mut buf = input_f64(r, len);
        c.all_reduce_sum_f64(&mut buf).unwrap();
        out.push(bits64(&buf));
        let send = input(r, w * len);
        let mut recv = vec![0.0f32; len];
        c.reduce_scatter_sum_f32(&send, &mut recv).unwrap();
        out.push(bits(&recv));
        let send = input(r + 7, len);
        let mut recv = vec![f32::NAN; w * len];
        c.all_gather_f32(&send, &mut recv).unwrap();
        out.push(bits(&recv));
        let root = len % w;
        let mut bytes: Vec<u8> = (0..len).map(|i| (i * 31 + r * 7) as u8).collect();
        c.broadcast_bytes(&mut bytes, root).unwrap();
        out.push(bytes.iter().map(|&b| u64::from(b)).collect());
    }
    c.barrier().unwrap();
    out.push(vec![c.all_reduce_min_u64(100 + r as u64).unwrap()]);
    out.push(vec![c.all_reduce_max_u64(u64::MAX - 5 + r as u64).unwrap()]);
    out
}

/// What [`device_script`] computes, with the host methods of any backend.
fn device_reference(c: &dyn Communicator) -> Vec<Vec<u64>> {
    let (r, w) = (c.rank(), c.world_size());
    let mut out = Vec::new();
    for len in [1usize, 5, 1000] {
        let mut buf = input(r, len);
        c.all_reduce_sum_f32(&mut buf).unwrap();
        out.push(bits(&buf));
        let mut buf = input_f64(r, len);
        c.all_reduce_sum_f64(&mut buf).unwrap();
        out.push(bits64(&buf));
        let send = input(r, w * len);
        let mut recv = vec![0.0f32; len];
        c.reduce_scatter_sum_f32(&send, &mut recv).unwrap();
        out.push(bits(&recv));
        out.push(bits(&recv));
        let send = input(r + 7, len);
        let mut recv = vec![0.0f32; w * len];
        c.all_gather_f32(&send, &mut recv).unwrap();
        out.push(bits(&recv));
        out.push(bits(&recv));
        // An all-reduce of a view: element 0 is outside it and keeps the rank's value.
        let mut buf = input(r, len + 1);
        c.all_reduce_sum_f32(&mut buf[1..]).unwrap();
        out.push(bits(&buf));
    }
    out
}

/// The device methods on the data of [`device_reference`], ordered after a stream of the
/// caller's own.
fn device_script(c: &NcclComm) -> Vec<Vec<u64>> {
    let (r, w) = (c.rank(), c.world_size());
    let stream = c.context().new_stream().unwrap();
    let mut out = Vec::new();
    for len in [1usize, 5, 1000] {
        let mut buf = stream.clone_htod(&input(r, len)).unwrap();
        c.all_reduce_sum_f32_device(&stream, &mut buf).unwrap();
        out.push(bits(&stream.clone_dtoh(&buf).unwrap()));
        let mut buf = stream.clone_htod(&input_f64(r, len)).unwrap();
        c.all_reduce_sum_device(&stream, &mut buf).unwrap();
        out.push(bits64(&stream.clone_dtoh(&buf).unwrap()));
        let send = stream.clone_htod(&input(r, w * len)).unwrap();
        let mut recv = stream.alloc_zeros::<f32>(len).unwrap();
        c.reduce_scatter_sum_f32_device(&stream, &send, &mut recv)
            .unwrap();
        out.push(bits(&stream.clone_dtoh(&recv).unwrap()));
        let mut buf = stream.clone_htod(&input(r, w * len)).unwrap();
        c.reduce_scatter_sum_device_in_place(&stream, &mut buf)
            .unwrap();
        let all = stream.clone_dtoh(&buf).unwrap();
        out.push(bits(&all[r * len..(r + 1) * len]));
        let send = stream.clone_htod(&input(r + 7, len)).unwrap();
        let mut recv = stream.alloc_zeros::<f32>(w * len).unwrap();
        c.all_gather_f32_device(&stream, &send, &mut recv).unwrap();
        out.push(bits(&stream.clone_dtoh(&recv).unwrap()));
        let mut whole = vec![f32::NAN; w * len];
        whole[r * len..(r + 1) * len].copy_from_slice(&input(r + 7, len));
        let mut buf = stream.clone_htod(&whole).unwrap();
        c.all_gather_device_in_place(&stream, &mut buf).unwrap();
        out.push(bits(&stream.clone_dtoh(&buf).unwrap()));
        let mut buf = stream.clone_htod(&input(r, len + 1)).unwrap();
        let mut view = buf.slice_mut(1..);
        c.all_reduce_sum_f32_device(&stream, &mut view).unwrap();
        out.push(bits(&stream.clone_dtoh(&buf).unwrap()));
    }
    // Argument errors are found before any collective, so every rank can make them.
    let mut odd = stream.alloc_zeros::<f32>(w * 3 + 1).unwrap();
    let e = c
        .reduce_scatter_sum_device_in_place(&stream, &mut odd)
        .unwrap_err();
    assert!(matches!(e, CommError::BadArgument { .. }), "{e}");
    out
}

/// Asserts that two runs of a script agree, naming the first difference (rank, call, element)
/// instead of printing megabytes of numbers.
fn assert_same(got: &[Vec<Vec<u64>>], want: &[Vec<Vec<u64>>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rank count");
    for (rank, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.len(),
            w.len(),
            "{what}: rank {rank} made another number of calls"
        );
        for (call, (gc, wc)) in g.iter().zip(w).enumerate() {
            assert_eq!(
                gc.len(),
                wc.len(),
                "{what}: rank {rank}, call {call}: length"
            );
            if let Some(i) = (0..gc.len()).find(|&i| gc[i] != wc[i]) {
                panic!(
                    "{what}: rank {rank}, call {call}, element {i} of {}: got bits {:#x}, want \
                     {:#x}",
                    gc.len(),
                    gc[i],
                    wc[i]
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running ranks.

/// Runs `f` on every rank of a fresh threads group; results by rank.
fn on_threads<R: Send>(world: usize, f: impl Fn(&dyn Communicator) -> R + Sync) -> Vec<R> {
    let f = &f;
    thread::scope(|s| {
        let handles: Vec<_> = ThreadsComm::group(world, TIMEOUT_MS_OK)
            .into_iter()
            .map(|c| s.spawn(move || f(&c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Starts `world` NCCL ranks as threads (rank r on device r) through the file rendezvous in
/// `dir` and runs `f` on each; results by rank.
fn on_nccl<R: Send>(
    world: usize,
    dir: &Path,
    key: &str,
    timeout_ms: u64,
    f: impl Fn(NcclComm) -> R + Sync,
) -> Vec<R> {
    let f = &f;
    thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn(move || {
                    let c = NcclComm::init(rank, world, rank, dir, key, timeout_ms)
                        .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                    f(c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Rank `world - 1` never calls the collective; the others' calls must time out, abort, and
/// make later calls fail at once. The silent rank keeps its communicator until they are done, as
/// a hung (not a dead) peer would.
fn a_silent_rank_times_out_the_others(world: usize, dir: &Path, key: &str) {
    let done = Barrier::new(world);
    // Set up with the long deadline (NCCL's setup takes seconds on real GPUs), then shortened.
    let errors = on_nccl(world, dir, key, TIMEOUT_MS_OK, |mut c| {
        c.set_collective_timeout_ms(TIMEOUT_MS_HANG);
        if c.rank() == world - 1 {
            done.wait();
            return None;
        }
        let mut buf = vec![1.0f32; 4096];
        let err = c.all_reduce_sum_f32(&mut buf).unwrap_err();
        let again = c.barrier().unwrap_err();
        let stream = c.stream().clone();
        let mut dev = stream.alloc_zeros::<f32>(8).unwrap();
        let on_device = c.all_reduce_sum_f32_device(&stream, &mut dev).unwrap_err();
        done.wait();
        Some((err, again, on_device))
    });
    for (err, again, on_device) in errors.into_iter().flatten() {
        match &err {
            CommError::Timeout { op, timeout_ms, .. } => {
                assert_eq!(*op, "all_reduce_sum_f32");
                assert_eq!(*timeout_ms, TIMEOUT_MS_HANG);
            }
            other => panic!("expected a timeout, got {other}"),
        }
        for later in [again, on_device] {
            let text = later.to_string();
            assert!(matches!(later, CommError::Backend { .. }), "{text}");
            assert!(
                text.contains("aborted after `all_reduce_sum_f32` timed out"),
                "{text}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The stand-in libraries.

fn stub_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/stub")
        .join(name)
}

/// Compiles the stand-in driver into `dir/cuda_name` and NCCL into `dir/nccl_name` (each when
/// given); `false`, after printing why the test is skipped, when there is no C compiler.
fn build_stubs(dir: &Path, cuda_name: Option<&str>, nccl_name: Option<&str>) -> bool {
    let builds = [("cuda_stub.c", cuda_name), ("nccl_stub.c", nccl_name)];
    for (source, name) in builds {
        let Some(name) = name else { continue };
        let built = Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(dir.join(name))
            .arg(stub_source(source))
            .arg("-lpthread")
            .status();
        match built {
            Ok(status) if status.success() => {}
            Ok(status) => panic!("compiling {source} failed ({status})"),
            Err(e) => {
                println!("skipped: no C compiler (`cc`: {e}) to build the stand-in libraries");
                return false;
            }
        }
    }
    true
}

/// Runs scenario `name` in a child process of this test binary with `lib_dir` as its library
/// path, waits for it (bounded) and checks that it passed.
fn run_scenario(name: &str, lib_dir: &Path, scratch: &Path) {
    let exe = std::env::current_exe().expect("path of the test binary");
    let stdout = scratch.join(format!("{name}.stdout"));
    let stderr = scratch.join(format!("{name}.stderr"));
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "nccl::stub_child",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("LD_LIBRARY_PATH", lib_dir)
        .env(SCENARIO_ENV, name)
        .env("STUB_NCCL_LOG", scratch.join(format!("{name}.log")))
        .stdout(Stdio::from(std::fs::File::create(&stdout).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
        .spawn()
        .expect("start the child test process");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > Duration::from_millis(CHILD_LIMIT_MS) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(CHILD_POLL_MS));
    };
    let out = std::fs::read_to_string(&stdout).unwrap_or_default();
    let err = std::fs::read_to_string(&stderr).unwrap_or_default();
    let shown = format!("--- stdout\n{out}\n--- stderr\n{err}");
    let status =
        status.unwrap_or_else(|| panic!("scenario {name} ran over {CHILD_LIMIT_MS} ms\n{shown}"));
    assert!(
        status.success(),
        "scenario {name} failed: {status}\n{shown}"
    );
    let skipped = out.lines().find(|l| l.starts_with("skipped:"));
    if let Some(line) = skipped {
        println!("scenario {name} {line}");
        return;
    }
    assert!(
        out.contains(&format!("{SCENARIO_PASSED} {name}")),
        "scenario {name} did not run\n{shown}"
    );
}

#[test]
fn the_whole_path_runs_against_stand_in_libraries() {
    let tmp = tempfile::tempdir().unwrap();
    if !build_stubs(tmp.path(), Some("libcuda.so"), Some("libnccl.so")) {
        return;
    }
    run_scenario("full", tmp.path(), tmp.path());
}

#[test]
fn nccl_without_its_libnccl_so_link_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    if !build_stubs(tmp.path(), Some("libcuda.so"), Some("libnccl.so.2")) {
        return;
    }
    run_scenario("no_symlink", tmp.path(), tmp.path());
}

#[test]
fn a_missing_driver_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    if !build_stubs(tmp.path(), None, Some("libnccl.so")) {
        return;
    }
    run_scenario("no_driver", tmp.path(), tmp.path());
}

/// The scenarios, run by the tests above in a child process with the stand-in libraries.
#[test]
#[ignore = "run in a child process by the stand-in library tests"]
fn stub_child() {
    let Ok(scenario) = std::env::var(SCENARIO_ENV) else {
        println!("nothing to do: {SCENARIO_ENV} is not set");
        return;
    };
    match scenario.as_str() {
        "full" => stub_full(),
        "no_symlink" => stub_no_symlink(),
        "no_driver" => stub_no_driver(),
        other => panic!("unknown scenario {other}"),
    }
    println!("{SCENARIO_PASSED} {scenario}");
}

fn stub_full() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // Every collective on host slices, through the file rendezvous, against the threads
    // backend and (one rank) against SingleRank.
    let want = on_threads(3, host_script);
    let got = on_nccl(3, dir, "full-host", TIMEOUT_MS_OK, |c| host_script(&c));
    assert_same(&got, &want, "host collectives of 3 ranks");
    assert!(
        !dir.join("nccl-id-full-host").exists(),
        "rank 0 removes the id file once every rank has joined"
    );
    let got = on_nccl(1, dir, "full-one", TIMEOUT_MS_OK, |c| host_script(&c));
    assert_same(&got, &[host_script(&SingleRank::new())], "one rank");

    // Every collective on device buffers.
    let want = on_threads(3, device_reference);
    let got = on_nccl(3, dir, "full-device", TIMEOUT_MS_OK, |c| device_script(&c));
    assert_same(&got, &want, "device collectives of 3 ranks");

    // The id broadcast over another communicator.
    let want = on_threads(2, host_script);
    let got = on_threads(2, |bootstrap| {
        let c = NcclComm::init_through(bootstrap, bootstrap.rank(), TIMEOUT_MS_OK).unwrap();
        host_script(&c)
    });
    assert_same(&got, &want, "init_through");

    stub_argument_errors(dir);
    a_silent_rank_times_out_the_others(3, dir, "full-hang");

    // A peer that never starts: NCCL's setup times out instead of hanging.
    let e = NcclComm::init(0, 2, 0, dir, "full-lonely", TIMEOUT_MS_HANG).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, CommError::Setup { .. }), "{text}");
    assert!(text.contains("did not come up within 300 ms"), "{text}");

    // Every communicator was aborted exactly once: by its watchdog or when it was dropped.
    let log = std::env::var("STUB_NCCL_LOG").unwrap();
    let log = std::fs::read_to_string(log).unwrap();
    let inits: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("init "))
        .collect();
    assert!(inits.len() >= 14, "{log}");
    for comm in &inits {
        let aborts = log
            .lines()
            .filter(|l| *l == format!("abort {comm}"))
            .count();
        assert_eq!(aborts, 1, "communicator {comm}:\n{log}");
    }
    assert!(!log.contains("destroy"), "{log}");
}

fn stub_argument_errors(dir: &Path) {
    let mut c = NcclComm::init(0, 1, 0, dir, "full-args", TIMEOUT_MS_OK).unwrap();
    let bad = |e: CommError, want: &str| {
        let text = e.to_string();
        assert!(matches!(e, CommError::BadArgument { .. }), "{text}");
        assert!(text.contains(want), "{want}: {text}");
    };
    bad(
        c.reduce_scatter_sum_f32(&[1.0; 3], &mut [0.0; 2])
            .unwrap_err(),
        "world size 1",
    );
    bad(
        c.all_gather_f32(&[1.0; 2], &mut [0.0; 3]).unwrap_err(),
        "expected world size",
    );
    bad(c.broadcast_bytes(&mut [0; 4], 1).unwrap_err(), "root 1");
    let other_device = CudaContext::new(1).unwrap().new_stream().unwrap();
    let mut buf = c.stream().alloc_zeros::<f32>(4).unwrap();
    bad(
        c.all_reduce_sum_f32_device(&other_device, &mut buf)
            .unwrap_err(),
        "device 1",
    );
    // None of that broke the communicator.
    c.barrier().unwrap();
    c.set_collective_timeout_ms(TIMEOUT_MS_HANG);
    assert_eq!(c.timeout(), Duration::from_millis(TIMEOUT_MS_HANG));
    assert_eq!(c.all_reduce_max_u64(3).unwrap(), 3);
    drop(c);

    let e = NcclComm::init(0, 1, 9, dir, "full-nodev", TIMEOUT_MS_OK).unwrap_err();
    assert!(e.to_string().contains("CUDA device 9 was asked for"), "{e}");
    assert!(
        !dir.join("nccl-id-full-nodev").exists(),
        "a rank without its GPU fails before publishing"
    );
    for key in ["", "../up"] {
        let e = NcclComm::init(0, 1, 0, dir, key, TIMEOUT_MS_OK).unwrap_err();
        assert!(matches!(e, CommError::BadArgument { .. }), "{e}");
    }
}

fn stub_no_symlink() {
    // SAFETY: only tries to open the library under cudarc's names; no NCCL call is made.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        println!("skipped: a real NCCL is on the library search path");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let e = NcclComm::init(0, 1, 0, tmp.path(), "k", TIMEOUT_MS_OK).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, CommError::Setup { .. }), "{text}");
    assert!(text.contains("installed as libnccl.so.2"), "{text}");
    assert!(text.contains("libnccl.so -> libnccl.so.2"), "{text}");
    assert!(NcclComm::new_id(0).is_err());
}

fn stub_no_driver() {
    // SAFETY: only tries to open the library under cudarc's names; no CUDA call is made.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        println!("skipped: a real CUDA driver is on the library search path");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let e = NcclComm::init(0, 1, 0, tmp.path(), "k", TIMEOUT_MS_OK).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, CommError::Setup { .. }), "{text}");
    assert!(
        text.contains("CUDA driver library could not be opened"),
        "{text}"
    );
    assert!(text.contains("libcuda.so"), "{text}");
    let e = on_threads(2, |bootstrap| {
        NcclComm::init_through(bootstrap, 0, TIMEOUT_MS_OK).unwrap_err()
    });
    assert!(
        e.iter().all(|e| matches!(e, CommError::Setup { .. })),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// A real GPU, where there is one.

/// Whether `ranks` GPUs and NCCL are here; prints why not.
fn gpus_or_skip(ranks: usize) -> bool {
    let required = std::env::var("LAZARUS_REQUIRE_NCCL").as_deref() == Ok("1");
    if let Err(why) = libraries_available() {
        // On the GPU check a missing GPU or NCCL fails the one-rank tests instead of skipping.
        assert!(
            !(required && ranks == 1),
            "LAZARUS_REQUIRE_NCCL=1 but {why}"
        );
        println!("skipped: no usable CUDA/NCCL here: {why}");
        return false;
    }
    match CudaContext::device_count() {
        Ok(n) if n as usize >= ranks => true,
        Ok(n) => {
            println!("skipped: {n} CUDA device(s) visible, the test needs {ranks}");
            false
        }
        Err(e) => {
            println!("skipped: the CUDA driver failed: {e:?}");
            false
        }
    }
}

#[test]
fn one_rank_on_a_real_gpu_matches_single_rank() {
    if !gpus_or_skip(1) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = NcclComm::init(0, 1, 0, tmp.path(), "gpu-one", TIMEOUT_MS_OK).unwrap();
    let reference = SingleRank::new();
    assert_same(&[host_script(&c)], &[host_script(&reference)], "host");
    assert_same(
        &[device_script(&c)],
        &[device_reference(&reference)],
        "device",
    );
    // A deadline too short for a large collective: the call returns, done or timed out, and a
    // timed-out communicator refuses later calls.
    c.set_collective_timeout_ms(0);
    let mut big = vec![1.0f32; 64 << 20];
    match c.all_reduce_sum_f32(&mut big) {
        Ok(()) => assert!(big.iter().all(|&x| x == 1.0)),
        Err(CommError::Timeout { .. }) => {
            c.set_collective_timeout_ms(TIMEOUT_MS_OK);
            assert!(matches!(c.barrier(), Err(CommError::Backend { .. })));
        }
        Err(other) => panic!("{other}"),
    }
}

#[test]
fn a_peer_that_never_joins_times_out_on_a_real_gpu() {
    if !gpus_or_skip(1) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let e = NcclComm::init(0, 2, 0, tmp.path(), "gpu-lonely", 2_000).unwrap_err();
    assert!(e.to_string().contains("did not come up"), "{e}");
}

#[test]
fn two_ranks_on_real_gpus_match_the_threads_backend() {
    if !gpus_or_skip(2) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // With two ranks every sum is a single addition, which is the same in any order: NCCL's
    // results must equal the rank-order ones bit for bit.
    let want = on_threads(2, host_script);
    let got = on_nccl(2, tmp.path(), "gpu-two", TIMEOUT_MS_OK, |c| host_script(&c));
    assert_same(&got, &want, "host");
    let want = on_threads(2, device_reference);
    let got = on_nccl(2, tmp.path(), "gpu-two-dev", TIMEOUT_MS_OK, |c| {
        device_script(&c)
    });
    assert_same(&got, &want, "device");
    a_silent_rank_times_out_the_others(2, tmp.path(), "gpu-two-hang");
}
