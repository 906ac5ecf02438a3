//! Compute backends for Lazarus. `cpu` is the f32 reference (rayon); CUDA sits behind the
//! `cuda` feature.

pub mod cpu;

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
}

/// Checks that `device` can be used by this build.
pub fn check_device(device: Device) -> Result<(), KernelError> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda { .. } if cfg!(feature = "cuda") => Ok(()),
        Device::Cuda { .. } => Err(KernelError::NotCompiledWithCuda),
    }
}
