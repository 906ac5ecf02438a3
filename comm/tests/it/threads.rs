//! The threads backend: every collective for 1 to 4 ranks against a sequential rank-order
//! reference (bitwise), argument checks, deadlines, lost ranks, and repeatability.

use std::thread;
use std::time::{Duration, Instant};

use lazarus_comm::{CommError, Communicator, SingleRank, ThreadsComm};

const TIMEOUT_MS_TEST: u64 = 20_000;
const LENS: [usize; 6] = [0, 1, 5, 1023, 4099, 100_003];

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

fn inputs(world: usize, len: usize) -> Vec<Vec<f32>> {
    (0..world)
        .map(|r| (0..len).map(|i| value(r, i)).collect())
        .collect()
}

/// Element-wise sum in rank order, starting from rank 0's value.
fn reference_sum(inputs: &[Vec<f32>]) -> Vec<f32> {
    let mut acc = inputs[0].clone();
    for other in &inputs[1..] {
        for (a, b) in acc.iter_mut().zip(other) {
            *a += *b;
        }
    }
    acc
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs `f` on every rank of a fresh group, one thread per rank; returns the results by rank.
fn on_ranks<R: Send>(world: usize, timeout_ms: u64, f: impl Fn(ThreadsComm) -> R + Sync) -> Vec<R> {
    let f = &f;
    thread::scope(|s| {
        let handles: Vec<_> = ThreadsComm::group(world, timeout_ms)
            .into_iter()
            .map(|c| s.spawn(move || f(c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn all_reduce_f32_is_the_rank_order_sum_bitwise() {
    for world in 1..=4 {
        for len in LENS {
            let ins = inputs(world, len);
            let want = bits(&reference_sum(&ins));
            let got = on_ranks(world, TIMEOUT_MS_TEST, |c| {
                let mut buf = ins[c.rank()].clone();
                c.all_reduce_sum_f32(&mut buf).unwrap();
                buf
            });
            for (r, buf) in got.iter().enumerate() {
                assert_eq!(bits(buf), want, "world {world} len {len} rank {r}");
            }
        }
    }
}

#[test]
fn all_reduce_f64_is_the_rank_order_sum_bitwise() {
    for world in 1..=4 {
        let ins: Vec<Vec<f64>> = (0..world)
            .map(|r| (0..777).map(|i| f64::from(value(r, i)) * 1e3).collect())
            .collect();
        let mut want = ins[0].clone();
        for other in &ins[1..] {
            want.iter_mut().zip(other).for_each(|(a, b)| *a += *b);
        }
        let got = on_ranks(world, TIMEOUT_MS_TEST, |c| {
            let mut buf = ins[c.rank()].clone();
            c.all_reduce_sum_f64(&mut buf).unwrap();
            buf
        });
        for buf in got {
            let same = buf
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "world {world}");
        }
    }
}

#[test]
fn reduce_scatter_is_a_slice_of_all_reduce_bitwise() {
    for world in 1..=4 {
        for part in [0, 1, 3, 1000, 25_001] {
            let len = part * world;
            let ins = inputs(world, len);
            let got = on_ranks(world, TIMEOUT_MS_TEST, |c| {
                let mut recv = vec![f32::NAN; part];
                c.reduce_scatter_sum_f32(&ins[c.rank()], &mut recv).unwrap();
                let mut full = ins[c.rank()].clone();
                c.all_reduce_sum_f32(&mut full).unwrap();
                (recv, full)
            });
            let want = bits(&reference_sum(&ins));
            for (r, (recv, full)) in got.iter().enumerate() {
                assert_eq!(bits(full), want, "world {world} part {part}");
                let slice = &full[r * part..(r + 1) * part];
                assert_eq!(
                    bits(recv),
                    bits(slice),
                    "world {world} part {part} rank {r}"
                );
            }
        }
    }
}

#[test]
fn one_thread_rank_behaves_like_single_rank() {
    let send: Vec<f32> = (0..100).map(|i| value(0, i)).collect();
    let single = SingleRank::new();
    let mut want = vec![0.0; 100];
    single.reduce_scatter_sum_f32(&send, &mut want).unwrap();
    let got = on_ranks(1, TIMEOUT_MS_TEST, |c| {
        let mut recv = vec![0.0; 100];
        c.reduce_scatter_sum_f32(&send, &mut recv).unwrap();
        let mut gathered = vec![0.0; 100];
        c.all_gather_f32(&send, &mut gathered).unwrap();
        assert_eq!(bits(&gathered), bits(&send));
        assert_eq!(c.all_reduce_max_u64(5).unwrap(), 5);
        recv
    });
    assert_eq!(bits(&got[0]), bits(&want));
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for world in 1..=4 {
        for part in [0, 1, 7, 4096] {
            let ins = inputs(world, part);
            let want: Vec<f32> = ins.concat();
            let got = on_ranks(world, TIMEOUT_MS_TEST, |c| {
                let mut recv = vec![f32::NAN; part * world];
                c.all_gather_f32(&ins[c.rank()], &mut recv).unwrap();
                recv
            });
            for recv in got {
                assert_eq!(bits(&recv), bits(&want), "world {world} part {part}");
            }
        }
    }
}

#[test]
fn broadcast_copies_the_root_buffer_to_every_rank() {
    for world in 1..=4 {
        for root in 0..world {
            let got = on_ranks(world, TIMEOUT_MS_TEST, |c| {
                let mut buf = vec![c.rank() as u8; 1000];
                if c.rank() == root {
                    buf.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
                }
                c.broadcast_bytes(&mut buf, root).unwrap();
                buf
            });
            let want: Vec<u8> = (0..1000).map(|i| i as u8).collect();
            assert!(got.iter().all(|b| *b == want), "world {world} root {root}");
        }
    }
}

#[test]
fn min_max_and_barrier_agree_on_every_rank() {
    for world in 1..=4 {
        let got = on_ranks(world, TIMEOUT_MS_TEST, |c| {
            let mut out = Vec::new();
            for round in 0..50u64 {
                c.barrier().unwrap();
                let v = (c.rank() as u64 * 7 + round) % 5;
                out.push(c.all_reduce_min_u64(v).unwrap());
                out.push(c.all_reduce_max_u64(v).unwrap());
            }
            out
        });
        let want: Vec<u64> = (0..50u64)
            .flat_map(|round| {
                let vs: Vec<u64> = (0..world as u64).map(|r| (r * 7 + round) % 5).collect();
                [*vs.iter().min().unwrap(), *vs.iter().max().unwrap()]
            })
            .collect();
        assert!(got.iter().all(|g| *g == want), "world {world}");
    }
}

#[test]
fn reduce_scatter_length_not_divisible_is_bad_argument_on_every_rank() {
    let got = on_ranks(3, TIMEOUT_MS_TEST, |c| {
        let mut recv = vec![0.0f32; 3];
        let err = c.reduce_scatter_sum_f32(&[1.0; 10], &mut recv).unwrap_err();
        // The group stays usable after a rejected call.
        let mut buf = vec![1.0f32; 4];
        c.all_reduce_sum_f32(&mut buf).unwrap();
        (err, buf)
    });
    for (err, buf) in got {
        assert!(matches!(err, CommError::BadArgument { .. }), "{err}");
        assert!(
            err.to_string().contains("multiple of the world size"),
            "{err}"
        );
        assert_eq!(buf, vec![3.0; 4]);
    }
}

#[test]
fn mismatched_lengths_or_operations_are_bad_argument_on_every_rank() {
    let got = on_ranks(3, TIMEOUT_MS_TEST, |c| {
        let mut buf = vec![1.0f32; 10 + c.rank() / 2];
        let lengths = c.all_reduce_sum_f32(&mut buf).unwrap_err();
        let mut recv = vec![0.0f32; 6 + c.rank()];
        let gather = c.all_gather_f32(&[0.0; 2], &mut recv).unwrap_err();
        let ops = if c.rank() == 1 {
            c.barrier().unwrap_err()
        } else {
            c.all_reduce_min_u64(1).unwrap_err()
        };
        let mut bytes = vec![0u8; 4];
        let root = c.broadcast_bytes(&mut bytes, c.rank()).unwrap_err();
        [lengths, gather, ops, root]
    });
    for errs in got {
        for err in errs {
            assert!(matches!(err, CommError::BadArgument { .. }), "{err}");
            assert!(err.to_string().contains("rank "), "{err}");
        }
    }
}

#[test]
fn timeout_names_the_rank_that_never_arrives() {
    let timeout_ms = 200;
    let got = on_ranks(3, timeout_ms, |c| {
        if c.rank() == 2 {
            // Never joins in time; its own late call then finds the group broken.
            thread::sleep(Duration::from_millis(1500));
            return (c.barrier().unwrap_err(), Duration::ZERO);
        }
        let start = Instant::now();
        let mut buf = vec![1.0f32; 1000];
        let err = c.all_reduce_sum_f32(&mut buf).unwrap_err();
        (err, start.elapsed())
    });
    // The first rank to reach its deadline breaks the group, which wakes the other one early.
    let longest = got.iter().map(|(_, waited)| *waited).max().unwrap();
    assert!(longest >= Duration::from_millis(timeout_ms), "{longest:?}");
    for (rank, (err, _)) in got.into_iter().enumerate() {
        match err {
            CommError::Timeout {
                missing,
                timeout_ms: t,
                ..
            } => {
                assert_eq!(missing, vec![2], "rank {rank}");
                assert_eq!(t, timeout_ms);
            }
            other => panic!("rank {rank}: expected a timeout, got {other}"),
        }
    }
}

#[test]
fn dropped_rank_makes_the_others_fail_promptly() {
    // The deadline is a minute: the error must come from the drop, not from the deadline.
    let got = on_ranks(3, 60_000, |c| {
        if c.rank() == 1 {
            thread::sleep(Duration::from_millis(100));
            drop(c);
            return None;
        }
        let start = Instant::now();
        let mut buf = vec![1.0f32; 1000];
        let err = c.all_reduce_sum_f32(&mut buf).unwrap_err();
        // Later calls fail at once too.
        let again = c.barrier().unwrap_err();
        Some((err, again, start.elapsed()))
    });
    for (err, again, waited) in got.into_iter().flatten() {
        assert!(matches!(err, CommError::PeerLost { peer: 1, .. }), "{err}");
        assert!(
            matches!(again, CommError::PeerLost { peer: 1, .. }),
            "{again}"
        );
        assert!(waited < Duration::from_secs(30), "{waited:?}");
    }
}

#[test]
fn panicking_rank_makes_the_others_fail() {
    let results: Vec<thread::Result<Option<CommError>>> = thread::scope(|s| {
        let handles: Vec<_> = ThreadsComm::group(3, 60_000)
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    c.barrier().unwrap();
                    if c.rank() == 2 {
                        panic!("rank 2 fails on purpose");
                    }
                    let mut buf = vec![0.0f32; 10];
                    c.all_reduce_sum_f32(&mut buf).err()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    assert!(results[2].is_err(), "rank 2 panicked");
    for r in &results[..2] {
        let err = r.as_ref().unwrap().as_ref().expect("an error");
        assert!(matches!(err, CommError::PeerLost { peer: 2, .. }), "{err}");
    }
}

#[test]
fn repeated_runs_are_bit_identical() {
    let ins = inputs(4, 100_003);
    let run = || {
        on_ranks(4, TIMEOUT_MS_TEST, |c| {
            let mut buf = ins[c.rank()].clone();
            for _ in 0..3 {
                c.all_reduce_sum_f32(&mut buf).unwrap();
            }
            bits(&buf)
        })
    };
    let first = run();
    assert!(first.iter().all(|b| *b == first[0]), "ranks agree");
    for _ in 0..3 {
        assert_eq!(run(), first);
    }
}

#[test]
fn communicator_is_usable_as_a_trait_object() {
    let got = on_ranks(2, TIMEOUT_MS_TEST, |c| {
        let c: Box<dyn Communicator> = Box::new(c);
        assert_eq!(c.timeout(), Duration::from_millis(TIMEOUT_MS_TEST));
        c.all_reduce_max_u64(c.rank() as u64).unwrap()
    });
    assert_eq!(got, vec![1, 1]);
}

/// Prints the time of an all-reduce of 40 MB of f32 over 4 thread ranks (not asserted: timing
/// belongs in benchmarks; `cargo run --release -p lazarus-comm --example threads_all_reduce`
/// measures the optimised build).
#[test]
fn all_reduce_of_40_mb_on_4_ranks_prints_its_time() {
    let len = 10 * 1024 * 1024;
    let times = on_ranks(4, TIMEOUT_MS_TEST, |c| {
        let mut buf = vec![c.rank() as f32; len];
        let mut best = Duration::MAX;
        for _ in 0..3 {
            c.barrier().unwrap();
            let start = Instant::now();
            c.all_reduce_sum_f32(&mut buf).unwrap();
            best = best.min(start.elapsed());
        }
        best
    });
    println!(
        "threads all_reduce_sum_f32, 40 MB, 4 ranks: best of 3 {:?}",
        times[0]
    );
}
