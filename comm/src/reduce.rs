//! Deterministic element-wise sums shared by the multi-rank backends: rank-order addition over
//! cache-sized blocks, and the split of a buffer into one chunk per rank.

use std::ops::{AddAssign, Range};

/// Elements summed per block: the block accumulator lives on the stack and stays in L1.
const SUM_BLOCK_LEN: usize = 1024;

/// Element types that the sum collectives reduce.
pub(crate) trait Elem: Copy + Default + AddAssign + Send + 'static {}

impl Elem for f32 {}
impl Elem for f64 {}

/// Chunk `q` of a buffer of `len` elements split over `world` ranks: the first `len % world`
/// chunks are one element longer, so every element belongs to exactly one chunk.
pub(crate) fn chunk_range(len: usize, world: usize, q: usize) -> Range<usize> {
    assert!(world > 0 && q < world, "chunk {q} of {world} ranks");
    let base = len / world;
    let rem = len % world;
    let start = q * base + q.min(rem);
    start..start + base + usize::from(q < rem)
}

/// Writes `dst[i] = src(0)[i] + src(1)[i] + ... + src(world-1)[i]` for `i < len`, adding strictly
/// left to right in rank order. Starting from rank 0's value (not from zero) keeps the result of
/// one rank bit-identical to its input, signed zeros included.
///
/// # Safety
/// For every `q < world`, `src(q)` must be valid for reads of `len` elements and `dst` valid for
/// writes of `len` elements, with no other thread writing those ranges during the call. `dst` may
/// be exactly one of the sources (same start address) but must not partially overlap any: each
/// block is read from every source before it is written.
pub(crate) unsafe fn sum_in_rank_order<T: Elem>(
    world: usize,
    src: impl Fn(usize) -> *const T,
    dst: *mut T,
    len: usize,
) {
    let mut acc_block = [T::default(); SUM_BLOCK_LEN];
    let mut offset = 0;
    while offset < len {
        let n = SUM_BLOCK_LEN.min(len - offset);
        let acc = &mut acc_block[..n];
        // SAFETY: the caller guarantees `src(0)` is readable for `len` elements and unwritten.
        acc.copy_from_slice(unsafe { std::slice::from_raw_parts(src(0).add(offset), n) });
        for q in 1..world {
            // SAFETY: as above, for source `q`. The slice ends before `dst` is written below.
            let block = unsafe { std::slice::from_raw_parts(src(q).add(offset), n) };
            for (a, b) in acc.iter_mut().zip(block) {
                *a += *b;
            }
        }
        // SAFETY: `dst` is writable for `len` elements; `acc` is a stack array, so the ranges do
        // not overlap even when `dst` is one of the sources.
        unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), dst.add(offset), n) };
        offset += n;
    }
}

/// Sums `world` consecutive regions of `dst.len()` elements of `regions` in rank order into
/// `dst` (used by the MPI backend, whose receive buffer holds one region per sending rank).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn sum_regions<T: Elem>(regions: &[T], world: usize, dst: &mut [T]) {
    let len = dst.len();
    assert_eq!(regions.len(), world * len, "one region of {len} per rank");
    let base = regions.as_ptr();
    // SAFETY: every region lies inside `regions`, which is borrowed shared for the call, and
    // `dst` is a distinct mutable borrow, so nothing else writes either range.
    unsafe { sum_in_rank_order(world, |q| base.add(q * len), dst.as_mut_ptr(), len) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_once() {
        for len in [0, 1, 5, 7, 100, 1027] {
            for world in 1..=5 {
                let mut next = 0;
                for q in 0..world {
                    let r = chunk_range(len, world, q);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn sum_adds_in_rank_order() {
        // 1e8 + 1 - 1e8 is 0 in f32 left to right, 1 in another order.
        let mut sum = [0.0f32];
        sum_regions(&[1e8f32, 1.0, -1e8], 3, &mut sum);
        assert_eq!(sum[0].to_bits(), ((1e8f32 + 1.0) - 1e8).to_bits());
        sum_regions(&[-0.0f32], 1, &mut sum);
        assert_eq!(sum[0].to_bits(), (-0.0f32).to_bits());
    }
}
