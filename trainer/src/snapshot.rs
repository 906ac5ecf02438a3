//! The trainer's side of checkpoints: which tensors a rank saves, the training state that goes
//! into `COMMITTED`, and restoring a rank's slices (from any world size) into a `Trainer`.

use crate::error::{Result, TrainError};
use crate::state::{TrainingState, ADAM_M, ADAM_V, PARAMS};
use crate::train::Trainer;
use lazarus_checkpoint::{flat_shards_for, Dtype, Manifest, OpenCheckpoint, Staging, TensorSpec};

/// The three flat slices this rank saves: parameters, AdamW m and v.
pub fn tensor_specs(tr: &Trainer) -> Vec<TensorSpec> {
    let r = tr.own_unpadded();
    let total = tr.num_params() as u64;
    [PARAMS, ADAM_M, ADAM_V]
        .iter()
        .map(|name| TensorSpec::flat(*name, Dtype::F32, r.start as u64, r.len(), total))
        .collect()
}

/// Copies this rank's parameters, m and v (from [`Trainer::snapshot`]) into the staging
/// buffer; training goes on after.
pub fn fill(st: &mut Staging<'_>, (p, m, v): (&[f32], &[f32], &[f32])) {
    for (name, src) in [(PARAMS, p), (ADAM_M, m), (ADAM_V, v)] {
        let dst = st
            .f32_mut(name)
            .expect("staging holds the specs of tensor_specs()");
        dst.copy_from_slice(src);
    }
}

/// The training state at the current step.
pub fn training_state(tr: &Trainer) -> TrainingState {
    let c = tr.cursor();
    TrainingState {
        step: tr.step,
        total_steps: tr.cfg.steps,
        optimizer_steps: tr.optimizer_steps,
        samples: tr.samples,
        tokens: tr.samples * tr.cfg.seq as u64,
        epoch: c.epoch,
        position: c.position,
        lr: tr.history.back().map_or(0.0, |r| r.lr),
        model: tr.model,
        layout_hash: tr.layout_hash(),
        world_size: tr.comm().world_size(),
        config: tr.cfg.clone(),
        metrics: tr.history.iter().cloned().collect(),
        restarts: tr.restarts,
        stage: tr.stage.clone(),
    }
}

/// The shards this rank must read (and so verify) to restore its slice.
pub fn shards_needed(tr: &Trainer, manifest: &Manifest) -> Vec<usize> {
    let r = tr.own_unpadded();
    flat_shards_for(manifest, PARAMS, r.start as u64..r.end as u64)
}

/// Reads the training state out of a manifest.
pub fn state_of(manifest: &Manifest) -> Result<TrainingState> {
    serde_json::from_value(manifest.training_state.clone()).map_err(|e| {
        TrainError::Resume(format!(
            "the training state in COMMITTED of step {} is not one this version understands: {e}",
            manifest.step
        ))
    })
}

/// How much of a checkpoint to take.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreParts {
    /// Leave AdamW's moments at zero.
    pub skip_optimizer: bool,
    /// Start the schedule (and the data stream) from step 0 with the loaded weights.
    pub reset_schedule: bool,
}

fn f32_bytes_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: u8 has alignment 1 and any byte pattern written here is a valid f32; the length
    // is exactly the f32 slice's size in bytes and the borrow is exclusive.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// Restores this rank's slices from `ckpt` (collective: ends with an all-gather of the
/// parameters). Refuses a checkpoint of another model shape.
pub fn restore(
    tr: &mut Trainer,
    ckpt: &OpenCheckpoint,
    parts: RestoreParts,
) -> Result<TrainingState> {
    let state = state_of(ckpt.manifest())?;
    if state.model != tr.model || state.layout_hash != tr.layout_hash() {
        let (a, b) = (&state.model, &tr.model);
        return Err(TrainError::Resume(format!(
            "checkpoint {} holds a model of {} layers, {} heads, {} channels, vocab {}, block {}, but this run is configured for {} layers, {} heads, {} channels, vocab {}, block {}; train with the checkpoint's shape or use a new --run-dir",
            ckpt.dir().display(), a.layers, a.heads, a.channels, a.vocab, a.block_size,
            b.layers, b.heads, b.channels, b.vocab, b.block_size
        )));
    }
    let start = tr.own_unpadded().start as u64;
    let (p, m, v) = tr.own_state_mut();
    ckpt.read_flat(PARAMS, start, f32_bytes_mut(p))?;
    if parts.skip_optimizer {
        m.fill(0.0);
        v.fill(0.0);
    } else {
        ckpt.read_flat(ADAM_M, start, f32_bytes_mut(m))?;
        ckpt.read_flat(ADAM_V, start, f32_bytes_mut(v))?;
    }
    tr.gather_params()?;
    if !parts.reset_schedule {
        tr.step = state.step;
        tr.samples = state.samples;
        tr.history = state.metrics.iter().cloned().collect();
    }
    // AdamW's bias correction belongs to the moments: restored moments keep their step count
    // even when the schedule restarts.
    tr.optimizer_steps = if parts.skip_optimizer {
        0
    } else {
        state.optimizer_steps
    };
    tr.restarts = state.restarts + 1;
    Ok(state)
}
