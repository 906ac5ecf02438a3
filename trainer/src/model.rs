//! The GPT-2 model on the CPU reference backend: activations allocated once for a maximum
//! (B, T), forward, fused loss, and backward into a flat gradient buffer.
//!
//! Shapes: B batch, T sequence, C channels, NH heads, V vocab, Vp padded vocab, L layers.

use crate::config::ModelConfig;
use crate::layout::{split_ranges_mut, Layout};
use lazarus_kernels::cpu;

/// Saved activations of one block, each sized for (B, T) at capacity.
#[derive(Debug)]
struct BlockActs {
    ln1: Vec<f32>,      // (B,T,C)
    ln1_mean: Vec<f32>, // (B,T)
    ln1_rstd: Vec<f32>, // (B,T)
    qkv: Vec<f32>,      // (B,T,3C)
    atty: Vec<f32>,     // (B,T,C)
    att: Vec<f32>,      // (B,NH,T,T)
    attproj: Vec<f32>,  // (B,T,C)
    res2: Vec<f32>,     // (B,T,C)
    ln2: Vec<f32>,      // (B,T,C)
    ln2_mean: Vec<f32>, // (B,T)
    ln2_rstd: Vec<f32>, // (B,T)
    fch: Vec<f32>,      // (B,T,4C)
    fch_gelu: Vec<f32>, // (B,T,4C)
    fcproj: Vec<f32>,   // (B,T,C)
    res3: Vec<f32>,     // (B,T,C)
}

/// Gradient scratch for the backward pass. One `dres` buffer carries the residual stream's
/// gradient down through all blocks: a residual add passes its gradient through unchanged,
/// so LayerNorm backward accumulates into it in place.
#[derive(Debug)]
struct Scratch {
    preatt: Vec<f32>,    // (B,NH,T,T), forward scratch
    dres: Vec<f32>,      // (B,T,C)
    dln: Vec<f32>,       // (B,T,C)
    datty: Vec<f32>,     // (B,T,C)
    dqkv: Vec<f32>,      // (B,T,3C)
    dpreatt: Vec<f32>,   // (B,NH,T,T)
    datt: Vec<f32>,      // (B,NH,T,T)
    dfch: Vec<f32>,      // (B,T,4C)
    dfch_gelu: Vec<f32>, // (B,T,4C)
}

/// The model's compute state for batches of at most `max_b` sequences of `max_t` tokens.
#[derive(Debug)]
pub struct Gpt {
    pub config: ModelConfig,
    pub layout: Layout,
    max_b: usize,
    max_t: usize,
    encoded: Vec<f32>,
    blocks: Vec<BlockActs>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    logits: Vec<f32>, // (B,T,Vp); holds dlogits after the fused loss
    losses: Vec<f32>, // (B,T)
    scratch: Option<Scratch>,
    /// (b, t) of the last forward pass.
    last: (usize, usize),
}

fn zeros(n: usize) -> Vec<f32> {
    vec![0.0; n]
}

impl BlockActs {
    fn new(bt: usize, c: usize, nh: usize, t: usize) -> Self {
        let b = bt / t;
        BlockActs {
            ln1: zeros(bt * c),
            ln1_mean: zeros(bt),
            ln1_rstd: zeros(bt),
            qkv: zeros(bt * 3 * c),
            atty: zeros(bt * c),
            att: zeros(b * nh * t * t),
            attproj: zeros(bt * c),
            res2: zeros(bt * c),
            ln2: zeros(bt * c),
            ln2_mean: zeros(bt),
            ln2_rstd: zeros(bt),
            fch: zeros(bt * 4 * c),
            fch_gelu: zeros(bt * 4 * c),
            fcproj: zeros(bt * c),
            res3: zeros(bt * c),
        }
    }
}

impl Gpt {
    /// Allocates every buffer for batches up to (max_b, max_t); `training` adds the backward
    /// scratch. Nothing is allocated afterwards.
    pub fn new(config: ModelConfig, max_b: usize, max_t: usize, training: bool) -> Self {
        assert!(
            max_t <= config.block_size,
            "T beyond the model's block size"
        );
        let (c, nh, vp) = (config.channels, config.heads, config.padded_vocab);
        let bt = max_b * max_t;
        let att = max_b * nh * max_t * max_t;
        let scratch = Scratch {
            preatt: zeros(att),
            dres: zeros(if training { bt * c } else { 0 }),
            dln: zeros(if training { bt * c } else { 0 }),
            datty: zeros(if training { bt * c } else { 0 }),
            dqkv: zeros(if training { bt * 3 * c } else { 0 }),
            dpreatt: zeros(if training { att } else { 0 }),
            datt: zeros(if training { att } else { 0 }),
            dfch: zeros(if training { bt * 4 * c } else { 0 }),
            dfch_gelu: zeros(if training { bt * 4 * c } else { 0 }),
        };
        Gpt {
            layout: Layout::gpt2(&config),
            config,
            max_b,
            max_t,
            encoded: zeros(bt * c),
            blocks: (0..config.layers)
                .map(|_| BlockActs::new(bt, c, nh, max_t))
                .collect(),
            lnf: zeros(bt * c),
            lnf_mean: zeros(bt),
            lnf_rstd: zeros(bt),
            logits: zeros(bt * vp),
            losses: zeros(bt),
            scratch: Some(scratch),
            last: (0, 0),
        }
    }

    /// Number of f32 values `Gpt::new(config, max_b, max_t, training)` allocates: the memory
    /// estimate of `--dry-run` uses it, and a test holds it to the real allocation.
    pub fn buffer_floats(
        config: &ModelConfig,
        max_b: usize,
        max_t: usize,
        training: bool,
    ) -> usize {
        let (c, nh, vp, l) = (
            config.channels,
            config.heads,
            config.padded_vocab,
            config.layers,
        );
        let bt = max_b * max_t;
        let att = max_b * nh * max_t * max_t;
        // Per block: ln1, atty, attproj, res2, ln2, fcproj, res3 (C each), qkv (3C), fch and
        // fch_gelu (4C each); four (B,T) statistics; the attention matrix.
        let block = bt * c * 18 + bt * 4 + att;
        // encoded, lnf (C); lnf statistics and losses (B,T); logits (Vp); preatt.
        let forward = bt * c * 2 + bt * 3 + bt * vp + att;
        // dres, dln, datty (C), dqkv (3C), dfch and dfch_gelu (4C); dpreatt and datt.
        let backward = if training { bt * c * 14 + 2 * att } else { 0 };
        l * block + forward + backward
    }

    /// Number of f32 values this model's buffers hold.
    pub fn allocated_floats(&self) -> usize {
        let b = |a: &BlockActs| {
            [
                &a.ln1,
                &a.ln1_mean,
                &a.ln1_rstd,
                &a.qkv,
                &a.atty,
                &a.att,
                &a.attproj,
                &a.res2,
                &a.ln2,
                &a.ln2_mean,
                &a.ln2_rstd,
                &a.fch,
                &a.fch_gelu,
                &a.fcproj,
                &a.res3,
            ]
            .iter()
            .map(|v| v.len())
            .sum::<usize>()
        };
        let sc = self.scratch.as_ref().map_or(0, |s| {
            [
                &s.preatt,
                &s.dres,
                &s.dln,
                &s.datty,
                &s.dqkv,
                &s.dpreatt,
                &s.datt,
                &s.dfch,
                &s.dfch_gelu,
            ]
            .iter()
            .map(|v| v.len())
            .sum()
        });
        let own = [
            &self.encoded,
            &self.lnf,
            &self.lnf_mean,
            &self.lnf_rstd,
            &self.logits,
            &self.losses,
        ]
        .iter()
        .map(|v| v.len())
        .sum::<usize>();
        self.blocks.iter().map(b).sum::<usize>() + sc + own
    }

    /// Forward pass over `inputs` (B,T); leaves the logits (B,T,Vp) in place.
    pub fn forward(&mut self, params: &[f32], inputs: &[u32], b: usize, t: usize) {
        assert!(b <= self.max_b && t <= self.max_t && inputs.len() == b * t);
        assert!(
            params.len() >= self.layout.total,
            "parameter buffer too short"
        );
        let (c, nh, vp) = (
            self.config.channels,
            self.config.heads,
            self.config.padded_vocab,
        );
        let n = b * t;
        let p = |r: &std::ops::Range<usize>| &params[r.clone()];
        let lay = &self.layout;
        let sc = self.scratch.as_mut().expect("scratch");
        cpu::encoder_forward(
            &mut self.encoded[..n * c],
            inputs,
            p(&lay.wte),
            p(&lay.wpe),
            b,
            t,
            c,
        );
        for l in 0..self.config.layers {
            let (done, rest) = self.blocks.split_at_mut(l);
            let a = &mut rest[0];
            let residual: &[f32] = if l == 0 {
                &self.encoded[..n * c]
            } else {
                &done[l - 1].res3[..n * c]
            };
            let w = &lay.blocks[l];
            cpu::layernorm_forward(
                &mut a.ln1[..n * c],
                &mut a.ln1_mean[..n],
                &mut a.ln1_rstd[..n],
                residual,
                p(&w.ln1_w),
                p(&w.ln1_b),
                n,
                c,
            );
            cpu::matmul_forward(
                &mut a.qkv[..n * 3 * c],
                &a.ln1[..n * c],
                p(&w.qkv_w),
                Some(p(&w.qkv_b)),
                n,
                c,
                3 * c,
            );
            let att_len = b * nh * t * t;
            cpu::attention_forward(
                &mut a.atty[..n * c],
                &mut sc.preatt[..att_len],
                &mut a.att[..att_len],
                &a.qkv[..n * 3 * c],
                b,
                t,
                c,
                nh,
            );
            cpu::matmul_forward(
                &mut a.attproj[..n * c],
                &a.atty[..n * c],
                p(&w.attproj_w),
                Some(p(&w.attproj_b)),
                n,
                c,
                c,
            );
            cpu::residual_forward(&mut a.res2[..n * c], residual, &a.attproj[..n * c]);
            cpu::layernorm_forward(
                &mut a.ln2[..n * c],
                &mut a.ln2_mean[..n],
                &mut a.ln2_rstd[..n],
                &a.res2[..n * c],
                p(&w.ln2_w),
                p(&w.ln2_b),
                n,
                c,
            );
            cpu::matmul_forward(
                &mut a.fch[..n * 4 * c],
                &a.ln2[..n * c],
                p(&w.fc_w),
                Some(p(&w.fc_b)),
                n,
                c,
                4 * c,
            );
            cpu::gelu_forward(&mut a.fch_gelu[..n * 4 * c], &a.fch[..n * 4 * c]);
            cpu::matmul_forward(
                &mut a.fcproj[..n * c],
                &a.fch_gelu[..n * 4 * c],
                p(&w.fcproj_w),
                Some(p(&w.fcproj_b)),
                n,
                4 * c,
                c,
            );
            cpu::residual_forward(&mut a.res3[..n * c], &a.res2[..n * c], &a.fcproj[..n * c]);
        }
        let last = self
            .blocks
            .last()
            .map(|a| &a.res3[..n * c])
            .unwrap_or(&self.encoded[..n * c]);
        cpu::layernorm_forward(
            &mut self.lnf[..n * c],
            &mut self.lnf_mean[..n],
            &mut self.lnf_rstd[..n],
            last,
            p(&lay.lnf_w),
            p(&lay.lnf_b),
            n,
            c,
        );
        cpu::matmul_forward(
            &mut self.logits[..n * vp],
            &self.lnf[..n * c],
            p(&lay.wte),
            None,
            n,
            c,
            vp,
        );
        self.last = (b, t);
    }

    /// Logits of the last forward pass, (B,T,Vp).
    pub fn logits(&self) -> &[f32] {
        let (b, t) = self.last;
        &self.logits[..b * t * self.config.padded_vocab]
    }

    /// Forward plus loss: the sum of per-token cross-entropy losses over the batch.
    pub fn loss_sum(
        &mut self,
        params: &[f32],
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
    ) -> f64 {
        self.forward(params, inputs, b, t);
        let (n, v, vp) = (b * t, self.config.vocab, self.config.padded_vocab);
        cpu::softmax_crossentropy_forward(
            &mut self.losses[..n],
            &self.logits[..n * vp],
            targets,
            n,
            v,
            vp,
        );
        self.losses[..n].iter().map(|&x| x as f64).sum()
    }

    /// Forward, fused loss, and backward: adds d(dloss * Σ losses)/dparams into `grads`.
    /// Returns the sum of the per-token losses.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &mut self,
        params: &[f32],
        grads: &mut [f32],
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        dloss: f32,
    ) -> f64 {
        self.forward(params, inputs, b, t);
        let (n, v, vp, c) = (
            b * t,
            self.config.vocab,
            self.config.padded_vocab,
            self.config.channels,
        );
        cpu::softmax_crossentropy_backward(
            &mut self.logits[..n * vp],
            &mut self.losses[..n],
            targets,
            dloss,
            n,
            v,
            vp,
        );
        let loss = self.losses[..n].iter().map(|&x| x as f64).sum();
        let lay = &self.layout;
        let sc = self.scratch.as_mut().expect("scratch");
        // Head: the logits buffer now holds dlogits; wte is tied, so its gradient gets both
        // the head's and the embedding's contributions.
        sc.dln[..n * c].fill(0.0);
        {
            let dwte = &mut grads[lay.wte.clone()];
            cpu::matmul_backward(
                &mut sc.dln[..n * c],
                dwte,
                None,
                &self.logits[..n * vp],
                &self.lnf[..n * c],
                &params[lay.wte.clone()],
                n,
                c,
                vp,
            );
        }
        sc.dres[..n * c].fill(0.0);
        {
            let last = self
                .blocks
                .last()
                .map(|a| &a.res3[..n * c])
                .unwrap_or(&self.encoded[..n * c]);
            let g = split_ranges_mut(grads, &[lay.lnf_w.clone(), lay.lnf_b.clone()]);
            let [dw, db] = <[&mut [f32]; 2]>::try_from(g).expect("two ranges");
            cpu::layernorm_backward(
                &mut sc.dres[..n * c],
                dw,
                db,
                &sc.dln[..n * c],
                last,
                &params[lay.lnf_w.clone()],
                &self.lnf_mean[..n],
                &self.lnf_rstd[..n],
                n,
                c,
            );
        }
        for l in (0..self.config.layers).rev() {
            let residual: &[f32] = if l == 0 {
                &self.encoded[..n * c]
            } else {
                &self.blocks[l - 1].res3[..n * c]
            };
            block_backward(
                &self.config,
                lay,
                l,
                &self.blocks[l],
                sc,
                residual,
                params,
                grads,
                b,
                t,
            );
        }
        let g = split_ranges_mut(grads, &[lay.wte.clone(), lay.wpe.clone()]);
        let [dwte, dwpe] = <[&mut [f32]; 2]>::try_from(g).expect("two ranges");
        cpu::encoder_backward(dwte, dwpe, &sc.dres[..n * c], inputs, b, t, c);
        loss
    }
}

/// Backward through block `l`: `sc.dres` holds d(block output) on entry and d(block input)
/// on exit.
#[allow(clippy::too_many_arguments)]
fn block_backward(
    cfg: &ModelConfig,
    lay: &Layout,
    l: usize,
    a: &BlockActs,
    sc: &mut Scratch,
    residual: &[f32],
    params: &[f32],
    grads: &mut [f32],
    b: usize,
    t: usize,
) {
    let (c, nh) = (cfg.channels, cfg.heads);
    let n = b * t;
    let w = &lay.blocks[l];
    let p = |r: &std::ops::Range<usize>| &params[r.clone()];
    let g = split_ranges_mut(grads, &w.in_order());
    let [dln1_w, dln1_b, dqkv_w, dqkv_b, dattproj_w, dattproj_b, dln2_w, dln2_b, dfc_w, dfc_b, dfcproj_w, dfcproj_b] =
        <[&mut [f32]; 12]>::try_from(g).expect("twelve ranges");
    // MLP: res3 = res2 + fcproj(gelu(fc(ln2(res2)))).
    sc.dfch_gelu[..n * 4 * c].fill(0.0);
    cpu::matmul_backward(
        &mut sc.dfch_gelu[..n * 4 * c],
        dfcproj_w,
        Some(dfcproj_b),
        &sc.dres[..n * c],
        &a.fch_gelu[..n * 4 * c],
        p(&w.fcproj_w),
        n,
        4 * c,
        c,
    );
    sc.dfch[..n * 4 * c].fill(0.0);
    cpu::gelu_backward(
        &mut sc.dfch[..n * 4 * c],
        &a.fch[..n * 4 * c],
        &sc.dfch_gelu[..n * 4 * c],
    );
    sc.dln[..n * c].fill(0.0);
    cpu::matmul_backward(
        &mut sc.dln[..n * c],
        dfc_w,
        Some(dfc_b),
        &sc.dfch[..n * 4 * c],
        &a.ln2[..n * c],
        p(&w.fc_w),
        n,
        c,
        4 * c,
    );
    cpu::layernorm_backward(
        &mut sc.dres[..n * c],
        dln2_w,
        dln2_b,
        &sc.dln[..n * c],
        &a.res2[..n * c],
        p(&w.ln2_w),
        &a.ln2_mean[..n],
        &a.ln2_rstd[..n],
        n,
        c,
    );
    // Attention: res2 = residual + attproj(attention(qkv(ln1(residual)))).
    sc.datty[..n * c].fill(0.0);
    cpu::matmul_backward(
        &mut sc.datty[..n * c],
        dattproj_w,
        Some(dattproj_b),
        &sc.dres[..n * c],
        &a.atty[..n * c],
        p(&w.attproj_w),
        n,
        c,
        c,
    );
    let att_len = b * nh * t * t;
    sc.dqkv[..n * 3 * c].fill(0.0);
    cpu::attention_backward(
        &mut sc.dqkv[..n * 3 * c],
        &mut sc.dpreatt[..att_len],
        &mut sc.datt[..att_len],
        &sc.datty[..n * c],
        &a.qkv[..n * 3 * c],
        &a.att[..att_len],
        b,
        t,
        c,
        nh,
    );
    sc.dln[..n * c].fill(0.0);
    cpu::matmul_backward(
        &mut sc.dln[..n * c],
        dqkv_w,
        Some(dqkv_b),
        &sc.dqkv[..n * 3 * c],
        &a.ln1[..n * c],
        p(&w.qkv_w),
        n,
        c,
        3 * c,
    );
    cpu::layernorm_backward(
        &mut sc.dres[..n * c],
        dln1_w,
        dln1_b,
        &sc.dln[..n * c],
        residual,
        p(&w.ln1_w),
        &a.ln1_mean[..n],
        &a.ln1_rstd[..n],
        n,
        c,
    );
}

/// GPT-2 initialisation from `seed`: N(0, 0.02) for matrices and embeddings, residual
/// projections scaled by 1/sqrt(2L), zero biases, unit LayerNorm gains, zero padded vocab rows.
pub fn init_params(layout: &Layout, cfg: &ModelConfig, seed: u64, params: &mut [f32]) {
    let mut rng = crate::rng::Rng::new(seed);
    let resid_scale = 1.0 / (2.0 * cfg.layers as f64).sqrt();
    for t in &layout.tensors {
        let out = &mut params[t.range()];
        if t.name.ends_with("ln_1.weight")
            || t.name.ends_with("ln_2.weight")
            || t.name == "ln_f.weight"
        {
            out.fill(1.0);
        } else if t.shape.len() == 1 {
            out.fill(0.0);
        } else {
            let std = if t.name.ends_with("c_proj.weight") {
                0.02 * resid_scale
            } else {
                0.02
            };
            out.iter_mut()
                .for_each(|x| *x = (rng.normal() * std) as f32);
        }
    }
    let (c, v) = (cfg.channels, cfg.vocab);
    params[layout.wte.start + v * c..layout.wte.end].fill(0.0);
}
