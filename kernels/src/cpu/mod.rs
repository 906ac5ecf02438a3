//! CPU reference kernels: the GPT-2 forward and backward passes of llm.c's `train_gpt2.c`,
//! generic over [`Float`] (f32 for training, f64 for gradient checks) and parallel with rayon.
//!
//! Shape legend used in every doc comment: `B` batch, `T` sequence length, `C` channels, `NH`
//! heads, `hs = C / NH` head size, `V` real vocabulary, `Vp` padded vocabulary, `N = B * T`
//! rows, `OC` output channels. Every tensor is a row-major slice, last index fastest.
//!
//! Conventions shared by all kernels:
//! - Backward kernels accumulate (`+=`) into their gradient buffers; the caller zeroes the
//!   gradients once per optimizer step, and gradient accumulation over micro-batches relies on it.
//! - A slice of the wrong length is a caller bug and fails an `assert!` that names the argument.
//! - Results are bit-identical whatever rayon's thread count. Work is split only over independent
//!   outputs (rows, heads, channel ranges) or over chunks of a fixed, compile-time size whose
//!   partial results are combined in chunk order; no kernel reads `rayon::current_num_threads`
//!   and none uses atomics.

mod attention;
mod encoder;
mod float;
mod layernorm;
mod matmul;
mod optimizer;
mod pointwise;
pub(crate) mod shapes;
mod softmax;
#[cfg(test)]
mod test_util;

pub use attention::{attention_backward, attention_forward};
pub use encoder::{encoder_backward, encoder_forward};
pub use float::{Float, MatMut, MatRef};
pub use layernorm::{layernorm_backward, layernorm_forward};
pub use matmul::{matmul_backward, matmul_forward};
pub use optimizer::{adamw_update, global_norm_squared, scale, AdamW};
pub use pointwise::{gelu_backward, gelu_forward, residual_backward, residual_forward};
pub use softmax::{softmax_crossentropy_backward, softmax_crossentropy_forward, softmax_forward};

use rayon::prelude::*;

/// Elements handed to one rayon task by element-wise kernels. Large enough that task overhead
/// is negligible; the value never changes results because element-wise work has no reductions.
const ELEMS_PER_TASK: usize = 16 * 1024;

/// Channels owned by one task in column reductions (weight and bias gradients). Each task walks
/// every row in order for its channels, so the summation order is fixed by this constant alone.
const CHANNELS_PER_TASK: usize = 64;

/// Whether `x` is a whole multiple of a positive `d` (false when `d` is zero).
fn is_multiple(x: usize, d: usize) -> bool {
    x.checked_rem(d) == Some(0)
}

/// Adds `src` element-wise into `dst`.
fn add_assign<F: Float>(dst: &mut [F], src: &[F]) {
    debug_assert_eq!(dst.len(), src.len());
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// Adds `alpha * x` element-wise into `y`.
fn axpy<F: Float>(y: &mut [F], alpha: F, x: &[F]) {
    debug_assert_eq!(y.len(), x.len());
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Independent accumulators in [`dot`]. Several lanes let the compiler vectorise a reduction
/// it may not reorder; the lane layout is fixed, so the result does not vary between runs.
const DOT_LANES: usize = 8;

/// Dot product of two equally long slices, over `DOT_LANES` interleaved accumulators.
fn dot<F: Float>(a: &[F], b: &[F]) -> F {
    debug_assert_eq!(a.len(), b.len());
    let (a_groups, b_groups) = (a.chunks_exact(DOT_LANES), b.chunks_exact(DOT_LANES));
    let tail = a_groups
        .remainder()
        .iter()
        .zip(b_groups.remainder())
        .fold(F::zero(), |acc, (&x, &y)| acc + x * y);
    let mut lanes = [F::zero(); DOT_LANES];
    for (x, y) in a_groups.zip(b_groups) {
        for ((lane, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    lanes.iter().fold(tail, |acc, &lane| acc + lane)
}

/// Adds the column sums of `src` (rows of `dst.len()` values) into `dst`.
///
/// Each task owns `CHANNELS_PER_TASK` columns and adds the rows in order into a local
/// accumulator, so the result does not depend on how rayon schedules the tasks.
fn add_column_sums<F: Float>(dst: &mut [F], src: &[F]) {
    let width = dst.len();
    assert!(
        is_multiple(src.len(), width),
        "add_column_sums: source of {} values is not a whole number of rows of {width}",
        src.len()
    );
    dst.par_chunks_mut(CHANNELS_PER_TASK)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let first = chunk * CHANNELS_PER_TASK;
            let mut acc = [F::zero(); CHANNELS_PER_TASK];
            let acc = &mut acc[..dst.len()];
            for row in src.chunks_exact(width) {
                add_assign(acc, &row[first..first + dst.len()]);
            }
            add_assign(dst, acc);
        });
}

#[cfg(test)]
mod tests {
    //! Thread-count independence of the kernels that reduce across rows or chunks.

    use super::test_util::Rng;
    use super::*;

    /// Runs a representative set of kernels on fixed inputs and returns every output as bits.
    fn run_all() -> Vec<Vec<u32>> {
        let (b, t, c, nh, oc, vp) = (4, 32, 96, 4, 200, 300);
        let n = b * t;
        let mut rng = Rng::new(7);
        let inp = rng.vec_f32(n * c);
        let dout = rng.vec_f32(n * c);
        let weight = rng.vec_f32(c);
        let tokens: Vec<u32> = (0..n).map(|i| ((i * 37) % 50) as u32).collect();
        let mut outputs = Vec::new();

        let mut out = vec![0.0; n * c];
        let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &weight, n, c);
        let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        layernorm_backward(
            &mut dinp, &mut dw, &mut db, &dout, &inp, &weight, &mean, &rstd, n, c,
        );
        outputs.extend([out, dinp, dw, db]);

        let mm_weight = rng.vec_f32(oc * c);
        let mm_dout = rng.vec_f32(n * oc);
        let mut dinp = vec![0.0; n * c];
        let (mut dweight, mut dbias) = (vec![0.0; oc * c], vec![0.0; oc]);
        matmul_backward(
            &mut dinp,
            &mut dweight,
            Some(&mut dbias),
            &mm_dout,
            &inp,
            &mm_weight,
            n,
            c,
            oc,
        );
        outputs.extend([dinp, dweight, dbias]);

        let (mut dwte, mut dwpe) = (vec![0.0; vp * c], vec![0.0; t * c]);
        encoder_backward(&mut dwte, &mut dwpe, &dout, &tokens, b, t, c);
        outputs.extend([dwte, dwpe]);

        let qkv = rng.vec_f32(n * 3 * c);
        let (mut out, mut preatt, mut att) = (
            vec![0.0; n * c],
            vec![0.0; b * nh * t * t],
            vec![0.0; b * nh * t * t],
        );
        attention_forward(&mut out, &mut preatt, &mut att, &qkv, b, t, c, nh);
        let mut dqkv = vec![0.0; n * 3 * c];
        let (mut dpreatt, mut datt) = (vec![0.0; b * nh * t * t], vec![0.0; b * nh * t * t]);
        attention_backward(
            &mut dqkv,
            &mut dpreatt,
            &mut datt,
            &dout,
            &qkv,
            &att,
            b,
            t,
            c,
            nh,
        );
        outputs.extend([out, att, dqkv]);

        let big = rng.vec_f32(300_000);
        let norm = global_norm_squared(&big).to_bits();
        let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let mut all: Vec<Vec<u32>> = outputs.iter().map(bits).collect();
        all.push(vec![norm as u32, (norm >> 32) as u32]);
        all
    }

    #[test]
    fn kernels_are_bit_identical_for_1_and_4_threads() -> Result<(), rayon::ThreadPoolBuildError> {
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
        let four = rayon::ThreadPoolBuilder::new().num_threads(4).build()?;
        let single = one.install(run_all);
        let multi = four.install(run_all);
        assert_eq!(single.len(), multi.len());
        for (i, (s, m)) in single.iter().zip(&multi).enumerate() {
            assert!(s == m, "output {i} differs between 1 and 4 threads");
        }
        Ok(())
    }

    #[test]
    fn column_sums_add_rows_in_order() {
        let width = 130;
        let src: Vec<f64> = (0..width * 3).map(|i| i as f64).collect();
        let mut dst = vec![1.0; width];
        add_column_sums(&mut dst, &src);
        for (j, &d) in dst.iter().enumerate() {
            let want = 1.0 + (j + (width + j) + (2 * width + j)) as f64;
            assert_eq!(d, want, "column {j}");
        }
    }
}
