//! Where a trainer's forward and backward passes run when not on the CPU reference: an
//! accelerator that takes the parameters once per step, accumulates gradients over the
//! micro-batches and hands them back, and that holds the rank's optimizer shard: AdamW runs
//! there, and a checkpoint's snapshot is copied from there. Without the `cuda` feature there is
//! none, and asking for one is `KernelError::NotCompiledWithCuda`.

use crate::config::{ComputeDevice, ModelConfig, Precision, TrainConfig};
use crate::Result;
use std::ops::Range;

/// An accelerator's model and optimizer state. The enum has no variant in a build without
/// `cuda`.
pub enum Accel {
    /// One NVIDIA GPU.
    #[cfg(feature = "cuda")]
    Cuda(Box<CudaDevice>),
}

/// The model and the optimizer shard on one GPU.
#[cfg(feature = "cuda")]
pub struct CudaDevice {
    model: Box<dyn crate::cuda_model::DeviceModel>,
    shard: crate::cuda_shard::CudaShard,
}

/// The size of a rank's optimizer shard: `len` values of the padded flat buffer, the first
/// `saved_len` of which are model parameters (the rest is padding, never checkpointed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardShape {
    pub len: usize,
    pub saved_len: usize,
}

/// Environment variables that give a process's rank on its node, in the order they are read:
/// `lazarus launch`, SLURM, then Open MPI's `mpirun`.
pub const LOCAL_RANK_VARS: [&str; 3] = [
    "LAZARUS_LOCAL_RANK",
    "SLURM_LOCALID",
    "OMPI_COMM_WORLD_LOCAL_RANK",
];

/// The GPU a rank uses: its rank on the node from the environment, else `rank` itself (ranks
/// as threads of one process, or a single process).
pub fn device_ordinal(rank: usize, get: impl Fn(&str) -> Option<String>) -> Result<usize> {
    for var in LOCAL_RANK_VARS {
        if let Some(v) = get(var) {
            return v.trim().parse().map_err(|_| {
                crate::TrainError::Config(format!(
                    "{var}={v:?} is not a local rank (a non-negative integer)"
                ))
            });
        }
    }
    Ok(rank)
}

// Without `cuda` the enum is empty: the methods' matches have no arms and their arguments go
// unused.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
impl Accel {
    /// Opens the device `cfg` asks for, in its precision, sized for micro-batches of `b` x
    /// `cfg.seq` and an optimizer shard of `shard`: `None` for the CPU, whose model is the
    /// trainer's own.
    pub fn open(
        cfg: &TrainConfig,
        rank: usize,
        model: ModelConfig,
        b: usize,
        shard: ShardShape,
    ) -> Result<Option<Accel>> {
        match cfg.device {
            ComputeDevice::Cpu => Ok(None),
            ComputeDevice::Cuda => {
                open_cuda(rank, model, (b, cfg.seq), cfg.precision, shard).map(Some)
            }
        }
    }

    /// The device, for logs.
    pub fn describe(&self) -> String {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref d) => format!("CUDA ({})", d.model.describe()),
        }
    }

    /// Starts an optimizer step (or a validation pass): uploads the parameters and zeroes the
    /// gradients.
    pub fn begin(&mut self, params: &[f32]) -> Result<()> {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref mut d) => {
                d.model.load_params(params)?;
                d.model.zero_grads()
            }
        }
    }

    /// One micro-batch: forward, fused loss and backward into the device's gradients. Returns
    /// the sum of the per-token losses.
    pub fn forward_backward(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        dloss: f32,
    ) -> Result<f64> {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref mut d) => d.model.forward_backward(inputs, targets, b, t, dloss),
        }
    }

    /// Forward and loss only (validation): the sum of the per-token losses.
    pub fn loss_sum(&mut self, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> Result<f64> {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref mut d) => d.model.loss_sum(inputs, targets, b, t),
        }
    }

    /// Ends the step's micro-batches: copies the accumulated gradients into `grads`.
    pub fn finish(&mut self, grads: &mut [f32]) -> Result<()> {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref mut d) => d.model.read_grads(grads),
        }
    }

    /// Replaces the optimizer shard on the device with host values (each of the shard's
    /// length): the initial parameters with zeroed moments, or a restored checkpoint.
    pub fn load_shard(&mut self, params: &[f32], m: &[f32], v: &[f32]) -> Result<()> {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref mut d) => d.shard.load(d.model.gpu(), params, m, v),
        }
    }

    /// AdamW on the device's shard with the reduced gradient slice `grads`; the updated
    /// parameter slice comes back in `params_out`. Arguments as in `optim::adamw_step`.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        cfg: &TrainConfig,
        segments: &[(Range<usize>, bool)],
        own_start: usize,
        grads: &[f32],
        lr: f32,
        step: u64,
        params_out: &mut [f32],
    ) -> Result<()> {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref mut d) => d.shard.update(
                d.model.gpu(),
                cfg,
                segments,
                own_start,
                grads,
                lr,
                step,
                params_out,
            ),
        }
    }

    /// Starts copying the shard's state (as of the last update) to the host; returns at once.
    pub fn begin_snapshot(&mut self) -> Result<()> {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref mut d) => d.shard.begin_snapshot(d.model.gpu()),
        }
    }

    /// Waits for the copy started by `begin_snapshot` and returns the parameters, m and v of
    /// the rank's saved slice.
    pub fn snapshot(&mut self) -> Result<(&[f32], &[f32], &[f32])> {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref mut d) => d.shard.snapshot(),
        }
    }
}

/// A GPU's memory as the dry run sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMemory {
    pub name: String,
    /// Free bytes after opening the device (its context, kernels and cuBLASLt already taken).
    pub free: u64,
    pub total: u64,
}

/// Opens GPU `ordinal` as a run would (driver, NVRTC, kernels, cuBLASLt) and reads its memory.
#[cfg(feature = "cuda")]
pub fn cuda_memory(ordinal: usize) -> Result<DeviceMemory> {
    let gpu = lazarus_kernels::cuda::Gpu::open(ordinal)?;
    let (free, total) = gpu.memory()?;
    Ok(DeviceMemory {
        name: gpu.info().name.clone(),
        free,
        total,
    })
}

/// Without the `cuda` feature there is no GPU to read: the error says to rebuild.
#[cfg(not(feature = "cuda"))]
pub fn cuda_memory(_ordinal: usize) -> Result<DeviceMemory> {
    Err(lazarus_kernels::KernelError::NotCompiledWithCuda.into())
}

#[cfg(feature = "cuda")]
fn open_cuda(
    rank: usize,
    model: ModelConfig,
    (b, t): (usize, usize),
    precision: Precision,
    shard: ShardShape,
) -> Result<Accel> {
    use crate::cuda_model::{CudaGpt, DeviceModel};
    use lazarus_kernels::cuda::bf16;
    let ordinal = device_ordinal(rank, |k| std::env::var(k).ok())?;
    let gpu = lazarus_kernels::cuda::Gpu::open(ordinal)?;
    // The snapshot's side stream would put the context in cudarc's multi-stream mode, where
    // every buffer argument of every kernel records and waits on events. The model's work is
    // all on one stream, and the shard orders its side stream with its own events.
    // SAFETY: the buffers allocated from here on are used on the compute stream only, except
    // the shard's, whose copies on the side stream are ordered by `CudaShard`'s events (after
    // the update they save, before the next update, the next load and the free).
    unsafe { gpu.context().disable_event_tracking() };
    let shard = crate::cuda_shard::CudaShard::new(&gpu, shard.len, shard.saved_len)?;
    let model: Box<dyn DeviceModel> = match precision {
        Precision::F32 => Box::new(CudaGpt::<f32>::new(gpu, model, b, t)?),
        Precision::Bf16 => Box::new(CudaGpt::<bf16>::new(gpu, model, b, t)?),
    };
    Ok(Accel::Cuda(Box::new(CudaDevice { model, shard })))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(
    _rank: usize,
    _model: ModelConfig,
    _bt: (usize, usize),
    _precision: Precision,
    _shard: ShardShape,
) -> Result<Accel> {
    Err(lazarus_kernels::KernelError::NotCompiledWithCuda.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_rank_comes_from_the_first_variable_set() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(device_ordinal(5, env(&[])).unwrap(), 5);
        assert_eq!(
            device_ordinal(
                5,
                env(&[("SLURM_LOCALID", "1"), ("OMPI_COMM_WORLD_LOCAL_RANK", "3")])
            )
            .unwrap(),
            1
        );
        assert_eq!(
            device_ordinal(
                5,
                env(&[("LAZARUS_LOCAL_RANK", "2"), ("SLURM_LOCALID", "1")])
            )
            .unwrap(),
            2
        );
        let e = device_ordinal(0, env(&[("SLURM_LOCALID", "x")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SLURM_LOCALID") && e.contains("local rank"),
            "{e}"
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_build_without_it_is_a_clear_error() {
        let m = ModelConfig {
            layers: 1,
            heads: 1,
            channels: 4,
            vocab: 8,
            padded_vocab: 8,
            block_size: 4,
        };
        let shard = ShardShape {
            len: 8,
            saved_len: 8,
        };
        let cuda = TrainConfig {
            device: ComputeDevice::Cuda,
            seq: 4,
            ..TrainConfig::default()
        };
        let e = Accel::open(&cuda, 0, m, 1, shard)
            .err()
            .expect("no CUDA in this build")
            .to_string();
        assert!(e.contains("--features cuda"), "{e}");
        let cpu = TrainConfig {
            seq: 4,
            ..TrainConfig::default()
        };
        assert!(Accel::open(&cpu, 0, m, 1, shard).unwrap().is_none());
    }
}
