//! Layer normalisation over the channel dimension, with the mean and reciprocal standard
//! deviation saved for the backward pass.

use rayon::prelude::*;

use super::shapes::{check_layernorm_backward, check_layernorm_forward};
use super::{add_assign, Float, CHANNELS_PER_TASK};

/// The epsilon added to the variance, as in GPT-2.
const EPS: f64 = 1e-5;

/// inp/out (N,C), weight/bias (C), mean/rstd (N) saved for backward. eps = 1e-5.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<F: Float>(
    out: &mut [F],
    mean: &mut [F],
    rstd: &mut [F],
    inp: &[F],
    weight: &[F],
    bias: &[F],
    n: usize,
    c: usize,
) {
    check_layernorm_forward(
        out.len(),
        mean.len(),
        rstd.len(),
        inp.len(),
        weight.len(),
        bias.len(),
        n,
        c,
    );
    let (cf, eps) = (F::lit(c as f64), F::lit(EPS));
    out.par_chunks_mut(c)
        .zip(inp.par_chunks(c))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((out, x), (mean, rstd))| {
            let mu = x.iter().fold(F::zero(), |acc, &v| acc + v) / cf;
            let var = x
                .iter()
                .fold(F::zero(), |acc, &v| acc + (v - mu) * (v - mu))
                / cf;
            let r = (var + eps).sqrt().recip();
            for (((o, &x), &w), &bias) in out.iter_mut().zip(x).zip(weight).zip(bias) {
                *o = (x - mu) * r * w + bias;
            }
            *mean = mu;
            *rstd = r;
        });
}

/// Accumulates into dinp (N,C), dweight (C), dbias (C). dout and inp (N,C), weight (C), mean and
/// rstd (N) as saved by [`layernorm_forward`].
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<F: Float>(
    dinp: &mut [F],
    dweight: &mut [F],
    dbias: &mut [F],
    dout: &[F],
    inp: &[F],
    weight: &[F],
    mean: &[F],
    rstd: &[F],
    n: usize,
    c: usize,
) {
    check_layernorm_backward(
        dinp.len(),
        dweight.len(),
        dbias.len(),
        dout.len(),
        inp.len(),
        weight.len(),
        mean.len(),
        rstd.len(),
        n,
        c,
    );
    input_grad(dinp, dout, inp, weight, mean, rstd);
    param_grads(dweight, dbias, dout, inp, mean, rstd);
}

/// Accumulates the gradient of the normalised rows into dinp; rows are independent.
fn input_grad<F: Float>(
    dinp: &mut [F],
    dout: &[F],
    inp: &[F],
    weight: &[F],
    mean: &[F],
    rstd: &[F],
) {
    let c = weight.len();
    let cf = F::lit(c as f64);
    dinp.par_chunks_mut(c)
        .zip(dout.par_chunks(c).zip(inp.par_chunks(c)))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .for_each(|((dinp, (dy, x)), (&mu, &r))| {
            let (mut dnorm_mean, mut dnorm_norm_mean) = (F::zero(), F::zero());
            for ((&dy, &x), &w) in dy.iter().zip(x).zip(weight) {
                let dnorm = w * dy;
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * ((x - mu) * r);
            }
            dnorm_mean /= cf;
            dnorm_norm_mean /= cf;
            for (((d, &dy), &x), &w) in dinp.iter_mut().zip(dy).zip(x).zip(weight) {
                let norm = (x - mu) * r;
                *d += (w * dy - dnorm_mean - norm * dnorm_norm_mean) * r;
            }
        });
}

/// Accumulates dweight and dbias, which sum over all rows.
///
/// Each task owns a fixed range of channels and walks the rows in order into local
/// accumulators, so the sums do not depend on the thread count.
fn param_grads<F: Float>(
    dweight: &mut [F],
    dbias: &mut [F],
    dout: &[F],
    inp: &[F],
    mean: &[F],
    rstd: &[F],
) {
    let c = dweight.len();
    dweight
        .par_chunks_mut(CHANNELS_PER_TASK)
        .zip(dbias.par_chunks_mut(CHANNELS_PER_TASK))
        .enumerate()
        .for_each(|(chunk, (dweight, dbias))| {
            let (first, width) = (chunk * CHANNELS_PER_TASK, dweight.len());
            let mut acc_w = [F::zero(); CHANNELS_PER_TASK];
            let mut acc_b = [F::zero(); CHANNELS_PER_TASK];
            for (row, (&mu, &r)) in mean.iter().zip(rstd).enumerate() {
                let x = &inp[row * c + first..][..width];
                let dy = &dout[row * c + first..][..width];
                for (((aw, ab), &x), &dy) in acc_w.iter_mut().zip(acc_b.iter_mut()).zip(x).zip(dy) {
                    *aw += (x - mu) * r * dy;
                    *ab += dy;
                }
            }
            add_assign(dweight, &acc_w[..width]);
            add_assign(dbias, &acc_b[..width]);
        });
}

#[cfg(test)]
mod tests {
    //! Finite-difference and accumulation checks of the layernorm backward pass.

    use super::super::test_util::{
        assert_accumulated, assert_close, dot, numeric_grad, Rng, GRAD_TOL, PREFILL,
    };
    use super::*;

    #[test]
    fn layernorm_backward_matches_finite_differences_and_accumulates() {
        // C spans two channel chunks so the per-chunk reduction of dweight and dbias is exercised.
        let (n, c) = (5, CHANNELS_PER_TASK + 8);
        let mut rng = Rng::new(2);
        let (inp, weight, bias, r) = (rng.vec(n * c), rng.vec(c), rng.vec(c), rng.vec(n * c));
        let forward = |inp: &[f64], weight: &[f64], bias: &[f64]| {
            let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            layernorm_forward(&mut out, &mut mean, &mut rstd, inp, weight, bias, n, c);
            (out, mean, rstd)
        };
        let loss =
            |inp: &[f64], weight: &[f64], bias: &[f64]| dot(&forward(inp, weight, bias).0, &r);
        let (_, mean, rstd) = forward(&inp, &weight, &bias);
        let backward = |fill: f64| {
            let (mut dinp, mut dw, mut db) = (vec![fill; n * c], vec![fill; c], vec![fill; c]);
            layernorm_backward(
                &mut dinp, &mut dw, &mut db, &r, &inp, &weight, &mean, &rstd, n, c,
            );
            (dinp, dw, db)
        };
        let (dinp, dw, db) = backward(0.0);
        assert_close(
            "dinp",
            &dinp,
            &numeric_grad(&inp, |x| loss(x, &weight, &bias)),
            GRAD_TOL,
        );
        assert_close(
            "dweight",
            &dw,
            &numeric_grad(&weight, |x| loss(&inp, x, &bias)),
            GRAD_TOL,
        );
        assert_close(
            "dbias",
            &db,
            &numeric_grad(&bias, |x| loss(&inp, &weight, x)),
            GRAD_TOL,
        );
        let (dinp_acc, dw_acc, db_acc) = backward(PREFILL);
        assert_accumulated("dinp", &dinp, &dinp_acc);
        assert_accumulated("dweight", &dw, &dw_acc);
        assert_accumulated("dbias", &db, &db_acc);
    }
}
