//! Token and position embeddings: the forward gathers rows of `wte` and `wpe`, the backward
//! scatters the output gradient back into them.

use rayon::prelude::*;

use super::shapes::{check_encoder_backward, check_encoder_forward};
use super::{add_assign, Float};

/// out (B,T,C) = `wte[tokens[b,t]] + wpe[t]`. tokens (B,T) as u32, wte (Vp,C), wpe (maxT,C) with
/// maxT >= T.
pub fn encoder_forward<F: Float>(
    out: &mut [F],
    tokens: &[u32],
    wte: &[F],
    wpe: &[F],
    b: usize,
    t: usize,
    c: usize,
) {
    let vp = check_encoder_forward(out.len(), tokens.len(), wte.len(), wpe.len(), b, t, c);
    assert_tokens_below(tokens, vp, "encoder_forward");
    out.par_chunks_mut(c)
        .zip(tokens.par_iter())
        .enumerate()
        .for_each(|(row, (out, &token))| {
            let token_row = &wte[token as usize * c..][..c];
            let pos_row = &wpe[(row % t) * c..][..c];
            for ((o, &x), &p) in out.iter_mut().zip(token_row).zip(pos_row) {
                *o = x + p;
            }
        });
}

/// Accumulates into dwte (Vp,C) and dwpe (maxT,C) (only the first T rows of dwpe are touched).
/// dout (B,T,C), tokens (B,T).
pub fn encoder_backward<F: Float>(
    dwte: &mut [F],
    dwpe: &mut [F],
    dout: &[F],
    tokens: &[u32],
    b: usize,
    t: usize,
    c: usize,
) {
    let n = b * t;
    let vp = check_encoder_backward(dwte.len(), dwpe.len(), dout.len(), tokens.len(), b, t, c);
    assert_tokens_below(tokens, vp, "encoder_backward");

    // Rows sorted by (token, row) let each dwte row be owned by one task that adds its rows in
    // sequence order, so repeated tokens sum the same way for any thread count.
    let mut rows: Vec<usize> = (0..n).collect();
    rows.sort_unstable_by_key(|&row| (tokens[row], row));
    let token_of = |row: &usize| tokens[*row] as usize;
    dwte.par_chunks_mut(c)
        .enumerate()
        .with_min_len(64)
        .for_each(|(token, dwte_row)| {
            let start = rows.partition_point(|row| token_of(row) < token);
            let end = rows.partition_point(|row| token_of(row) <= token);
            for &row in &rows[start..end] {
                add_assign(dwte_row, &dout[row * c..][..c]);
            }
        });

    // Each position's row sums over the batch in order.
    dwpe[..t * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(pos, dwpe_row)| {
            for batch in 0..b {
                add_assign(dwpe_row, &dout[(batch * t + pos) * c..][..c]);
            }
        });
}

/// Asserts that every token indexes a row of an embedding table with `rows` rows.
fn assert_tokens_below(tokens: &[u32], rows: usize, what: &str) {
    let first_bad = tokens
        .iter()
        .enumerate()
        .find(|(_, &token)| token as usize >= rows);
    assert!(
        first_bad.is_none(),
        "{what}: the (position, token) {first_bad:?} is outside the embedding table of {rows} rows"
    );
}

#[cfg(test)]
mod tests {
    //! Finite-difference and accumulation checks of the embedding backward pass.

    use super::super::test_util::{
        assert_accumulated, assert_close, dot, numeric_grad, Rng, GRAD_TOL, PREFILL,
    };
    use super::*;

    #[test]
    fn encoder_backward_matches_finite_differences_and_accumulates() {
        let (b, t, c, vp, max_t) = (2, 3, 8, 8, 4);
        // Tokens repeat on purpose: rows sharing a token must add up in dwte.
        let tokens = [1u32, 3, 1, 5, 3, 3];
        let mut rng = Rng::new(1);
        let wte = rng.vec(vp * c);
        let wpe = rng.vec(max_t * c);
        let r = rng.vec(b * t * c);
        let loss = |wte: &[f64], wpe: &[f64]| {
            let mut out = vec![0.0; b * t * c];
            encoder_forward(&mut out, &tokens, wte, wpe, b, t, c);
            dot(&out, &r)
        };
        let backward = |fill: f64| {
            let (mut dwte, mut dwpe) = (vec![fill; vp * c], vec![fill; max_t * c]);
            encoder_backward(&mut dwte, &mut dwpe, &r, &tokens, b, t, c);
            (dwte, dwpe)
        };
        let (dwte, dwpe) = backward(0.0);
        assert_close(
            "dwte",
            &dwte,
            &numeric_grad(&wte, |x| loss(x, &wpe)),
            GRAD_TOL,
        );
        assert_close(
            "dwpe",
            &dwpe,
            &numeric_grad(&wpe, |x| loss(&wte, x)),
            GRAD_TOL,
        );
        let (dwte_acc, dwpe_acc) = backward(PREFILL);
        assert_accumulated("dwte", &dwte, &dwte_acc);
        assert_accumulated("dwpe", &dwpe, &dwpe_acc);
        assert!(
            dwpe[t * c..].iter().all(|&g| g == 0.0),
            "rows of dwpe past T were touched"
        );
    }

    #[test]
    #[should_panic(expected = "outside the embedding table")]
    fn encoder_forward_rejects_out_of_range_tokens() {
        let mut out = vec![0.0f32; 4];
        encoder_forward(&mut out, &[0, 2], &[0.0; 4], &[0.0; 4], 1, 2, 2);
    }
}
