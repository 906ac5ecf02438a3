//! The training loop: data-parallel steps with ZeRO-1 over a `Communicator`, validation,
//! metrics, and the run directory's files.

use crate::config::{ModelConfig, TrainConfig};
use crate::data::{Cursor, DataSource, Sampler, Split};
use crate::device::{Accel, ShardShape};
use crate::error::{Result, TrainError};
use crate::layout::Layout;
use crate::model::{init_params, Gpt};
use crate::optim::{adamw_step, learning_rate, slice_segments};
use lazarus_comm::Communicator;
use lazarus_kernels::cpu;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

/// What one optimizer step did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepReport {
    /// 1-based number of the step just completed.
    pub step: u64,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub ms: f64,
    pub tokens_per_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
    /// Time the loop was held by a checkpoint save at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ckpt_stall_ms: Option<f64>,
}

/// The gradients of a step whose update has not run yet (see [`Trainer::accumulate`]).
#[must_use = "a step's gradients are applied by Trainer::update"]
pub struct Accumulated {
    started: Instant,
    /// Sum of this rank's per-token losses.
    loss_sum: f64,
}

/// What the loop tells its caller, for logs and progress bars.
#[derive(Debug, Clone)]
pub enum Event {
    /// Free-form information (data source, model size, commits, ...).
    Info(String),
    /// Something went wrong that training survives (a failed save, say).
    Warn(String),
    /// A completed step; `logged` says whether it is a log step.
    Step {
        report: StepReport,
        logged: bool,
        total: u64,
    },
    /// Live stats, every `stats_interval_s` seconds (rank 0).
    Stats(crate::stats::StatsRecord),
}

/// The end-of-run summary written to `final_metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinalMetrics {
    pub step: u64,
    pub final_loss: f32,
    pub val_loss: f32,
    pub tokens: u64,
    pub params_sha256: String,
    pub num_params: usize,
    pub elapsed_s: f64,
    pub tokens_per_s: f64,
}

/// A rank's whole training state: model, flat buffers, optimizer slice, data.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub model: ModelConfig,
    comm: Box<dyn Communicator>,
    /// The CPU model; with an accelerator it holds the layout and no activations.
    gpt: Gpt,
    /// The device that runs forward and backward and holds the optimizer shard, when not the
    /// CPU. Its shard is the master copy: `m`, `v` here are then only restore buffers.
    accel: Option<Accel>,
    data: DataSource,
    sampler: Sampler,
    /// Full flat parameters (padded to a multiple of the world size).
    pub params: Vec<f32>,
    grads: Vec<f32>,
    /// This rank's slice of the padded flat buffer.
    own: Range<usize>,
    segments: Vec<(Range<usize>, bool)>,
    grad_shard: Vec<f32>,
    param_shard: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// Number of optimizer steps completed.
    pub step: u64,
    /// AdamW updates applied since the moments were last reset (bias correction uses it).
    pub optimizer_steps: u64,
    /// Global samples consumed: the data cursor.
    pub samples: u64,
    /// Restarts from a checkpoint so far.
    pub restarts: u64,
    /// The most recent logged steps, kept for checkpoints.
    pub history: std::collections::VecDeque<StepReport>,
    /// The curriculum stage this trainer runs, recorded in its checkpoints.
    pub stage: Option<crate::state::StageTag>,
}

/// Files of a run directory.
pub mod files {
    pub const CONFIG: &str = "config.toml";
    pub const MODEL: &str = "model.json";
    pub const METRICS: &str = "metrics.jsonl";
    pub const COMPLETE: &str = "training_complete.marker";
    pub const FINAL_METRICS: &str = "final_metrics.json";
    pub const FINAL_PARAMS: &str = "final_params.bin";
}

/// SHA-256 of f32 values as little-endian bytes, in hex.
pub fn sha256_f32(values: &[f32]) -> String {
    let mut h = Sha256::new();
    for chunk in values.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
        h.update(&bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` atomically: tmp, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io = |e| TrainError::io("writing", path, e);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl Trainer {
    /// Opens the data, builds the model and allocates every buffer; parameters are initialised
    /// from the seed (identically on every rank).
    pub fn new(cfg: TrainConfig, comm: Box<dyn Communicator>) -> Result<Self> {
        let world = comm.world_size();
        cfg.validate(world)?;
        let data = DataSource::open(&cfg.data, cfg.seq)?;
        let model = cfg.model_config(data.vocab)?;
        if model.vocab < data.vocab {
            return Err(TrainError::Config(format!(
                "vocab {} is smaller than the data's vocabulary {}",
                model.vocab, data.vocab
            )));
        }
        let b_local = cfg.batch / world;
        let total = Layout::gpt2(&model).total;
        let padded = total.div_ceil(world) * world;
        let shard = padded / world;
        let own = comm.rank() * shard..(comm.rank() + 1) * shard;
        let shape = ShardShape {
            len: shard,
            saved_len: own.end.min(total).saturating_sub(own.start.min(total)),
        };
        let mut accel = Accel::open(&cfg, comm.rank(), model, b_local, shape)?;
        // On an accelerator the host model only lends its layout: no host activations.
        let gpt = match accel {
            Some(_) => Gpt::new(model, 0, cfg.seq, false),
            None => Gpt::new(model, b_local, cfg.seq, true),
        };
        let mut params = vec![0.0f32; padded];
        init_params(&gpt.layout, &model, cfg.seed, &mut params);
        let segments = slice_segments(&gpt.layout, &own);
        let sampler = Sampler::new(cfg.seed, data.train.windows);
        if let Some(a) = accel.as_mut() {
            let zeros = vec![0.0f32; shard];
            a.load_shard(&params[own.clone()], &zeros, &zeros)?;
        }
        Ok(Trainer {
            grads: vec![0.0; padded],
            grad_shard: vec![0.0; shard],
            param_shard: vec![0.0; shard],
            m: vec![0.0; shard],
            v: vec![0.0; shard],
            inputs: vec![0; b_local * cfg.seq],
            targets: vec![0; b_local * cfg.seq],
            own,
            segments,
            params,
            gpt,
            accel,
            sampler,
            data,
            model,
            comm,
            cfg,
            step: 0,
            optimizer_steps: 0,
            samples: 0,
            restarts: 0,
            history: std::collections::VecDeque::new(),
            stage: None,
        })
    }

    /// Ends the trainer, handing back its communicator (the next stage of a run uses it).
    pub fn into_comm(self) -> Box<dyn Communicator> {
        self.comm
    }

    /// Number of model parameters.
    pub fn num_params(&self) -> usize {
        self.gpt.layout.total
    }

    /// The data source's description.
    pub fn data_description(&self) -> &str {
        &self.data.description
    }

    /// This rank's communicator.
    pub fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    fn local_batch(&self) -> usize {
        self.cfg.batch / self.comm.world_size()
    }

    /// Fills inputs/targets with this rank's share of micro-batch `micro` of this step.
    fn load_micro_batch(&mut self, micro: u64) -> Result<()> {
        let (b, t) = (self.local_batch(), self.cfg.seq);
        let first = self.samples + micro * self.cfg.batch as u64 + (self.comm.rank() * b) as u64;
        for i in 0..b {
            let w = self.sampler.window(first + i as u64);
            let (inp, tgt) = (
                &mut self.inputs[i * t..(i + 1) * t],
                &mut self.targets[i * t..(i + 1) * t],
            );
            self.data.train.read_window(w, inp, tgt)?;
        }
        Ok(())
    }

    /// One optimizer step: accumulate gradients over micro-batches, reduce-scatter, clip by the
    /// global norm, AdamW on the owned slice, all-gather parameters.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let acc = self.accumulate()?;
        self.update(acc)
    }

    /// The first half of a step: forward and backward over the step's micro-batches, leaving
    /// this rank's summed gradients in `grads`. Between it and [`Trainer::update`] the
    /// parameters and the optimizer state are those of the last step (a checkpoint snapshot
    /// that overlapped the forward and backward is taken there).
    pub fn accumulate(&mut self) -> Result<Accumulated> {
        let started = Instant::now();
        let (b, t, accum) = (self.local_batch(), self.cfg.seq, self.cfg.accum as u64);
        let dloss = 1.0 / (self.cfg.batch * t * self.cfg.accum) as f32;
        let loss_sum = match self.accel.take() {
            Some(mut accel) => {
                let r = self.accumulate_on(&mut accel, dloss);
                self.accel = Some(accel);
                r?
            }
            None => {
                self.grads.fill(0.0);
                let mut loss_sum = 0.0f64;
                for k in 0..accum {
                    self.load_micro_batch(k)?;
                    loss_sum += self.gpt.forward_backward(
                        &self.params,
                        &mut self.grads,
                        &self.inputs,
                        &self.targets,
                        b,
                        t,
                        dloss,
                    );
                }
                loss_sum
            }
        };
        Ok(Accumulated { started, loss_sum })
    }

    /// The second half of a step: reduce-scatter, clip by the global norm, AdamW on the owned
    /// slice (on the device that holds it), all-gather parameters.
    pub fn update(&mut self, acc: Accumulated) -> Result<StepReport> {
        let Accumulated { started, loss_sum } = acc;
        let (t, accum) = (self.cfg.seq, self.cfg.accum as u64);
        self.comm
            .reduce_scatter_sum_f32(&self.grads, &mut self.grad_shard)?;
        let mut sums = [cpu::global_norm_squared(&self.grad_shard), loss_sum];
        self.comm.all_reduce_sum_f64(&mut sums)?;
        let norm = sums[0].sqrt() as f32;
        let loss = (sums[1] / (self.cfg.batch * t * self.cfg.accum) as f64) as f32;
        if !norm.is_finite() || !loss.is_finite() {
            return Err(TrainError::Diverged {
                step: self.step + 1,
                detail: format!("loss {loss}, gradient norm {norm}; lower --lr or check the data"),
            });
        }
        if self.cfg.grad_clip > 0.0 && norm > self.cfg.grad_clip {
            cpu::scale(&mut self.grad_shard, self.cfg.grad_clip / norm);
        }
        let lr = learning_rate(&self.cfg, self.step);
        match self.accel.as_mut() {
            Some(accel) => accel.update(
                &self.cfg,
                &self.segments,
                self.own.start,
                &self.grad_shard,
                lr,
                self.optimizer_steps,
                &mut self.param_shard,
            )?,
            None => {
                self.param_shard
                    .copy_from_slice(&self.params[self.own.clone()]);
                adamw_step(
                    &self.cfg,
                    &self.segments,
                    self.own.start,
                    &mut self.param_shard,
                    &self.grad_shard,
                    &mut self.m,
                    &mut self.v,
                    lr,
                    self.optimizer_steps,
                );
            }
        }
        self.comm
            .all_gather_f32(&self.param_shard, &mut self.params)?;
        self.step += 1;
        self.optimizer_steps += 1;
        self.samples += accum * self.cfg.batch as u64;
        let secs = started.elapsed().as_secs_f64();
        Ok(StepReport {
            step: self.step,
            loss,
            lr,
            grad_norm: norm,
            ms: secs * 1e3,
            tokens_per_s: (self.cfg.batch * t * self.cfg.accum) as f64 / secs,
            val_loss: None,
            ckpt_stall_ms: None,
        })
    }

    /// The step's micro-batches on an accelerator: the parameters go up once, the summed
    /// gradients come back once into `grads`. Returns the sum of the per-token losses.
    fn accumulate_on(&mut self, accel: &mut Accel, dloss: f32) -> Result<f64> {
        let (b, t) = (self.local_batch(), self.cfg.seq);
        accel.begin(&self.params)?;
        let mut loss_sum = 0.0f64;
        for k in 0..self.cfg.accum as u64 {
            self.load_micro_batch(k)?;
            loss_sum += accel.forward_backward(&self.inputs, &self.targets, b, t, dloss)?;
        }
        accel.finish(&mut self.grads)?;
        Ok(loss_sum)
    }

    /// The device forward and backward run on.
    pub fn device_description(&self) -> String {
        self.accel
            .as_ref()
            .map_or_else(|| "CPU".to_string(), Accel::describe)
    }

    /// Whether forward and backward run on a GPU.
    pub fn on_gpu(&self) -> bool {
        self.accel.is_some()
    }

    /// Mean validation loss over `val_batches` fixed micro-batches.
    pub fn validate(&mut self) -> Result<f32> {
        let (b, t) = (self.local_batch(), self.cfg.seq);
        let mut sum = 0.0f64;
        if let Some(accel) = self.accel.as_mut() {
            accel.begin(&self.params)?;
        }
        let split: &Split = &self.data.val;
        for k in 0..self.cfg.val_batches {
            for i in 0..b {
                let j = k * self.cfg.batch + self.comm.rank() * b + i;
                let (inp, tgt) = (
                    &mut self.inputs[i * t..(i + 1) * t],
                    &mut self.targets[i * t..(i + 1) * t],
                );
                split.read_window(j % split.windows, inp, tgt)?;
            }
            sum += match self.accel.as_mut() {
                Some(accel) => accel.loss_sum(&self.inputs, &self.targets, b, t)?,
                None => self
                    .gpt
                    .loss_sum(&self.params, &self.inputs, &self.targets, b, t),
            };
        }
        let mut sums = [sum];
        self.comm.all_reduce_sum_f64(&mut sums)?;
        Ok((sums[0] / (self.cfg.val_batches.max(1) * self.cfg.batch * t) as f64) as f32)
    }

    /// Where the data stream stands.
    pub fn cursor(&self) -> Cursor {
        self.sampler.cursor(self.samples)
    }

    /// This rank's slice of the unpadded flat buffer (may be shorter than the padded slice).
    pub fn own_unpadded(&self) -> Range<usize> {
        let total = self.num_params();
        self.own.start.min(total)..self.own.end.min(total)
    }

    /// Whether a checkpoint snapshot is copied asynchronously (from a GPU), so that it can
    /// overlap the next step's forward and backward.
    pub fn snapshot_is_async(&self) -> bool {
        self.accel.is_some()
    }

    /// Starts the snapshot of this rank's slice as of the last completed step. On a GPU this
    /// queues the device-to-host copy and returns at once; on the CPU there is nothing to start.
    pub fn begin_snapshot(&mut self) -> Result<()> {
        match self.accel.as_mut() {
            Some(a) => a.begin_snapshot(),
            None => Ok(()),
        }
    }

    /// The parameters, m and v of this rank's slice for the checkpoint writer: on a GPU those
    /// of the snapshot started by [`Trainer::begin_snapshot`] (waiting for its copy), on the
    /// CPU the live state.
    pub fn snapshot(&mut self) -> Result<(&[f32], &[f32], &[f32])> {
        let r = self.own_unpadded();
        let n = r.len();
        match self.accel.as_mut() {
            Some(a) => a.snapshot(),
            None => Ok((&self.params[r], &self.m[..n], &self.v[..n])),
        }
    }

    /// Mutable views of this rank's parameter slice, m and v (for restore).
    pub fn own_state_mut(&mut self) -> (&mut [f32], &mut [f32], &mut [f32]) {
        let r = self.own_unpadded();
        let n = r.len();
        (&mut self.params[r], &mut self.m[..n], &mut self.v[..n])
    }

    /// Re-assembles the full parameter buffer from every rank's restored slice, and puts the
    /// restored slice with its moments on the device that holds the optimizer shard.
    pub fn gather_params(&mut self) -> Result<()> {
        self.param_shard
            .copy_from_slice(&self.params[self.own.clone()]);
        self.comm
            .all_gather_f32(&self.param_shard, &mut self.params)?;
        if let Some(a) = self.accel.as_mut() {
            a.load_shard(&self.param_shard, &self.m, &self.v)?;
        }
        Ok(())
    }

    /// Remembers a logged step for the checkpointed history.
    pub fn remember(&mut self, r: &StepReport) {
        self.history.push_back(r.clone());
        while self.history.len() > crate::state::METRICS_HISTORY_MAX {
            self.history.pop_front();
        }
    }

    /// The layout hash of the model.
    pub fn layout_hash(&self) -> String {
        self.gpt.layout.hash()
    }

    /// SHA-256 of the (unpadded) flat parameters.
    pub fn params_sha256(&self) -> String {
        sha256_f32(&self.params[..self.num_params()])
    }
}

/// Appends one JSON line to a metrics file.
pub fn append_jsonl<T: Serialize>(path: &Path, record: &T) -> Result<()> {
    let mut line = serde_json::to_string(record).expect("record serialises");
    line.push('\n');
    let io = |e| TrainError::io("appending to", path, e);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    f.write_all(line.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazarus_comm::SingleRank;

    fn tiny(dir: &Path) -> Trainer {
        crate::corpus::synth(dir, 1, 50_000).unwrap();
        let cfg = TrainConfig {
            model: "d2".into(),
            channels: Some(16),
            heads: Some(2),
            seq: 8,
            batch: 2,
            accum: 2,
            steps: 5,
            data: dir.to_path_buf(),
            ..Default::default()
        };
        Trainer::new(cfg, Box::new(SingleRank::new())).unwrap()
    }

    #[test]
    fn each_step_reads_the_next_samples() {
        let tmp = tempfile::tempdir().unwrap();
        let mut tr = tiny(tmp.path());
        tr.load_micro_batch(0).unwrap();
        let first = tr.inputs.clone();
        tr.load_micro_batch(1).unwrap();
        assert_ne!(first, tr.inputs, "micro-batches of one step differ");
        tr.train_step().unwrap();
        assert_eq!(tr.samples, 4, "a step consumes batch x accum samples");
        tr.load_micro_batch(0).unwrap();
        assert_ne!(first, tr.inputs, "the next step reads new samples");
        assert_eq!(tr.cursor().position, 4);
    }

    #[test]
    fn a_step_changes_the_parameters_and_reports_finite_numbers() {
        let tmp = tempfile::tempdir().unwrap();
        let mut tr = tiny(tmp.path());
        let before = tr.params_sha256();
        let r = tr.train_step().unwrap();
        assert_ne!(before, tr.params_sha256());
        assert!(r.loss.is_finite() && r.grad_norm > 0.0 && r.lr > 0.0);
        // Untrained, the loss is near ln(256).
        assert!((r.loss - 256f32.ln()).abs() < 0.5, "{}", r.loss);
    }
}
