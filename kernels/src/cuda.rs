//! The CUDA side of the backend (feature `cuda`): finding the driver and the device. cudarc
//! opens `libcuda.so.1` at run time and panics when it is absent, so every entry point checks
//! for the library first and turns its absence into a `KernelError`.

use crate::KernelError;
use cudarc::driver::CudaContext;

/// A CUDA device this process can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Devices visible to this process.
    pub count: usize,
}

/// Whether the CUDA driver library can be opened.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Opens device `ordinal`: the driver library must load, the driver must initialise and the
/// device must exist.
pub fn probe(ordinal: usize) -> Result<CudaDeviceInfo, KernelError> {
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
    Ok(CudaDeviceInfo {
        ordinal,
        name,
        count,
    })
}

#[cfg(test)]
mod tests {
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
        let e = probe(info.count).unwrap_err().to_string();
        assert!(e.contains("visible"), "{e}");
    }
}
