//! Estimates for `lazarus train --dry-run`: the memory one rank needs (parameters, gradients,
//! AdamW state, ZeRO slices, activations at the chosen batch, checkpoint staging), the size of a
//! checkpoint, and the largest batch that fits a budget. Each term mirrors an allocation of
//! `Trainer::new`, `Gpt::new` or the checkpoint writer, so the total can be held against the
//! peak resident memory of a real run.

use crate::config::{ComputeDevice, ModelConfig, TrainConfig};
use crate::layout::Layout;
use crate::model::Gpt;

/// Resident memory of the process before any buffer: code, libraries, allocator, thread stacks
/// (measured: `lazarus train` on d2, d6 and d12 peaks 4 to 8 MiB above its buffers).
pub const RUNTIME_BYTES: u64 = 8 << 20;

/// Bound on the bytes of one shard's safetensors header (JSON: names, shapes, offsets and
/// checksums of three tensors).
pub const SHARD_HEADER_BYTES_MAX: u64 = 8 << 10;

/// The memory one rank needs, in bytes, term by term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The full flat parameters (every rank holds them for forward and backward).
    pub params: u64,
    /// The full flat gradients.
    pub grads: u64,
    /// AdamW's m and v for the rank's ZeRO-1 slice.
    pub optimizer: u64,
    /// The slice's reduced gradients and updated parameters.
    pub zero_slices: u64,
    /// Activations and backward scratch for the local micro-batch, plus its token buffers.
    pub activations: u64,
    /// The checkpoint staging buffer (the slice's parameters, m and v), touched at start-up.
    pub staging: u64,
    /// The shard file mapped while a save writes it: file-backed and reclaimable, but resident
    /// (and counted in RSS) until the save is done.
    pub ckpt_write_map: u64,
    /// Pinned host memory the GPU's snapshot is copied into (the slice's parameters, m and v);
    /// zero on the CPU.
    pub pinned_snapshot: u64,
    /// The data loader's shuffled window order.
    pub data_index: u64,
    /// Code, libraries and allocator.
    pub runtime: u64,
}

impl MemoryEstimate {
    /// The estimate for one of `world` ranks training `cfg` on `model`, with `train_windows`
    /// training windows in the data.
    pub fn per_rank(
        cfg: &TrainConfig,
        model: &ModelConfig,
        world: usize,
        train_windows: usize,
    ) -> Self {
        let n = Layout::gpt2(model).total as u64;
        let padded = n.div_ceil(world as u64) * world as u64;
        let shard = padded / world as u64;
        let b = (cfg.batch / world).max(1);
        let f32s = |x: u64| x * 4;
        let gpu = cfg.device == ComputeDevice::Cuda;
        // On a GPU the host model only lends its layout: no host activations.
        let acts = if gpu {
            Gpt::buffer_floats(model, 0, cfg.seq, false) as u64
        } else {
            Gpt::buffer_floats(model, b, cfg.seq, true) as u64
        };
        let tokens = 2 * (b * cfg.seq) as u64;
        let own = shard.min(n);
        MemoryEstimate {
            params: f32s(padded),
            grads: f32s(padded),
            optimizer: f32s(2 * shard),
            zero_slices: f32s(2 * shard),
            activations: f32s(acts + tokens),
            staging: f32s(3 * own),
            ckpt_write_map: f32s(3 * own) + SHARD_HEADER_BYTES_MAX,
            pinned_snapshot: if gpu { f32s(3 * own) } else { 0 },
            data_index: 4 * train_windows as u64,
            runtime: RUNTIME_BYTES,
        }
    }

    /// Named terms, in the order they are printed.
    pub fn terms(&self) -> [(&'static str, u64); 10] {
        [
            ("parameters", self.params),
            ("gradients", self.grads),
            ("optimizer state (AdamW m, v)", self.optimizer),
            ("ZeRO-1 slices", self.zero_slices),
            ("activations", self.activations),
            ("checkpoint staging", self.staging),
            ("checkpoint write map", self.ckpt_write_map),
            ("pinned snapshot", self.pinned_snapshot),
            ("data index", self.data_index),
            ("runtime", self.runtime),
        ]
    }

    /// Everything a rank keeps resident at its peak (during a save).
    pub fn total(&self) -> u64 {
        self.terms().iter().map(|t| t.1).sum()
    }

    /// The part that grows with the local micro-batch.
    fn per_sample(cfg: &TrainConfig, model: &ModelConfig) -> u64 {
        let one = TrainConfig {
            batch: 1,
            ..cfg.clone()
        };
        Self::per_rank(&one, model, 1, 0).activations
    }
}

/// Bytes the CUDA model allocates for micro-batches of `b` x `t` besides its parameters,
/// gradients and their staging: each block's saved activations, the backward scratch, the
/// final layernorm and the logits in the model's precision (`elt` bytes a value), and the
/// LayerNorm statistics, the losses and the tokens at 4 bytes (`CudaGpt::new`).
pub fn cuda_activation_bytes(m: &ModelConfig, b: usize, t: usize, elt: usize) -> usize {
    let (bt, c) = (b * t, m.channels);
    let att = b * m.heads * t * t;
    let narrow =
        m.layers * (18 * bt * c + att) + 14 * bt * c + 3 * att + 2 * bt * c + bt * m.padded_vocab;
    let wide = m.layers * 4 * bt + 5 * bt;
    elt * narrow + 4 * wide
}

/// The GPU memory one rank needs with `device = "cuda"`, in bytes, term by term. The CUDA
/// context, the kernels, cuBLASLt's handle and workspace are not in it: they are already taken
/// from the free memory it is held against, read after opening the device. NCCL's own
/// buffers (per peer and channel) are not in it either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceEstimate {
    /// The full parameters the forward pass reads, in the run's precision.
    pub params: u64,
    /// The full gradients of the backward pass, in the run's precision.
    pub grads: u64,
    /// The f32 values the parameters and gradients pass through in bf16 (none in f32).
    pub staging: u64,
    /// The rank's ZeRO-1 slice: master parameters, reduced gradients, AdamW m and v.
    pub optimizer_shard: u64,
    /// Activations, backward scratch, tokens and logits of the local micro-batch.
    pub activations: u64,
    /// `--comm nccl`: the device buffer the host collectives pass through, as large as the
    /// padded gradients in f32.
    pub nccl_staging: u64,
}

impl DeviceEstimate {
    /// The estimate for one of `world` ranks, each on its own GPU, talking over NCCL when
    /// `nccl`.
    pub fn per_rank(cfg: &TrainConfig, model: &ModelConfig, world: usize, nccl: bool) -> Self {
        let n = Layout::gpt2(model).total as u64;
        let shard = n.div_ceil(world as u64);
        let b = (cfg.batch / world).max(1);
        let elt = cfg.precision.bytes();
        DeviceEstimate {
            params: elt as u64 * n,
            grads: elt as u64 * n,
            staging: if elt == 4 { 0 } else { 4 * n },
            optimizer_shard: 4 * 4 * shard,
            activations: cuda_activation_bytes(model, b, cfg.seq, elt) as u64,
            nccl_staging: if nccl { 4 * shard * world as u64 } else { 0 },
        }
    }

    /// Named terms, in the order they are printed.
    pub fn terms(&self) -> [(&'static str, u64); 6] {
        [
            ("parameters", self.params),
            ("gradients", self.grads),
            ("f32 staging", self.staging),
            ("optimizer shard (p, g, m, v)", self.optimizer_shard),
            ("activations", self.activations),
            ("NCCL staging", self.nccl_staging),
        ]
    }

    /// Everything a rank allocates on its GPU (all of it at start-up).
    pub fn total(&self) -> u64 {
        self.terms().iter().map(|t| t.1).sum()
    }

    /// The largest global micro-batch (a multiple of `world`) whose per-rank need fits in
    /// `free` bytes of each GPU; `None` if not even one sequence per rank fits.
    pub fn max_batch_fitting(
        cfg: &TrainConfig,
        model: &ModelConfig,
        world: usize,
        nccl: bool,
        free: u64,
    ) -> Option<usize> {
        let at = |b: usize| {
            let c = TrainConfig {
                batch: b * world,
                ..cfg.clone()
            };
            Self::per_rank(&c, model, world, nccl).total()
        };
        let per_sample = at(2) - at(1);
        let samples = (free.checked_sub(at(1))? / per_sample.max(1)) + 1;
        Some(samples as usize * world)
    }
}

/// Bytes of one committed checkpoint of `model` written by `world` ranks: every rank's shard
/// (its slices of parameters, m and v, and a header) plus `COMMITTED`.
pub fn checkpoint_bytes(model: &ModelConfig, world: usize) -> u64 {
    let n = Layout::gpt2(model).total as u64;
    3 * 4 * n + world as u64 * (SHARD_HEADER_BYTES_MAX + 1024)
}

/// The largest global micro-batch (a multiple of `world`) for which `ranks_here` ranks of this
/// process fit in `budget` bytes; `None` if not even one sample per rank fits.
pub fn max_batch_fitting(
    cfg: &TrainConfig,
    model: &ModelConfig,
    world: usize,
    ranks_here: usize,
    train_windows: usize,
    budget: u64,
) -> Option<usize> {
    let one = TrainConfig {
        batch: world,
        ..cfg.clone()
    };
    let base = MemoryEstimate::per_rank(&one, model, world, train_windows);
    let per_sample = MemoryEstimate::per_sample(cfg, model);
    let fixed = base.total() - base.activations;
    let per_rank_budget = budget / ranks_here.max(1) as u64;
    let samples = per_rank_budget.checked_sub(fixed)? / per_sample.max(1);
    (samples >= 1).then(|| samples as usize * world)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(cfg: &TrainConfig) -> ModelConfig {
        cfg.model_config(256).unwrap()
    }

    #[test]
    fn activation_count_is_what_the_model_allocates() {
        for (b, t, training) in [(1, 8, true), (3, 16, true), (2, 32, false)] {
            let cfg = TrainConfig {
                model: "d2".into(),
                seq: t,
                ..Default::default()
            };
            let m = model(&cfg);
            let gpt = Gpt::new(m, b, t, training);
            assert_eq!(
                Gpt::buffer_floats(&m, b, t, training),
                gpt.allocated_floats()
            );
        }
    }

    #[test]
    fn a_gpu_run_keeps_activations_on_the_device_and_pins_its_snapshot() {
        let cpu = TrainConfig {
            model: "d12".into(),
            seq: 64,
            batch: 8,
            ..Default::default()
        };
        let gpu = TrainConfig {
            device: ComputeDevice::Cuda,
            ..cpu.clone()
        };
        let m = model(&cpu);
        let (h_cpu, h_gpu) = (
            MemoryEstimate::per_rank(&cpu, &m, 2, 100),
            MemoryEstimate::per_rank(&gpu, &m, 2, 100),
        );
        assert_eq!(h_cpu.pinned_snapshot, 0);
        assert_eq!(h_gpu.pinned_snapshot, h_gpu.staging);
        assert!(h_gpu.activations * 100 < h_cpu.activations);
        let d = DeviceEstimate::per_rank(&gpu, &m, 2, false);
        let n = m.num_params() as u64;
        let with_nccl = DeviceEstimate::per_rank(&gpu, &m, 2, true);
        assert_eq!(with_nccl.nccl_staging, 4 * n.div_ceil(2) * 2);
        assert_eq!(with_nccl.total() - d.total(), with_nccl.nccl_staging);
        assert_eq!((d.params, d.grads), (4 * n, 4 * n));
        assert_eq!(d.optimizer_shard, 16 * n.div_ceil(2));
        assert_eq!(
            d.activations,
            cuda_activation_bytes(&m, 4, 64, 4) as u64,
            "4 sequences per rank"
        );
        assert_eq!(d.staging, 0);
        let half = DeviceEstimate::per_rank(
            &TrainConfig {
                precision: crate::config::Precision::Bf16,
                ..gpu.clone()
            },
            &m,
            2,
            false,
        );
        assert_eq!((half.params, half.staging), (2 * n, 4 * n));
        assert_eq!(
            half.optimizer_shard, d.optimizer_shard,
            "master state stays f32"
        );
        assert!(half.activations < d.activations && 2 * half.activations > d.activations);
        // The largest batch that fits is exactly at the boundary.
        let at = |b: usize| {
            let c = TrainConfig {
                batch: b,
                ..gpu.clone()
            };
            DeviceEstimate::per_rank(&c, &m, 2, false).total()
        };
        let free = at(10) + 5;
        assert_eq!(
            DeviceEstimate::max_batch_fitting(&gpu, &m, 2, false, free),
            Some(10)
        );
        assert_eq!(
            DeviceEstimate::max_batch_fitting(&gpu, &m, 2, false, at(2) - 1),
            None
        );
    }

    #[test]
    fn terms_follow_the_zero_split_and_the_batch() {
        let cfg = TrainConfig {
            model: "d12".into(),
            seq: 64,
            batch: 4,
            ..Default::default()
        };
        let m = model(&cfg);
        let n = m.num_params() as u64;
        let one = MemoryEstimate::per_rank(&cfg, &m, 1, 100);
        assert_eq!(
            (one.params, one.grads, one.optimizer),
            (4 * n, 4 * n, 8 * n)
        );
        assert_eq!(one.staging, 12 * n);
        let four = MemoryEstimate::per_rank(&cfg, &m, 4, 100);
        assert_eq!(four.params, one.params.div_ceil(16) * 16);
        assert!(four.optimizer * 4 >= one.optimizer && four.optimizer * 4 < one.optimizer + 64);
        assert!(four.activations * 4 <= one.activations + 4096);
        // The batch that fits is the largest whose total is within the budget.
        let budget = one.total() + 1000;
        let max = max_batch_fitting(&cfg, &m, 1, 1, 100, budget).unwrap();
        assert!(max >= 4);
        let at = |b| {
            let c = TrainConfig {
                batch: b,
                ..cfg.clone()
            };
            MemoryEstimate::per_rank(&c, &m, 1, 100).total()
        };
        assert!(at(max) <= budget && at(max + 1) > budget, "{max}");
        assert_eq!(max_batch_fitting(&cfg, &m, 1, 1, 100, one.params), None);
        let ck = checkpoint_bytes(&m, 2);
        assert!(ck > 12 * n && ck < 12 * n + 32 * 1024);
    }
}
