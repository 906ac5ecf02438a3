//! Fully connected layers in llm.c orientation (weight is (OC,C)), computed with
//! matrixmultiply's GEMM.

use rayon::prelude::*;

use super::shapes::{check_matmul_backward, check_matmul_forward};
use super::{add_column_sums, Float, MatMut, MatRef};

/// out (N,OC) = inp (N,C) · weightᵀ + bias; weight is (OC,C) row-major (llm.c orientation), bias
/// (OC) optional.
pub fn matmul_forward<F: Float>(
    out: &mut [F],
    inp: &[F],
    weight: &[F],
    bias: Option<&[F]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    let bias_len = bias.map(<[F]>::len);
    check_matmul_forward(out.len(), inp.len(), weight.len(), bias_len, n, c, oc);
    // Starting from the bias and accumulating the product saves a second pass over out.
    let beta = match bias {
        Some(bias) => {
            out.par_chunks_mut(oc)
                .for_each(|row| row.copy_from_slice(bias));
            F::one()
        }
        None => F::zero(),
    };
    let inp = MatRef::row_major(inp, c);
    let weight_t = MatRef::row_major(weight, c).t();
    F::gemm(
        n,
        c,
        oc,
        F::one(),
        inp,
        weight_t,
        beta,
        MatMut::row_major(out, oc),
    );
}

/// Accumulates: dinp (N,C) += dout·weight; dweight (OC,C) += doutᵀ·inp; dbias (OC) += Σ_rows
/// dout. dout (N,OC), inp (N,C), weight (OC,C).
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward<F: Float>(
    dinp: &mut [F],
    dweight: &mut [F],
    dbias: Option<&mut [F]>,
    dout: &[F],
    inp: &[F],
    weight: &[F],
    n: usize,
    c: usize,
    oc: usize,
) {
    check_matmul_backward(
        dinp.len(),
        dweight.len(),
        dbias.as_ref().map(|dbias| dbias.len()),
        dout.len(),
        inp.len(),
        weight.len(),
        n,
        c,
        oc,
    );
    let one = F::one();
    let dout_m = MatRef::row_major(dout, oc);
    F::gemm(
        n,
        oc,
        c,
        one,
        dout_m,
        MatRef::row_major(weight, c),
        one,
        MatMut::row_major(dinp, c),
    );
    F::gemm(
        oc,
        n,
        c,
        one,
        dout_m.t(),
        MatRef::row_major(inp, c),
        one,
        MatMut::row_major(dweight, c),
    );
    if let Some(dbias) = dbias {
        add_column_sums(dbias, dout);
    }
}

#[cfg(test)]
mod tests {
    //! Finite-difference, accumulation and f32-versus-f64 checks of the matmul kernels.

    use super::super::test_util::{
        assert_accumulated, assert_close, dot, numeric_grad, to_f32, Rng, F32_TOL, GRAD_TOL,
        PREFILL,
    };
    use super::*;

    const N: usize = 6;
    const C: usize = 8;
    const OC: usize = 5;

    fn forward(inp: &[f64], weight: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
        let mut out = vec![0.0; N * OC];
        matmul_forward(&mut out, inp, weight, bias, N, C, OC);
        out
    }

    /// Checks all gradients of one matmul, with or without a bias.
    fn check_backward(with_bias: bool) {
        let mut rng = Rng::new(3);
        let (inp, weight, bias, r) = (
            rng.vec(N * C),
            rng.vec(OC * C),
            rng.vec(OC),
            rng.vec(N * OC),
        );
        let bias = with_bias.then_some(bias);
        let loss = |inp: &[f64], weight: &[f64], bias: Option<&[f64]>| {
            dot(&forward(inp, weight, bias), &r)
        };
        let backward = |fill: f64| {
            let (mut dinp, mut dw, mut db) =
                (vec![fill; N * C], vec![fill; OC * C], vec![fill; OC]);
            let dbias = with_bias.then_some(db.as_mut_slice());
            matmul_backward(&mut dinp, &mut dw, dbias, &r, &inp, &weight, N, C, OC);
            (dinp, dw, db)
        };
        let bias = bias.as_deref();
        let (dinp, dw, db) = backward(0.0);
        assert_close(
            "dinp",
            &dinp,
            &numeric_grad(&inp, |x| loss(x, &weight, bias)),
            GRAD_TOL,
        );
        assert_close(
            "dweight",
            &dw,
            &numeric_grad(&weight, |x| loss(&inp, x, bias)),
            GRAD_TOL,
        );
        let (dinp_acc, dw_acc, db_acc) = backward(PREFILL);
        assert_accumulated("dinp", &dinp, &dinp_acc);
        assert_accumulated("dweight", &dw, &dw_acc);
        if let Some(bias) = bias {
            assert_close(
                "dbias",
                &db,
                &numeric_grad(bias, |x| loss(&inp, &weight, Some(x))),
                GRAD_TOL,
            );
            assert_accumulated("dbias", &db, &db_acc);
        } else {
            assert!(
                db_acc.iter().all(|&g| g == PREFILL),
                "dbias touched without a bias"
            );
        }
    }

    #[test]
    fn matmul_backward_with_bias_matches_finite_differences_and_accumulates() {
        check_backward(true);
    }

    #[test]
    fn matmul_backward_without_bias_matches_finite_differences_and_accumulates() {
        check_backward(false);
    }

    #[test]
    fn matmul_forward_f32_agrees_with_f64() {
        let (n, c, oc) = (16, 64, 24);
        let mut rng = Rng::new(4);
        let (inp, weight, bias) = (rng.vec(n * c), rng.vec(oc * c), rng.vec(oc));
        let mut out64 = vec![0.0; n * oc];
        matmul_forward(&mut out64, &inp, &weight, Some(&bias), n, c, oc);
        let mut out32 = vec![0.0f32; n * oc];
        matmul_forward(
            &mut out32,
            &to_f32(&inp),
            &to_f32(&weight),
            Some(&to_f32(&bias)),
            n,
            c,
            oc,
        );
        let out32: Vec<f64> = out32.iter().map(|&x| f64::from(x)).collect();
        assert_close("out", &out32, &out64, F32_TOL);
    }
}
