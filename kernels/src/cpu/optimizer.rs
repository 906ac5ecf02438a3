//! The AdamW update and the helpers of gradient clipping, on f32 master weights.

use rayon::prelude::*;

use super::shapes::check_adamw_update;
use super::ELEMS_PER_TASK;

/// Elements per partial sum in [`global_norm_squared`]. A constant, never the thread count, so
/// that the partial sums and their order are the same on every run.
const NORM_CHUNK: usize = 64 * 1024;

/// Independent accumulators inside one chunk of [`global_norm_squared`]; they let the compiler
/// vectorise the loop, and their layout is fixed, so the result is too.
const NORM_LANES: usize = 8;

/// AdamW hyper-parameters for one update. `step` is 1-based (bias correction uses it).
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// Decay rate of the first-moment estimate.
    pub beta1: f32,
    /// Decay rate of the second-moment estimate.
    pub beta2: f32,
    /// Added to the root of the second moment to avoid division by zero.
    pub eps: f32,
    /// Decoupled weight decay, applied as `lr * weight_decay * p`.
    pub weight_decay: f32,
    /// The 1-based number of this update.
    pub step: u64,
}

/// Decoupled AdamW (Loshchilov & Hutter, as torch.optim.AdamW): m = b1 m + (1-b1) g;
/// v = b2 v + (1-b2) g²; mhat = m/(1-b1^t); vhat = v/(1-b2^t);
/// p -= lr * (mhat/(sqrt(vhat)+eps) + wd * p). f32 only (master weights are f32). Parallel over
/// elements; all four slices have the same length.
pub fn adamw_update(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamW) {
    check_adamw_update(params.len(), grads.len(), m.len(), v.len(), hp.step);
    // The corrections are computed in f64 so a large step cannot lose them to f32 rounding.
    let correction1 = (1.0 - f64::from(hp.beta1).powf(hp.step as f64)) as f32;
    let correction2 = (1.0 - f64::from(hp.beta2).powf(hp.step as f64)) as f32;
    let AdamW {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        ..
    } = *hp;
    params
        .par_chunks_mut(ELEMS_PER_TASK)
        .zip(grads.par_chunks(ELEMS_PER_TASK))
        .zip(
            m.par_chunks_mut(ELEMS_PER_TASK)
                .zip(v.par_chunks_mut(ELEMS_PER_TASK)),
        )
        .for_each(|((params, grads), (m, v))| {
            let state = m.iter_mut().zip(v.iter_mut());
            for ((p, &g), (m, v)) in params.iter_mut().zip(grads).zip(state) {
                *m = beta1 * *m + (1.0 - beta1) * g;
                *v = beta2 * *v + (1.0 - beta2) * g * g;
                let m_hat = *m / correction1;
                let v_hat = *v / correction2;
                *p -= lr * (m_hat / (v_hat.sqrt() + eps) + weight_decay * *p);
            }
        });
}

/// Sum of squares of x as f64, deterministic regardless of rayon's thread count: partial sums
/// over chunks of `NORM_CHUNK` elements are computed in parallel, then added in chunk order.
pub fn global_norm_squared(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x.par_chunks(NORM_CHUNK).map(sum_squares).collect();
    partials.iter().fold(0.0, |acc, &p| acc + p)
}

/// Sum of squares of one chunk in f64, over `NORM_LANES` interleaved accumulators.
fn sum_squares(x: &[f32]) -> f64 {
    let mut lanes = [0.0f64; NORM_LANES];
    let mut groups = x.chunks_exact(NORM_LANES);
    for group in &mut groups {
        for (lane, &value) in lanes.iter_mut().zip(group) {
            let value = f64::from(value);
            *lane += value * value;
        }
    }
    let tail = groups.remainder().iter().fold(0.0, |acc, &value| {
        let value = f64::from(value);
        acc + value * value
    });
    lanes.iter().fold(0.0, |acc, &lane| acc + lane) + tail
}

/// Multiplies x by s in place (used for gradient clipping).
pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(ELEMS_PER_TASK).for_each(|chunk| {
        for value in chunk {
            *value *= s;
        }
    });
}

#[cfg(test)]
mod tests {
    //! The optimizer against a scalar f64 reference, and the norm against a sequential sum.

    use super::super::test_util::{assert_close, Rng};
    use super::*;

    /// Tolerance of the f32 update against the f64 reference, relative with a floor of 1: three
    /// steps of f32 rounding on values of order 1 stay far below it.
    const ADAM_TOL: f64 = 1e-6;

    /// One AdamW step on one element, in f64.
    fn reference_step(p: &mut f64, g: f64, m: &mut f64, v: &mut f64, hp: &AdamW) {
        let (b1, b2) = (f64::from(hp.beta1), f64::from(hp.beta2));
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        let m_hat = *m / (1.0 - b1.powi(hp.step as i32));
        let v_hat = *v / (1.0 - b2.powi(hp.step as i32));
        *p -= f64::from(hp.lr)
            * (m_hat / (v_hat.sqrt() + f64::from(hp.eps)) + f64::from(hp.weight_decay) * *p);
    }

    fn check_adamw(weight_decay: f32) {
        let mut rng = Rng::new(14);
        let mut params = rng.vec_f32(5);
        let (mut m, mut v) = (vec![0.0f32; 5], vec![0.0f32; 5]);
        let mut want: Vec<[f64; 3]> = params.iter().map(|&p| [f64::from(p), 0.0, 0.0]).collect();
        for step in 1..=3 {
            let grads = rng.vec_f32(5);
            let hp = AdamW {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay,
                step,
            };
            adamw_update(&mut params, &grads, &mut m, &mut v, &hp);
            for ([p, m, v], &g) in want.iter_mut().zip(&grads) {
                reference_step(p, f64::from(g), m, v, &hp);
            }
        }
        let widen = |x: &[f32]| x.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        let column = |i: usize| want.iter().map(|row| row[i]).collect::<Vec<f64>>();
        assert_close("params", &widen(&params), &column(0), ADAM_TOL);
        assert_close("m", &widen(&m), &column(1), ADAM_TOL);
        assert_close("v", &widen(&v), &column(2), ADAM_TOL);
    }

    #[test]
    fn adamw_matches_f64_reference_without_weight_decay() {
        check_adamw(0.0);
    }

    #[test]
    fn adamw_matches_f64_reference_with_weight_decay() {
        check_adamw(0.1);
    }

    #[test]
    fn adamw_weight_decay_shrinks_params() {
        let hp = AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.5,
            step: 1,
        };
        let (mut decayed, mut plain) = (vec![2.0f32], vec![2.0f32]);
        adamw_update(&mut decayed, &[0.0], &mut [0.0], &mut [0.0], &hp);
        adamw_update(
            &mut plain,
            &[0.0],
            &mut [0.0],
            &mut [0.0],
            &AdamW {
                weight_decay: 0.0,
                ..hp
            },
        );
        assert_eq!(plain, [2.0]);
        assert_eq!(decayed, [2.0 - 0.1 * 0.5 * 2.0]);
    }

    #[test]
    fn global_norm_squared_matches_sequential_sum() {
        let x = Rng::new(15).vec_f32(300_000);
        let want = x
            .iter()
            .fold(0.0f64, |acc, &v| acc + f64::from(v) * f64::from(v));
        let got = global_norm_squared(&x);
        // Tolerance 1e-12 relative: only the summation order differs from the sequential sum.
        assert!((got - want).abs() <= 1e-12 * want, "got {got}, want {want}");
    }

    #[test]
    fn scale_multiplies_every_element() {
        let mut x: Vec<f32> = (0..40_000).map(|i| i as f32).collect();
        scale(&mut x, 0.5);
        assert!(x.iter().enumerate().all(|(i, &v)| v == i as f32 * 0.5));
    }
}
