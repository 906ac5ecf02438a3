//! The learning-rate schedule and the ZeRO-1 AdamW update of one rank's slice of the flat
//! parameter buffer.

use crate::config::TrainConfig;
use crate::layout::Layout;
use lazarus_kernels::cpu;
use std::ops::Range;

/// Learning rate at 0-based `step` of `cfg.steps`: linear warm-up to `lr`, then cosine decay
/// to `lr * min_lr_frac` at the last step.
pub fn learning_rate(cfg: &TrainConfig, step: u64) -> f32 {
    let peak = cfg.lr as f64;
    if step < cfg.warmup_steps {
        return (peak * (step + 1) as f64 / cfg.warmup_steps as f64) as f32;
    }
    let span = cfg.steps.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let progress = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    let min = peak * cfg.min_lr_frac as f64;
    (min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
}

/// The pieces of the owned slice `own` (a range of the padded flat buffer) that fall in each
/// tensor, with that tensor's weight-decay flag. Padding past the last tensor is skipped.
pub fn slice_segments(layout: &Layout, own: &Range<usize>) -> Vec<(Range<usize>, bool)> {
    layout
        .tensors
        .iter()
        .filter_map(|t| {
            let r = t.range();
            let lo = r.start.max(own.start);
            let hi = r.end.min(own.end);
            (lo < hi).then_some((lo..hi, t.decay))
        })
        .collect()
}

/// AdamW's hyper-parameters for one segment: `step` counts the updates done before this one,
/// and weight decay applies only where the tensor's flag says so.
pub fn segment_hparams(cfg: &TrainConfig, decay: bool, lr: f32, step: u64) -> cpu::AdamW {
    cpu::AdamW {
        lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: if decay { cfg.weight_decay } else { 0.0 },
        step: step + 1,
    }
}

/// AdamW on the owned slice: `params`, `grads`, `m`, `v` are all indexed relative to
/// `own.start`; decay applies per segment.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    cfg: &TrainConfig,
    segments: &[(Range<usize>, bool)],
    own_start: usize,
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f32,
    step: u64,
) {
    for (r, decay) in segments {
        let l = r.start - own_start..r.end - own_start;
        let hp = segment_hparams(cfg, *decay, lr, step);
        cpu::adamw_update(
            &mut params[l.clone()],
            &grads[l.clone()],
            &mut m[l.clone()],
            &mut v[l],
            &hp,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn schedule_warms_up_then_decays_to_floor() {
        let cfg = TrainConfig {
            steps: 100,
            warmup_steps: 10,
            lr: 1.0,
            min_lr_frac: 0.1,
            ..Default::default()
        };
        assert!((learning_rate(&cfg, 0) - 0.1).abs() < 1e-6);
        assert!((learning_rate(&cfg, 9) - 1.0).abs() < 1e-6);
        assert!((learning_rate(&cfg, 10) - 1.0).abs() < 1e-6);
        assert!((learning_rate(&cfg, 100) - 0.1).abs() < 1e-6);
        let mid = learning_rate(&cfg, 55);
        assert!((mid - 0.55).abs() < 1e-3, "{mid}");
    }

    #[test]
    fn segments_cover_the_slice_and_carry_decay() {
        let m = ModelConfig {
            layers: 1,
            heads: 2,
            channels: 8,
            vocab: 16,
            padded_vocab: 128,
            block_size: 4,
        };
        let l = Layout::gpt2(&m);
        let padded = l.total.div_ceil(3) * 3;
        let shard = padded / 3;
        let mut covered = 0;
        for r in 0..3 {
            let own = r * shard..(r + 1) * shard;
            let segs = slice_segments(&l, &own);
            covered += segs.iter().map(|(s, _)| s.len()).sum::<usize>();
            for (s, decay) in segs {
                let t = l
                    .tensors
                    .iter()
                    .find(|t| t.range().contains(&s.start))
                    .unwrap();
                assert_eq!(decay, t.decay);
            }
        }
        assert_eq!(covered, l.total);
    }
}
