//! Softmax over the real vocabulary, alone (for sampling) and fused with the cross-entropy
//! loss and its gradient (for training). Padded vocabulary columns are never read.

use rayon::prelude::*;

use super::shapes::{
    check_softmax_crossentropy_backward, check_softmax_crossentropy_forward, check_softmax_forward,
};
use super::Float;

/// Checks that the targets of a cross-entropy call are below V.
fn assert_targets_below(what: &str, targets: &[u32], v: usize) {
    let first_bad = targets
        .iter()
        .enumerate()
        .find(|(_, &target)| target as usize >= v);
    assert!(
        first_bad.is_none(),
        "{what}: the (row, target) {first_bad:?} is not below V = {v}"
    );
}

/// The maximum of a row, ignoring NaN (a NaN still poisons the sum of exponentials).
fn row_max<F: Float>(row: &[F]) -> F {
    row.iter().fold(F::neg_infinity(), |acc, &x| acc.max(x))
}

/// logits (N,Vp), targets (N) < v; losses (N) = `-log softmax(logits[row, ..v])[target]`.
/// Padded columns v..Vp are ignored.
pub fn softmax_crossentropy_forward<F: Float>(
    losses: &mut [F],
    logits: &[F],
    targets: &[u32],
    n: usize,
    v: usize,
    vp: usize,
) {
    check_softmax_crossentropy_forward(losses.len(), logits.len(), targets.len(), n, v, vp);
    assert_targets_below("softmax_crossentropy_forward", targets, v);
    losses
        .par_iter_mut()
        .zip(logits.par_chunks(vp).zip(targets.par_iter()))
        .for_each(|(loss, (row, &target))| {
            let row = &row[..v];
            let max = row_max(row);
            let sum = row.iter().fold(F::zero(), |acc, &x| acc + (x - max).exp());
            // log-sum-exp minus the target logit stays finite where log(prob) would underflow.
            *loss = sum.ln() - (row[target as usize] - max);
        });
}

/// The fused pass used in training: reads logits (N,Vp), writes losses (N) like the forward,
/// and overwrites logits IN PLACE with dlogits = dloss * (softmax - onehot(target)) for columns
/// < v and 0 for padded columns. `dloss` is the gradient of the objective w.r.t. each row's loss
/// (e.g. 1/(B*T*accum)). One pass per row: max, sum of exp, then write.
pub fn softmax_crossentropy_backward<F: Float>(
    logits_to_dlogits: &mut [F],
    losses: &mut [F],
    targets: &[u32],
    dloss: F,
    n: usize,
    v: usize,
    vp: usize,
) {
    check_softmax_crossentropy_backward(
        logits_to_dlogits.len(),
        losses.len(),
        targets.len(),
        n,
        v,
        vp,
    );
    assert_targets_below("softmax_crossentropy_backward", targets, v);
    logits_to_dlogits
        .par_chunks_mut(vp)
        .zip(losses.par_iter_mut().zip(targets.par_iter()))
        .for_each(|(row, (loss, &target))| {
            let target = target as usize;
            let (real, padded) = row.split_at_mut(v);
            let max = row_max(real);
            let target_logit = real[target];
            // The exponentials replace the logits so the final pass need not recompute them.
            let mut sum = F::zero();
            for x in real.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            *loss = sum.ln() - (target_logit - max);
            let inv_sum = sum.recip();
            for (i, x) in real.iter_mut().enumerate() {
                let onehot = if i == target { F::one() } else { F::zero() };
                *x = dloss * (*x * inv_sum - onehot);
            }
            padded.fill(F::zero());
        });
}

/// Softmax over the first v columns of each row of logits (N,Vp) into probs (N,Vp) (padded
/// columns 0); used for sampling.
pub fn softmax_forward<F: Float>(probs: &mut [F], logits: &[F], n: usize, v: usize, vp: usize) {
    check_softmax_forward(probs.len(), logits.len(), n, v, vp);
    probs
        .par_chunks_mut(vp)
        .zip(logits.par_chunks(vp))
        .for_each(|(probs, logits)| {
            let (real, padded) = probs.split_at_mut(v);
            let logits = &logits[..v];
            let max = row_max(logits);
            let mut sum = F::zero();
            for (p, &x) in real.iter_mut().zip(logits) {
                *p = (x - max).exp();
                sum += *p;
            }
            let inv_sum = sum.recip();
            for p in real.iter_mut() {
                *p *= inv_sum;
            }
            padded.fill(F::zero());
        });
}

#[cfg(test)]
mod tests {
    //! Finite-difference checks of the fused cross-entropy gradient and checks of its padding,
    //! its losses, and the sampling softmax.

    use super::super::test_util::{assert_close, numeric_grad, Rng, GRAD_TOL};
    use super::*;

    const N: usize = 6;
    const V: usize = 7;
    const VP: usize = 8;
    const TARGETS: [u32; N] = [0, 6, 3, 3, 1, 5];

    fn losses(logits: &[f64]) -> Vec<f64> {
        let mut losses = vec![0.0; N];
        softmax_crossentropy_forward(&mut losses, logits, &TARGETS, N, V, VP);
        losses
    }

    #[test]
    fn crossentropy_backward_matches_finite_differences() {
        let dloss = 1.0 / N as f64;
        // Logits in [-3, 3) give a spread of probabilities, not a near-uniform softmax.
        let logits: Vec<f64> = Rng::new(11).vec(N * VP).iter().map(|x| 3.0 * x).collect();
        let mut dlogits = logits.clone();
        let mut fused_losses = vec![f64::NAN; N];
        softmax_crossentropy_backward(&mut dlogits, &mut fused_losses, &TARGETS, dloss, N, V, VP);
        let numeric = numeric_grad(&logits, |x| dloss * losses(x).iter().sum::<f64>());
        assert_close("dlogits", &dlogits, &numeric, GRAD_TOL);
        assert_eq!(
            fused_losses,
            losses(&logits),
            "fused losses differ from the forward's"
        );
        for row in dlogits.chunks_exact(VP) {
            assert!(
                row[V..].iter().all(|&g| g == 0.0),
                "padded column got a gradient"
            );
        }
    }

    #[test]
    fn crossentropy_ignores_padded_columns_in_f32() {
        let mut logits: Vec<f32> = Rng::new(12).vec_f32(N * VP);
        let clean = {
            let mut losses = vec![0.0f32; N];
            softmax_crossentropy_forward(&mut losses, &logits, &TARGETS, N, V, VP);
            losses
        };
        // Huge values in the padded columns must change nothing.
        for row in logits.chunks_exact_mut(VP) {
            row[V..].fill(1e30);
        }
        let mut fused_losses = vec![0.0f32; N];
        softmax_crossentropy_backward(&mut logits, &mut fused_losses, &TARGETS, 0.5, N, V, VP);
        assert_eq!(fused_losses, clean);
        for row in logits.chunks_exact(VP) {
            assert!(
                row[V..].iter().all(|&g| g == 0.0),
                "padded column got a gradient"
            );
        }
    }

    #[test]
    fn softmax_forward_matches_crossentropy_losses() {
        let logits = Rng::new(13).vec(N * VP);
        let mut probs = vec![f64::NAN; N * VP];
        softmax_forward(&mut probs, &logits, N, V, VP);
        for ((row, &target), loss) in probs.chunks_exact(VP).zip(&TARGETS).zip(losses(&logits)) {
            let sum: f64 = row.iter().sum();
            assert!((sum - 1.0).abs() <= 1e-12, "probabilities sum to {sum}");
            assert!(
                row[V..].iter().all(|&p| p == 0.0),
                "padded column got a probability"
            );
            let p = row[target as usize];
            assert!(
                (p.ln() + loss).abs() <= 1e-12,
                "log p = {} but loss = {loss}",
                p.ln()
            );
        }
    }
}
