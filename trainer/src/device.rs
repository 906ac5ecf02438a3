//! Where a trainer's forward and backward passes run when not on the CPU reference: an
//! accelerator that takes the parameters once per step, accumulates gradients over the
//! micro-batches and hands them back. Without the `cuda` feature there is none, and asking for
//! one is `KernelError::NotCompiledWithCuda`.

use crate::config::{ComputeDevice, ModelConfig};
use crate::Result;

/// An accelerator's model state. The enum has no variant in a build without `cuda`.
pub enum Accel {
    /// One NVIDIA GPU.
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda_model::CudaGpt>),
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
    /// Opens the device a run asked for, sized for micro-batches of `b` x `t`: `None` for the
    /// CPU, whose model is the trainer's own.
    pub fn open(
        device: ComputeDevice,
        rank: usize,
        model: ModelConfig,
        b: usize,
        t: usize,
    ) -> Result<Option<Accel>> {
        match device {
            ComputeDevice::Cpu => Ok(None),
            ComputeDevice::Cuda => open_cuda(rank, model, b, t).map(Some),
        }
    }

    /// The device, for logs.
    pub fn describe(&self) -> String {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref m) => format!("CUDA ({})", m.device_name()),
        }
    }

    /// Starts an optimizer step (or a validation pass): uploads the parameters and zeroes the
    /// gradients.
    pub fn begin(&mut self, params: &[f32]) -> Result<()> {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref mut m) => {
                m.load_params(params)?;
                m.zero_grads()
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
            Accel::Cuda(ref mut m) => m.forward_backward(inputs, targets, b, t, dloss),
        }
    }

    /// Forward and loss only (validation): the sum of the per-token losses.
    pub fn loss_sum(&mut self, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> Result<f64> {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref mut m) => m.loss_sum(inputs, targets, b, t),
        }
    }

    /// Ends the step's micro-batches: copies the accumulated gradients into `grads`.
    pub fn finish(&mut self, grads: &mut [f32]) -> Result<()> {
        match *self {
            #[cfg(feature = "cuda")]
            Accel::Cuda(ref mut m) => m.read_grads(grads),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(rank: usize, model: ModelConfig, b: usize, t: usize) -> Result<Accel> {
    let ordinal = device_ordinal(rank, |k| std::env::var(k).ok())?;
    let gpu = lazarus_kernels::cuda::Gpu::open(ordinal)?;
    let m = crate::cuda_model::CudaGpt::new(gpu, model, b, t)?;
    Ok(Accel::Cuda(Box::new(m)))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_rank: usize, _model: ModelConfig, _b: usize, _t: usize) -> Result<Accel> {
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
        let e = Accel::open(ComputeDevice::Cuda, 0, m, 1, 4)
            .err()
            .expect("no CUDA in this build")
            .to_string();
        assert!(e.contains("--features cuda"), "{e}");
        assert!(Accel::open(ComputeDevice::Cpu, 0, m, 1, 4)
            .unwrap()
            .is_none());
    }
}
