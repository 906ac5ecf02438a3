//! The CUDA backend (feature `cuda`): finding the driver and the device, compiling the kernel
//! sources of `kernels/cuda/` with NVRTC, and [`Gpu`], whose methods mirror the CPU reference
//! kernels of [`crate::cpu`] op for op (same names, argument order, shapes and accumulation
//! rules) on device views.
//!
//! cudarc opens `libcuda.so.1`, `libnvrtc.so` and `libcublasLt.so` at run time and panics when
//! one is absent, so every entry point checks for the library first and turns its absence into
//! a `KernelError`.
//!
//! Shape legend as in [`crate::cpu`]: `B` batch, `T` sequence, `C` channels, `NH` heads, `V`
//! vocabulary, `Vp` padded vocabulary, `N = B * T` rows, `OC` output channels.

mod blas;
mod compile;
mod float;
mod gpu;
mod ops;
#[cfg(test)]
mod tests;

pub use compile::{
    compile_kernels, default_cache_dir, entry_points, nvrtc_present, nvrtc_version,
    CompiledKernels, CompiledModule, Source, SOURCES,
};
pub use float::GpuFloat;
pub use gpu::Gpu;
/// The bf16 element type of the `bf16` kernels (the `half` crate's, which cudarc copies to and
/// from the device).
pub use half::bf16;
pub use ops::ATTENTION_T_MAX;

use crate::KernelError;
use cudarc::driver::CudaContext;
use std::sync::Arc;

/// A CUDA device this process can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Devices visible to this process.
    pub count: usize,
    /// Compute capability (major, minor): (9, 0) on an H100.
    pub compute_capability: (i32, i32),
}

impl CudaDeviceInfo {
    /// The NVRTC architecture of this device, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!("sm_{major}{minor}")
    }
}

/// Whether the CUDA driver library can be opened.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the cuBLASLt library (`libcublasLt.so`) can be opened.
pub fn cublaslt_present() -> bool {
    // SAFETY: only tries to open the library; no cuBLASLt call is made.
    unsafe { cudarc::cublaslt::sys::is_culib_present() }
}

/// Opens device `ordinal`: the driver library must load, the driver must initialise and the
/// device must exist.
pub fn probe(ordinal: usize) -> Result<CudaDeviceInfo, KernelError> {
    open_context(ordinal).map(|(info, _)| info)
}

/// [`probe`], keeping the context for [`Gpu::open`].
fn open_context(ordinal: usize) -> Result<(CudaDeviceInfo, Arc<CudaContext>), KernelError> {
    if !driver_present() {
        return Err(KernelError::CudaUnavailable(
            "the NVIDIA driver library libcuda.so.1 was not found (no GPU or no driver on this \
             machine)"
                .into(),
        ));
    }
    let count = CudaContext::device_count()
        .map_err(|e| KernelError::CudaUnavailable(format!("the CUDA driver failed: {e:?}")))?;
    let count = usize::try_from(count).unwrap_or(0);
    if ordinal >= count {
        return Err(KernelError::CudaUnavailable(format!(
            "device {ordinal} was asked for but {count} CUDA device(s) are visible \
             (CUDA_VISIBLE_DEVICES={})",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
        )));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| {
        KernelError::CudaUnavailable(format!("opening CUDA device {ordinal}: {e:?}"))
    })?;
    let name = ctx.name().map_err(|e| {
        KernelError::CudaUnavailable(format!("naming CUDA device {ordinal}: {e:?}"))
    })?;
    let compute_capability = ctx.compute_capability().map_err(|e| {
        KernelError::CudaUnavailable(format!(
            "reading the compute capability of CUDA device {ordinal}: {e:?}"
        ))
    })?;
    let info = CudaDeviceInfo {
        ordinal,
        name,
        count,
        compute_capability,
    };
    Ok((info, ctx))
}

#[cfg(test)]
mod probe_tests {
    use super::*;

    /// Without a driver the probe is an error that says so; with one, device 0 has a name and
    /// a device past the last is refused. Never a panic either way.
    #[test]
    fn probe_reports_the_machine_without_panicking() {
        if !driver_present() {
            let e = probe(0).unwrap_err().to_string();
            assert!(e.contains("libcuda.so.1"), "{e}");
            eprintln!("no CUDA driver here: checked the error path only");
            return;
        }
        let info = match probe(0) {
            Ok(info) => info,
            // A driver library but no usable device (a container without a GPU, an empty
            // CUDA_VISIBLE_DEVICES): the error names the reason.
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("CUDA is not usable here"), "{e}");
                eprintln!("CUDA driver present but no device: {e}");
                return;
            }
        };
        assert!(!info.name.is_empty());
        assert!(info.arch().starts_with("sm_"), "{}", info.arch());
        let e = probe(info.count).unwrap_err().to_string();
        assert!(e.contains("visible"), "{e}");
    }
}
