//! Compute backends for Lazarus. `cpu` is the f32 reference (rayon); CUDA sits behind the
//! `cuda` feature.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// Where a model's compute runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The rayon reference backend.
    Cpu,
    /// An NVIDIA GPU through cudarc (feature `cuda`).
    Cuda { ordinal: usize },
}

/// Errors of the compute backends.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// CUDA was asked for in a build without the `cuda` feature.
    #[error(
        "this build of Lazarus has no CUDA support: rebuild with `cargo build --release --features \
         cuda`, or use --device cpu"
    )]
    NotCompiledWithCuda,
    /// CUDA was asked for but the driver or the device cannot be used.
    #[error("CUDA is not usable here: {0}; use --device cpu")]
    CudaUnavailable(String),
    /// A CUDA driver, cuBLASLt or NVRTC call failed while running (an out-of-memory device, a
    /// kernel fault, a lost GPU); the message names the call.
    #[error("a CUDA call failed: {0}")]
    Cuda(String),
    /// NVRTC rejected the kernel sources for an architecture; `log` is NVRTC's log.
    #[error(
        "compiling the CUDA kernels for {arch} failed (a bug in kernels/cuda/*.cu, or an NVRTC \
         too old for this GPU: use the NVRTC of CUDA 13 or later):\n{log}"
    )]
    Compile {
        /// The architecture compiled for, e.g. `sm_90`.
        arch: String,
        /// NVRTC's log: the file, line and message of each error.
        log: String,
    },
}

/// Checks that `device` can be used by this build on this machine (for CUDA: the driver loads
/// and the device exists).
pub fn check_device(device: Device) -> Result<(), KernelError> {
    match device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda { ordinal } => cuda::probe(ordinal).map(|_| ()),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda { .. } => Err(KernelError::NotCompiledWithCuda),
    }
}
