//! Element-wise kernels: the GELU activation and the residual addition.

use rayon::prelude::*;

use super::shapes::{
    check_gelu_backward, check_gelu_forward, check_residual_backward, check_residual_forward,
};
use super::{Float, ELEMS_PER_TASK};

/// sqrt(2/pi), the scale inside GPT-2's tanh approximation of GELU.
const GELU_SCALE: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh approximation.
const GELU_CUBIC: f64 = 0.044715;

/// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). out and inp have
/// the same length (any shape).
pub fn gelu_forward<F: Float>(out: &mut [F], inp: &[F]) {
    check_gelu_forward(out.len(), inp.len());
    let (half, scale, cubic) = (F::lit(0.5), F::lit(GELU_SCALE), F::lit(GELU_CUBIC));
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(inp.par_chunks(ELEMS_PER_TASK))
        .for_each(|(out, inp)| {
            for (o, &x) in out.iter_mut().zip(inp) {
                *o = half * x * (F::one() + (scale * (x + cubic * x * x * x)).tanh());
            }
        });
}

/// dinp accumulates dout * gelu'(inp). All three have the same length.
pub fn gelu_backward<F: Float>(dinp: &mut [F], inp: &[F], dout: &[F]) {
    check_gelu_backward(dinp.len(), inp.len(), dout.len());
    let (half, scale, cubic) = (F::lit(0.5), F::lit(GELU_SCALE), F::lit(GELU_CUBIC));
    let cubic3 = F::lit(3.0 * GELU_CUBIC);
    dinp.par_chunks_mut(ELEMS_PER_TASK)
        .zip(
            inp.par_chunks(ELEMS_PER_TASK)
                .zip(dout.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(dinp, (inp, dout))| {
            for ((d, &x), &dy) in dinp.iter_mut().zip(inp).zip(dout) {
                let tanh = (scale * (x + cubic * x * x * x)).tanh();
                // sech² = 1 - tanh² avoids cosh, which overflows for large arguments.
                let sech2 = F::one() - tanh * tanh;
                let grad = half * (F::one() + tanh)
                    + x * half * sech2 * scale * (F::one() + cubic3 * x * x);
                *d += grad * dy;
            }
        });
}

/// out = a + b. All three have the same length.
pub fn residual_forward<F: Float>(out: &mut [F], a: &[F], b: &[F]) {
    check_residual_forward(out.len(), a.len(), b.len());
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(
            a.par_chunks(ELEMS_PER_TASK)
                .zip(b.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(out, (a, b))| {
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
}

/// da += dout; db += dout. All three have the same length.
pub fn residual_backward<F: Float>(da: &mut [F], db: &mut [F], dout: &[F]) {
    check_residual_backward(da.len(), db.len(), dout.len());
    da.par_chunks_mut(ELEMS_PER_TASK)
        .zip(
            db.par_chunks_mut(ELEMS_PER_TASK)
                .zip(dout.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(da, (db, dout))| {
            for ((a, b), &d) in da.iter_mut().zip(db.iter_mut()).zip(dout) {
                *a += d;
                *b += d;
            }
        });
}

#[cfg(test)]
mod tests {
    //! Finite-difference and accumulation checks of GELU and the residual addition.

    use super::super::test_util::{
        assert_accumulated, assert_close, dot, numeric_grad, Rng, GRAD_TOL, PREFILL,
    };
    use super::*;

    #[test]
    fn gelu_backward_matches_finite_differences_and_accumulates() {
        let mut rng = Rng::new(9);
        // Inputs in [-4, 4) reach both tails of the activation, not only its linear middle.
        let inp: Vec<f64> = rng.vec(48).iter().map(|x| 4.0 * x).collect();
        let r = rng.vec(inp.len());
        let loss = |x: &[f64]| {
            let mut out = vec![0.0; x.len()];
            gelu_forward(&mut out, x);
            dot(&out, &r)
        };
        let backward = |fill: f64| {
            let mut dinp = vec![fill; inp.len()];
            gelu_backward(&mut dinp, &inp, &r);
            dinp
        };
        let dinp = backward(0.0);
        assert_close("dinp", &dinp, &numeric_grad(&inp, loss), GRAD_TOL);
        assert_accumulated("dinp", &dinp, &backward(PREFILL));
    }

    #[test]
    fn residual_backward_matches_finite_differences_and_accumulates() {
        let mut rng = Rng::new(10);
        let (a, b, r) = (rng.vec(40), rng.vec(40), rng.vec(40));
        let loss = |a: &[f64], b: &[f64]| {
            let mut out = vec![0.0; a.len()];
            residual_forward(&mut out, a, b);
            dot(&out, &r)
        };
        let backward = |fill: f64| {
            let (mut da, mut db) = (vec![fill; a.len()], vec![fill; b.len()]);
            residual_backward(&mut da, &mut db, &r);
            (da, db)
        };
        let (da, db) = backward(0.0);
        assert_close("da", &da, &numeric_grad(&a, |x| loss(x, &b)), GRAD_TOL);
        assert_close("db", &db, &numeric_grad(&b, |x| loss(&a, x)), GRAD_TOL);
        let (da_acc, db_acc) = backward(PREFILL);
        assert_accumulated("da", &da, &da_acc);
        assert_accumulated("db", &db, &db_acc);
    }
}
