//! NVML opened at run time (dlopen of `libnvidia-ml.so.1`): a GPU's name, memory and
//! utilisation for the live stats. Nothing is linked at build time, so the default build needs
//! no NVIDIA library; a machine without the library, the driver or a GPU just has no GPU fields.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

/// The library names tried, in order.
const LIBRARY_NAMES: [&CStr; 2] = [c"libnvidia-ml.so.1", c"libnvidia-ml.so"];

/// NVML_SUCCESS.
const NVML_SUCCESS: c_int = 0;

/// Longest device name NVML writes (NVML_DEVICE_NAME_V2_BUFFER_SIZE).
const NAME_BYTES_MAX: usize = 96;

type Device = *mut c_void;

#[repr(C)]
#[derive(Default)]
struct Memory {
    total: u64,
    free: u64,
    used: u64,
}

#[repr(C)]
#[derive(Default)]
struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

type InitFn = unsafe extern "C" fn() -> c_int;
type HandleFn = unsafe extern "C" fn(c_uint, *mut Device) -> c_int;
type MemoryFn = unsafe extern "C" fn(Device, *mut Memory) -> c_int;
type UtilFn = unsafe extern "C" fn(Device, *mut Utilization) -> c_int;
type NameFn = unsafe extern "C" fn(Device, *mut c_char, c_uint) -> c_int;

/// One reading of a GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuSample {
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    /// Percent of the last sample period in which a kernel ran.
    pub util_pct: u32,
}

/// An initialised NVML with one device's handle.
pub struct Nvml {
    lib: *mut c_void,
    device: Device,
    memory: MemoryFn,
    utilization: UtilFn,
    shutdown: InitFn,
    /// NVML's index of the device.
    pub index: u32,
    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
}

// SAFETY: NVML's API is thread-safe, and the handles are plain pointers owned by the library
// for as long as it is initialised, which this value guarantees until it is dropped.
unsafe impl Send for Nvml {}

/// Looks `name` up in `lib` as a function of type `F`.
///
/// # Safety
/// `F` must be the C signature of the symbol `name`.
unsafe fn symbol<F: Copy>(lib: *mut c_void, name: &CStr) -> Option<F> {
    let p = libc::dlsym(lib, name.as_ptr());
    // SAFETY: the caller guarantees the type; a non-null dlsym result is the function's address,
    // and a function pointer has the size of a data pointer on the platforms we support.
    (!p.is_null()).then(|| std::mem::transmute_copy::<*mut c_void, F>(&p))
}

impl Nvml {
    /// Opens NVML and device `index`; `None` when any of it is missing.
    pub fn open(index: u32) -> Option<Nvml> {
        // SAFETY: dlopen with a NUL-terminated name; a null result is handled.
        let lib = LIBRARY_NAMES
            .iter()
            .map(|n| unsafe { libc::dlopen(n.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) })
            .find(|p| !p.is_null())?;
        // SAFETY: `lib` is a live handle; the function types match NVML's C declarations
        // (nvml.h: nvmlInit_v2, nvmlShutdown, nvmlDeviceGetHandleByIndex_v2,
        // nvmlDeviceGetMemoryInfo, nvmlDeviceGetUtilizationRates, nvmlDeviceGetName).
        let opened = unsafe { Self::init(lib, index) };
        if opened.is_none() {
            // SAFETY: `lib` came from dlopen above and nothing of it is used any more.
            unsafe { libc::dlclose(lib) };
        }
        opened
    }

    /// # Safety
    /// `lib` must be a live dlopen handle of NVML.
    unsafe fn init(lib: *mut c_void, index: u32) -> Option<Nvml> {
        let init: InitFn = symbol(lib, c"nvmlInit_v2")?;
        let shutdown: InitFn = symbol(lib, c"nvmlShutdown")?;
        let handle: HandleFn = symbol(lib, c"nvmlDeviceGetHandleByIndex_v2")?;
        let memory: MemoryFn = symbol(lib, c"nvmlDeviceGetMemoryInfo")?;
        let utilization: UtilFn = symbol(lib, c"nvmlDeviceGetUtilizationRates")?;
        let get_name: NameFn = symbol(lib, c"nvmlDeviceGetName")?;
        if init() != NVML_SUCCESS {
            return None;
        }
        let mut device: Device = std::ptr::null_mut();
        if handle(index, &mut device) != NVML_SUCCESS {
            shutdown();
            return None;
        }
        let mut buf = [0 as c_char; NAME_BYTES_MAX];
        let name = if get_name(device, buf.as_mut_ptr(), NAME_BYTES_MAX as c_uint) == NVML_SUCCESS {
            // NVML NUL-terminates the name within the buffer; the last byte is forced to NUL
            // anyway so the read cannot run past it.
            buf[NAME_BYTES_MAX - 1] = 0;
            CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
        } else {
            format!("GPU {index}")
        };
        Some(Nvml {
            lib,
            device,
            memory,
            utilization,
            shutdown,
            index,
            name,
        })
    }

    /// Reads the device's memory and utilisation; `None` if NVML refuses.
    pub fn sample(&self) -> Option<GpuSample> {
        let (mut m, mut u) = (Memory::default(), Utilization::default());
        // SAFETY: NVML is initialised and `device` is its handle; the out-pointers are valid.
        let ok = unsafe {
            (self.memory)(self.device, &mut m) == NVML_SUCCESS
                && (self.utilization)(self.device, &mut u) == NVML_SUCCESS
        };
        ok.then_some(GpuSample {
            mem_used_bytes: m.used,
            mem_total_bytes: m.total,
            util_pct: u.gpu,
        })
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        // SAFETY: NVML was initialised by `open`; after shutdown nothing of the library is used.
        unsafe {
            (self.shutdown)();
            libc::dlclose(self.lib);
        }
    }
}

/// NVML's index of the GPU a rank of this node would use: the node-local rank from SLURM or
/// Open MPI, else 0.
pub fn local_gpu_index() -> u32 {
    crate::device::LOCAL_RANK_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_or_present_nvml_is_never_an_error() {
        // On a machine without NVML this is None; with a GPU the reading is consistent.
        if let Some(n) = Nvml::open(0) {
            let s = n.sample().expect("an opened device can be read");
            assert!(s.mem_used_bytes <= s.mem_total_bytes && s.util_pct <= 100);
            assert!(!n.name.is_empty());
        }
        assert!(Nvml::open(u32::MAX).is_none());
    }
}
