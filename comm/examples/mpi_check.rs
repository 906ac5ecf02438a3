//! Checks the MPI backend under `mpirun`: every collective against a sequential rank-order
//! reference and against the threads backend (bitwise), plus the modes the fault tests drive.
//!
//! ```text
//! mpirun -np 4 --oversubscribe mpi_check check [TIMEOUT_MS]
//! mpirun -np 4 --oversubscribe mpi_check loop TIMEOUT_MS PID_DIR   # all-reduces until killed
//! mpirun -np 3 --oversubscribe mpi_check hang TIMEOUT_MS           # rank 1 never arrives
//! ```
//! Exit code 0 when every check passes, 1 on a wrong result, 2 on a collective error; the
//! watchdog exits 3 when a collective outlives its deadline.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use lazarus_comm::{CommError, Communicator, MpiComm, ThreadsComm};

/// How long the `loop` mode runs at most if nobody kills it.
const LOOP_DURATION_MS_MAX: u64 = 120_000;
/// How long rank 1 of the `hang` mode stays away from the barrier.
const HANG_SLEEP_MS: u64 = 30_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("check");
    let timeout_ms = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60_000);
    let comm = match MpiComm::init(timeout_ms) {
        Ok(comm) => comm,
        Err(e) => {
            eprintln!("mpi_check: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = match mode {
        "check" => check_all(&comm),
        "loop" => run_loop(&comm, args.get(2).map(String::as_str).unwrap_or(".")),
        "hang" => hang(&comm),
        other => Err(format!("unknown mode `{other}`; use check, loop or hang")),
    };
    let (rank, world) = (comm.rank(), comm.world_size());
    drop(comm);
    match outcome {
        Ok(()) => {
            println!("mpi_check: rank {rank} of {world}: {mode} ok");
            lazarus_comm::mpi::finalize();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mpi_check: rank {rank}: {e}");
            lazarus_comm::mpi::abort(if e.starts_with("wrong") { 1 } else { 2 })
        }
    }
}

/// A deterministic value of element `i` on rank `rank`, spread over several binades so that the
/// order of addition shows in the low bits (the same generator as the threads tests).
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

/// Element-wise sum over `world` ranks' inputs in rank order, starting from rank 0's value.
fn reference_sum(world: usize, len: usize) -> Vec<f32> {
    let mut acc = input(0, len);
    for r in 1..world {
        acc.iter_mut().zip(input(r, len)).for_each(|(a, b)| *a += b);
    }
    acc
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("wrong result: {}", what()))
    }
}

fn comm_err(e: CommError) -> String {
    format!("collective failed: {e}")
}

/// The all-reduce of the threads backend over the same inputs, for a bitwise comparison.
fn threads_all_reduce(world: usize, len: usize) -> Vec<f32> {
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadsComm::group(world, 60_000)
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let mut buf = input(c.rank(), len);
                    c.all_reduce_sum_f32(&mut buf).map(|()| buf)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        match results.into_iter().next() {
            Some(Ok(Ok(buf))) => buf,
            _ => Vec::new(),
        }
    })
}

fn check_all(c: &MpiComm) -> Result<(), String> {
    let (rank, world) = (c.rank(), c.world_size());
    for len in [0, 1, 5, 1023, 100_003] {
        let mut buf = input(rank, len);
        c.all_reduce_sum_f32(&mut buf).map_err(comm_err)?;
        let want = reference_sum(world, len);
        ensure(same_bits(&buf, &want), || {
            format!("all_reduce_sum_f32 len {len}")
        })?;
        for repeat in 0..2 {
            let mut again = input(rank, len);
            c.all_reduce_sum_f32(&mut again).map_err(comm_err)?;
            ensure(same_bits(&again, &buf), || {
                format!("repeat {repeat} len {len}")
            })?;
        }
        let mut wide: Vec<f64> = input(rank, len).iter().map(|&x| f64::from(x)).collect();
        c.all_reduce_sum_f64(&mut wide).map_err(comm_err)?;
        let mut want64: Vec<f64> = input(0, len).iter().map(|&x| f64::from(x)).collect();
        for r in 1..world {
            want64
                .iter_mut()
                .zip(input(r, len))
                .for_each(|(a, b)| *a += f64::from(b));
        }
        let same64 = wide
            .iter()
            .zip(&want64)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        ensure(same64, || format!("all_reduce_sum_f64 len {len}"))?;
    }
    let threads = threads_all_reduce(world, 100_003);
    ensure(same_bits(&threads, &reference_sum(world, 100_003)), || {
        "threads backend differs from the MPI backend".to_string()
    })?;
    check_scatter_gather(c)?;
    check_small(c)?;
    check_bad_arguments(c)
}

fn check_scatter_gather(c: &MpiComm) -> Result<(), String> {
    let (rank, world) = (c.rank(), c.world_size());
    for part in [0, 1, 3, 25_001] {
        let send = input(rank, part * world);
        let mut recv = vec![f32::NAN; part];
        c.reduce_scatter_sum_f32(&send, &mut recv)
            .map_err(comm_err)?;
        let mut full = send.clone();
        c.all_reduce_sum_f32(&mut full).map_err(comm_err)?;
        let slice = &full[rank * part..(rank + 1) * part];
        ensure(same_bits(&recv, slice), || {
            format!("reduce_scatter part {part}")
        })?;
        let mut gathered = vec![f32::NAN; part * world];
        c.all_gather_f32(&input(rank, part), &mut gathered)
            .map_err(comm_err)?;
        let want: Vec<f32> = (0..world).flat_map(|r| input(r, part)).collect();
        ensure(same_bits(&gathered, &want), || {
            format!("all_gather part {part}")
        })?;
    }
    Ok(())
}

fn check_small(c: &MpiComm) -> Result<(), String> {
    let (rank, world) = (c.rank(), c.world_size());
    for root in 0..world {
        let mut bytes = vec![rank as u8; 1000];
        if rank == root {
            bytes.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        }
        c.broadcast_bytes(&mut bytes, root).map_err(comm_err)?;
        let want: Vec<u8> = (0..1000).map(|i| i as u8).collect();
        ensure(bytes == want, || format!("broadcast from root {root}"))?;
    }
    for round in 0..20u64 {
        c.barrier().map_err(comm_err)?;
        let v = (rank as u64 * 7 + round) % 5;
        let all: Vec<u64> = (0..world as u64).map(|r| (r * 7 + round) % 5).collect();
        let min = c.all_reduce_min_u64(v).map_err(comm_err)?;
        let max = c.all_reduce_max_u64(v).map_err(comm_err)?;
        ensure(Some(&min) == all.iter().min(), || {
            format!("min round {round}")
        })?;
        ensure(Some(&max) == all.iter().max(), || {
            format!("max round {round}")
        })?;
    }
    Ok(())
}

/// Mismatched calls must fail with `BadArgument` on every rank, and leave the communicator usable.
fn check_bad_arguments(c: &MpiComm) -> Result<(), String> {
    let (rank, world) = (c.rank(), c.world_size());
    let bad = |r: Result<(), CommError>, what: &str| match r {
        Err(CommError::BadArgument { .. }) => Ok(()),
        other => Err(format!(
            "wrong result: {what} gave {other:?}, expected BadArgument"
        )),
    };
    let mut recv = vec![0.0f32; 3];
    let send = vec![1.0f32; 3 * world + 1];
    bad(
        c.reduce_scatter_sum_f32(&send, &mut recv),
        "reduce_scatter of an unpadded buffer",
    )?;
    if world > 1 {
        let mut buf = vec![1.0f32; 10 + rank];
        bad(
            c.all_reduce_sum_f32(&mut buf),
            "all_reduce of unequal lengths",
        )?;
        let ops = if rank == 1 {
            c.barrier()
        } else {
            c.all_reduce_max_u64(1).map(|_| ())
        };
        bad(ops, "different collectives")?;
    }
    bad(
        c.broadcast_bytes(&mut [0u8; 4], world),
        "broadcast from a missing root",
    )?;
    let mut buf = vec![1.0f32; 4];
    c.all_reduce_sum_f32(&mut buf).map_err(comm_err)?;
    ensure(buf == vec![world as f32; 4], || {
        "all_reduce after bad calls".into()
    })
}

/// Writes this rank's pid to `PID_DIR/rank-R.pid`, then all-reduces until killed (bounded by
/// `LOOP_DURATION_MS_MAX`). The fault test kills one rank and expects the others to go down.
fn run_loop(c: &MpiComm, pid_dir: &str) -> Result<(), String> {
    let path = format!("{pid_dir}/rank-{}.pid", c.rank());
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, std::process::id().to_string())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("cannot write {path}: {e}"))?;
    let start = Instant::now();
    let mut buf = vec![1.0f32; 100_000];
    while start.elapsed() < Duration::from_millis(LOOP_DURATION_MS_MAX) {
        buf.fill(1.0);
        c.all_reduce_sum_f32(&mut buf).map_err(comm_err)?;
        c.barrier().map_err(comm_err)?;
    }
    Ok(())
}

/// Rank 1 stays away from the barrier; the others' watchdogs must end them after the timeout.
fn hang(c: &MpiComm) -> Result<(), String> {
    if c.rank() == 1 {
        std::thread::sleep(Duration::from_millis(HANG_SLEEP_MS));
    }
    c.barrier().map_err(comm_err)
}
