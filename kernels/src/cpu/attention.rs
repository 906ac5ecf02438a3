//! Causal multi-head self-attention over a packed q,k,v tensor, with the scores and their
//! softmax saved for the backward pass.
//!
//! Both directions run in two parallel passes: one over (b, h) pairs, each owning a contiguous
//! (T,T) block of scores, and one over rows (b, t) of the output, each owning a contiguous row.
//! Every value is therefore written by exactly one task, in a fixed order.

use rayon::prelude::*;

use super::shapes::{check_attention_backward, check_attention_forward};
use super::{axpy, dot, Float};

/// Index arithmetic for the attention tensors of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    t: usize,
    c: usize,
    nh: usize,
    hs: usize,
}

/// Which third of a packed qkv row a head slice comes from.
#[derive(Debug, Clone, Copy)]
enum Part {
    Query = 0,
    Key = 1,
    Value = 2,
}

impl Dims {
    /// The index helper of checked dimensions (NH divides C).
    fn new(t: usize, c: usize, nh: usize) -> Self {
        Self {
            t,
            c,
            nh,
            hs: c / nh,
        }
    }

    /// The hs values of head `h` in part `part` of the qkv row at (b, t).
    fn head<'a, F>(&self, qkv: &'a [F], b: usize, t: usize, part: Part, h: usize) -> &'a [F] {
        let start = ((b * self.t + t) * 3 + part as usize) * self.c + h * self.hs;
        &qkv[start..start + self.hs]
    }

    /// The hs values of head `h` in the (B,T,C) row at (b, t).
    fn out_head<'a, F>(&self, out: &'a [F], b: usize, t: usize, h: usize) -> &'a [F] {
        let start = (b * self.t + t) * self.c + h * self.hs;
        &out[start..start + self.hs]
    }

    /// Offset of score row (b, h, t) in a (B,NH,T,T) tensor.
    fn score_row(&self, b: usize, h: usize, t: usize) -> usize {
        ((b * self.nh + h) * self.t + t) * self.t
    }

    /// 1/sqrt(hs), the scale of the dot-product scores.
    fn scale<F: Float>(&self) -> F {
        F::lit(self.hs as f64).sqrt().recip()
    }
}

/// Causal multi-head self-attention. inp (B,T,3C) holds q,k,v (in that order, each C wide, head
/// h uses channels h*hs..(h+1)*hs with hs=C/NH); out (B,T,C); preatt and att (B,NH,T,T) are
/// saved for backward (att = softmax of scaled, causally masked preatt). Entries above the
/// diagonal are 0 in both preatt and att.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<F: Float>(
    out: &mut [F],
    preatt: &mut [F],
    att: &mut [F],
    inp: &[F],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    check_attention_forward(out.len(), preatt.len(), att.len(), inp.len(), b, t, c, nh);
    let dims = Dims::new(t, c, nh);
    preatt
        .par_chunks_mut(t * t)
        .zip(att.par_chunks_mut(t * t))
        .enumerate()
        .for_each(|(bh, (preatt, att))| {
            for (row, (pre_row, att_row)) in preatt
                .chunks_exact_mut(t)
                .zip(att.chunks_exact_mut(t))
                .enumerate()
            {
                scores_row(pre_row, att_row, inp, &dims, bh / nh, bh % nh, row);
            }
        });
    let att = &*att;
    out.par_chunks_mut(c).enumerate().for_each(|(row, out)| {
        let (bi, ti) = (row / t, row % t);
        out.fill(F::zero());
        for (h, out_h) in out.chunks_exact_mut(dims.hs).enumerate() {
            let att_row = &att[dims.score_row(bi, h, ti)..][..=ti];
            for (t2, &weight) in att_row.iter().enumerate() {
                axpy(out_h, weight, dims.head(inp, bi, t2, Part::Value, h));
            }
        }
    });
}

/// Fills one row (b, h, t) of preatt with scaled scores and of att with their causal softmax.
fn scores_row<F: Float>(
    pre_row: &mut [F],
    att_row: &mut [F],
    inp: &[F],
    dims: &Dims,
    b: usize,
    h: usize,
    t: usize,
) {
    let scale = dims.scale::<F>();
    let query = dims.head(inp, b, t, Part::Query, h);
    let mut max = F::neg_infinity();
    for (t2, score) in pre_row[..=t].iter_mut().enumerate() {
        *score = dot(query, dims.head(inp, b, t2, Part::Key, h)) * scale;
        max = max.max(*score);
    }
    pre_row[t + 1..].fill(F::zero());
    let mut sum = F::zero();
    for (a, &score) in att_row[..=t].iter_mut().zip(&pre_row[..=t]) {
        *a = (score - max).exp();
        sum += *a;
    }
    let inv_sum = sum.recip();
    for a in &mut att_row[..=t] {
        *a *= inv_sum;
    }
    att_row[t + 1..].fill(F::zero());
}

/// dinp (B,T,3C) accumulates; dpreatt and datt (B,NH,T,T) are scratch this function
/// overwrites entirely (their previous contents do not matter). dout (B,T,C); inp and att as
/// given to and saved by [`attention_forward`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<F: Float>(
    dinp: &mut [F],
    dpreatt: &mut [F],
    datt: &mut [F],
    dout: &[F],
    inp: &[F],
    att: &[F],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    check_attention_backward(
        dinp.len(),
        dpreatt.len(),
        datt.len(),
        dout.len(),
        inp.len(),
        att.len(),
        b,
        t,
        c,
        nh,
    );
    let dims = Dims::new(t, c, nh);
    datt.par_chunks_mut(t * t)
        .zip(dpreatt.par_chunks_mut(t * t))
        .enumerate()
        .for_each(|(bh, (datt, dpreatt))| {
            for (row, (datt_row, dpre_row)) in datt
                .chunks_exact_mut(t)
                .zip(dpreatt.chunks_exact_mut(t))
                .enumerate()
            {
                score_grads_row(
                    datt_row,
                    dpre_row,
                    dout,
                    inp,
                    att,
                    &dims,
                    bh / nh,
                    bh % nh,
                    row,
                );
            }
        });
    let dpreatt = &*dpreatt;
    dinp.par_chunks_mut(3 * c)
        .enumerate()
        .for_each(|(row, dinp_row)| {
            qkv_grads_row(dinp_row, dpreatt, dout, inp, att, &dims, row / t, row % t);
        });
}

/// Fills row (b, h, t) of datt (gradient of the softmax output) and dpreatt (gradient of the
/// scaled scores); entries above the diagonal are 0.
#[allow(clippy::too_many_arguments)]
fn score_grads_row<F: Float>(
    datt_row: &mut [F],
    dpre_row: &mut [F],
    dout: &[F],
    inp: &[F],
    att: &[F],
    dims: &Dims,
    b: usize,
    h: usize,
    t: usize,
) {
    let dy = dims.out_head(dout, b, t, h);
    let att_row = &att[dims.score_row(b, h, t)..][..=t];
    for (t2, da) in datt_row[..=t].iter_mut().enumerate() {
        *da = dot(dims.head(inp, b, t2, Part::Value, h), dy);
    }
    datt_row[t + 1..].fill(F::zero());
    // The softmax Jacobian att_i (δ_ij - att_j) contracted with datt, in O(T) form.
    let weighted = dot(att_row, &datt_row[..=t]);
    for ((dp, &a), &da) in dpre_row[..=t].iter_mut().zip(att_row).zip(&datt_row[..=t]) {
        *dp = a * (da - weighted);
    }
    dpre_row[t + 1..].fill(F::zero());
}

/// Accumulates the q, k and v gradients of the qkv row at (b, t). The query attends to keys
/// t2 <= t; the key and value of this position are used by queries t3 >= t.
#[allow(clippy::too_many_arguments)]
fn qkv_grads_row<F: Float>(
    dinp_row: &mut [F],
    dpreatt: &[F],
    dout: &[F],
    inp: &[F],
    att: &[F],
    dims: &Dims,
    b: usize,
    t: usize,
) {
    let scale = dims.scale::<F>();
    let (dq, rest) = dinp_row.split_at_mut(dims.c);
    let (dk, dv) = rest.split_at_mut(dims.c);
    let heads = dq
        .chunks_exact_mut(dims.hs)
        .zip(dk.chunks_exact_mut(dims.hs))
        .zip(dv.chunks_exact_mut(dims.hs));
    for (h, ((dq, dk), dv)) in heads.enumerate() {
        let dpre_row = &dpreatt[dims.score_row(b, h, t)..][..=t];
        for (t2, &dp) in dpre_row.iter().enumerate() {
            axpy(dq, dp * scale, dims.head(inp, b, t2, Part::Key, h));
        }
        for t3 in t..dims.t {
            let at = dims.score_row(b, h, t3) + t;
            axpy(
                dk,
                dpreatt[at] * scale,
                dims.head(inp, b, t3, Part::Query, h),
            );
            axpy(dv, att[at], dims.out_head(dout, b, t3, h));
        }
    }
}

#[cfg(test)]
mod tests {
    //! Finite-difference, accumulation, normalisation and f32-versus-f64 checks of attention.

    use super::super::test_util::{
        assert_accumulated, assert_close, dot, numeric_grad, to_f32, Rng, F32_TOL, GRAD_TOL,
        PREFILL,
    };
    use super::*;

    const B: usize = 2;
    const T: usize = 4;
    const C: usize = 8;
    const NH: usize = 2;

    /// Runs the forward and returns (out, preatt, att).
    fn forward<F: Float>(
        inp: &[F],
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> (Vec<F>, Vec<F>, Vec<F>) {
        let mut out = vec![F::zero(); b * t * c];
        let (mut preatt, mut att) = (
            vec![F::zero(); b * nh * t * t],
            vec![F::zero(); b * nh * t * t],
        );
        attention_forward(&mut out, &mut preatt, &mut att, inp, b, t, c, nh);
        (out, preatt, att)
    }

    #[test]
    fn attention_backward_matches_finite_differences_and_accumulates() {
        let mut rng = Rng::new(5);
        let (inp, r) = (rng.vec(B * T * 3 * C), rng.vec(B * T * C));
        let (_, _, att) = forward(&inp, B, T, C, NH);
        let backward = |fill: f64| {
            let mut dinp = vec![fill; inp.len()];
            // NaN scratch proves the backward never reads what it did not write.
            let (mut dpreatt, mut datt) = (vec![f64::NAN; att.len()], vec![f64::NAN; att.len()]);
            attention_backward(
                &mut dinp,
                &mut dpreatt,
                &mut datt,
                &r,
                &inp,
                &att,
                B,
                T,
                C,
                NH,
            );
            dinp
        };
        let dinp = backward(0.0);
        let numeric = numeric_grad(&inp, |x| dot(&forward(x, B, T, C, NH).0, &r));
        assert_close("dinp", &dinp, &numeric, GRAD_TOL);
        assert_accumulated("dinp", &dinp, &backward(PREFILL));
    }

    #[test]
    fn attention_rows_sum_to_one_and_are_causal() {
        let (b, t, c, nh) = (2, 7, 16, 4);
        let inp = to_f32(&Rng::new(6).vec(b * t * 3 * c));
        let (_, preatt, att) = forward(&inp, b, t, c, nh);
        for (i, (row, pre_row)) in att.chunks_exact(t).zip(preatt.chunks_exact(t)).enumerate() {
            let q = i % t;
            let sum: f32 = row[..=q].iter().sum();
            assert!((sum - 1.0).abs() <= 1e-6, "att row {i} sums to {sum}");
            assert!(
                row[q + 1..]
                    .iter()
                    .chain(&pre_row[q + 1..])
                    .all(|&a| a == 0.0),
                "row {i} is not causal"
            );
        }
    }

    #[test]
    fn attention_forward_f32_agrees_with_f64() {
        let (b, t, c, nh) = (2, 16, 64, 4);
        let inp = Rng::new(8).vec(b * t * 3 * c);
        let want = forward(&inp, b, t, c, nh);
        let got = forward(&to_f32(&inp), b, t, c, nh);
        let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        assert_close("out", &widen(&got.0), &want.0, F32_TOL);
        assert_close("att", &widen(&got.2), &want.2, F32_TOL);
    }
}
