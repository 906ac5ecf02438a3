//! The training loop: data-parallel steps with ZeRO-1 over a `Communicator`, validation,
//! metrics, and the run directory's files.

use crate::config::{ModelConfig, TrainConfig};
use crate::data::{DataSource, Sampler, Split};
use crate::error::{Result, TrainError};
use crate::model::{init_params, Gpt};
use crate::optim::{adamw_step, learning_rate, slice_segments};
use lazarus_comm::Communicator;
use lazarus_kernels::cpu;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
}

/// What the loop tells its caller, for logs and progress bars.
#[derive(Debug, Clone)]
pub enum Event {
    /// Free-form information (data source, model size, ...).
    Info(String),
    /// A completed step; `logged` says whether it is a log step.
    Step {
        report: StepReport,
        logged: bool,
        total: u64,
    },
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
    gpt: Gpt,
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
        let gpt = Gpt::new(model, b_local, cfg.seq, true);
        let total = gpt.layout.total;
        let padded = total.div_ceil(world) * world;
        let shard = padded / world;
        let own = comm.rank() * shard..(comm.rank() + 1) * shard;
        let mut params = vec![0.0f32; padded];
        init_params(&gpt.layout, &model, cfg.seed, &mut params);
        let segments = slice_segments(&gpt.layout, &own);
        let sampler = Sampler::new(cfg.seed, data.train.windows);
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
            sampler,
            data,
            model,
            comm,
            cfg,
            step: 0,
        })
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

    /// Fills inputs/targets with this rank's share of global micro-batch `micro`.
    fn load_micro_batch(&mut self, micro: u64) -> Result<()> {
        let (b, t) = (self.local_batch(), self.cfg.seq);
        let first = micro * self.cfg.batch as u64 + (self.comm.rank() * b) as u64;
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
        let started = Instant::now();
        let (b, t, accum) = (self.local_batch(), self.cfg.seq, self.cfg.accum as u64);
        let dloss = 1.0 / (self.cfg.batch * t * self.cfg.accum) as f32;
        self.grads.fill(0.0);
        let mut loss_sum = 0.0f64;
        for k in 0..accum {
            self.load_micro_batch(self.step * accum + k)?;
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
            self.step,
        );
        self.comm
            .all_gather_f32(&self.param_shard, &mut self.params)?;
        self.step += 1;
        let secs = started.elapsed().as_secs_f64();
        Ok(StepReport {
            step: self.step,
            loss,
            lr,
            grad_norm: norm,
            ms: secs * 1e3,
            tokens_per_s: (self.cfg.batch * t * self.cfg.accum) as f64 / secs,
            val_loss: None,
        })
    }

    /// Mean validation loss over `val_batches` fixed micro-batches.
    pub fn validate(&mut self) -> Result<f32> {
        let (b, t) = (self.local_batch(), self.cfg.seq);
        let mut sum = 0.0f64;
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
            sum += self
                .gpt
                .loss_sum(&self.params, &self.inputs, &self.targets, b, t);
        }
        let mut sums = [sum];
        self.comm.all_reduce_sum_f64(&mut sums)?;
        Ok((sums[0] / (self.cfg.val_batches.max(1) * self.cfg.batch * t) as f64) as f32)
    }

    /// SHA-256 of the (unpadded) flat parameters.
    pub fn params_sha256(&self) -> String {
        sha256_f32(&self.params[..self.num_params()])
    }
}

/// Prepares the run directory: creates it, checks it is writable, writes the resolved config
/// and model shape.
pub fn prepare_run_dir(dir: &Path, cfg: &TrainConfig, model: &ModelConfig) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io("creating run directory", dir, e))?;
    write_atomic(&dir.join(files::CONFIG), cfg.to_toml().as_bytes())?;
    let model_json = serde_json::to_vec_pretty(model).expect("model config serialises");
    write_atomic(&dir.join(files::MODEL), &model_json)
}

/// Runs training to `cfg.steps`, reporting through `on_event`; rank 0 writes the run
/// directory's files. Returns the final metrics.
pub fn run(
    cfg: TrainConfig,
    comm: Box<dyn Communicator>,
    on_event: &mut dyn FnMut(Event),
) -> Result<FinalMetrics> {
    let started = Instant::now();
    let mut tr = Trainer::new(cfg, comm)?;
    let lead = tr.comm().rank() == 0;
    let run_dir: PathBuf = tr.cfg.run_dir.clone();
    if lead {
        prepare_run_dir(&run_dir, &tr.cfg, &tr.model)?;
    }
    on_event(Event::Info(format!("data: {}", tr.data_description())));
    let m = tr.model;
    on_event(Event::Info(format!(
        "model: {} layers, {} heads, {} channels, vocab {} (padded {}), {:.2}M parameters; {} rank(s), global batch {}x{}x{} tokens",
        m.layers, m.heads, m.channels, m.vocab, m.padded_vocab, tr.num_params() as f64 / 1e6,
        tr.comm().world_size(), tr.cfg.batch, tr.cfg.seq, tr.cfg.accum
    )));
    let metrics_path = run_dir.join(files::METRICS);
    let mut last = None;
    let mut last_val = f32::NAN;
    while tr.step < tr.cfg.steps {
        let mut report = tr.train_step()?;
        let at_end = tr.step == tr.cfg.steps;
        let val_due = at_end || (tr.cfg.val_every > 0 && tr.step % tr.cfg.val_every == 0);
        if val_due {
            last_val = tr.validate()?;
            report.val_loss = Some(last_val);
        }
        let logged =
            tr.step == 1 || at_end || tr.step % tr.cfg.log_every == 0 || report.val_loss.is_some();
        if lead && logged {
            append_jsonl(&metrics_path, &report)?;
        }
        last = Some(report.clone());
        on_event(Event::Step {
            report,
            logged,
            total: tr.cfg.steps,
        });
    }
    let last = last.expect("steps is positive");
    let tokens = tr.step * (tr.cfg.batch * tr.cfg.seq * tr.cfg.accum) as u64;
    let elapsed_s = started.elapsed().as_secs_f64();
    let fm = FinalMetrics {
        step: tr.step,
        final_loss: last.loss,
        val_loss: last_val,
        tokens,
        params_sha256: tr.params_sha256(),
        num_params: tr.num_params(),
        elapsed_s,
        tokens_per_s: tokens as f64 / elapsed_s,
    };
    if lead {
        let bytes: Vec<u8> = tr.params[..tr.num_params()]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        write_atomic(&run_dir.join(files::FINAL_PARAMS), &bytes)?;
        let json = serde_json::to_vec_pretty(&fm).expect("metrics serialise");
        write_atomic(&run_dir.join(files::FINAL_METRICS), &json)?;
        write_atomic(
            &run_dir.join(files::COMPLETE),
            format!("step {}\n", tr.step).as_bytes(),
        )?;
    }
    Ok(fm)
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
