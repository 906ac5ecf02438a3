//! Times an all-reduce of a 40 MB f32 buffer over 4 thread ranks (a quick number, not a
//! benchmark): `cargo run --release -p lazarus-comm --example threads_all_reduce [WORLD] [MB]`.

use std::time::{Duration, Instant};

use lazarus_comm::{Communicator, ThreadsComm};

const ROUNDS: usize = 10;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let world = args.first().copied().unwrap_or(4);
    let megabytes = args.get(1).copied().unwrap_or(40);
    let len = megabytes * 1024 * 1024 / 4;
    let times: Vec<(Duration, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadsComm::group(world, 60_000)
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let mut buf = vec![c.rank() as f32; len];
                    let (mut best, mut total) = (Duration::MAX, Duration::ZERO);
                    for _ in 0..ROUNDS {
                        c.barrier().expect("barrier");
                        let start = Instant::now();
                        c.all_reduce_sum_f32(&mut buf).expect("all-reduce");
                        best = best.min(start.elapsed());
                        total += start.elapsed();
                    }
                    (best, total / ROUNDS as u32)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    let (best, mean) = times[0];
    println!(
        "threads all_reduce_sum_f32: {megabytes} MB, {world} ranks: best {best:?}, mean {mean:?} \
         over {ROUNDS} rounds"
    );
}
