//! [`Gpu`]: one CUDA device with its context, stream, compiled kernels and cuBLASLt handle,
//! and the helpers that allocate device buffers and copy between host and device.

use super::blas::Blas;
use super::compile::{compile_kernels, default_cache_dir, nvrtc_present};
use super::{cublaslt_present, open_context, CudaDeviceInfo};
use crate::KernelError;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr,
    DriverError, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use half::bf16;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Most partial sums of [`Gpu::global_norm_squared`]: its chunk grows with the length beyond
/// `NORM_BLOCKS_MAX * NORM_CHUNK_MIN` elements so the partials always fit the buffer
/// allocated at start-up.
pub(crate) const NORM_BLOCKS_MAX: usize = 1024;
/// Fewest elements per partial sum of [`Gpu::global_norm_squared`].
pub(crate) const NORM_CHUNK_MIN: usize = 64 * 1024;

/// The partial sums of the global norm, on the device and on the host.
pub(crate) struct NormScratch {
    pub device: CudaSlice<f64>,
    pub host: Vec<f64>,
}

/// One CUDA device ready to run the Lazarus kernels: a context, its default stream, the kernel
/// modules compiled for the device's architecture, and a cuBLASLt handle. Every op runs
/// asynchronously on [`Gpu::stream`]; errors of a kernel that already ran show up at the next
/// synchronising call ([`Gpu::synchronize`], a download).
pub struct Gpu {
    info: CudaDeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    pub(crate) blas: Blas,
    pub(crate) norm: Mutex<NormScratch>,
    warnings: Vec<String>,
    /// Whether a matmul bias may be fused into the GEMM as a cuBLASLt epilogue; the tests turn
    /// it off to run the other path.
    pub(crate) bias_epilogue: AtomicBool,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("info", &self.info)
            .field("kernels", &self.functions.len())
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens device `ordinal`: checks the driver, NVRTC and cuBLASLt libraries, creates the
    /// context, compiles the kernels for the device's architecture (or reads them from the
    /// cache, see [`default_cache_dir`]) and loads them, and creates the cuBLASLt handle.
    pub fn open(ordinal: usize) -> Result<Gpu, KernelError> {
        let (info, ctx) = open_context(ordinal)?;
        if !nvrtc_present() {
            return Err(KernelError::CudaUnavailable(
                "NVRTC (libnvrtc.so.13) was not found: install the CUDA 13 runtime compiler and \
                 put its lib directory on LD_LIBRARY_PATH (scripts/nvrtc-setup.sh)"
                    .into(),
            ));
        }
        if !cublaslt_present() {
            return Err(KernelError::CudaUnavailable(
                "cuBLASLt (libcublasLt.so.13) was not found: install the CUDA 13 cuBLAS \
                 libraries and put their lib directory on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let mut warnings = Vec::new();
        let cache = default_cache_dir();
        if cache.is_none() {
            warnings.push(
                "no kernel cache directory (neither LAZARUS_KERNEL_CACHE, XDG_CACHE_HOME nor \
                 HOME is set): the kernels are compiled at every start"
                    .to_string(),
            );
        }
        let compiled = compile_kernels(&info.arch(), cache.as_deref())?;
        warnings.extend(compiled.warnings);
        let mut functions = HashMap::new();
        for module in compiled.modules {
            if !module.log.is_empty() {
                warnings.push(format!(
                    "NVRTC warned about {}: {}",
                    module.name, module.log
                ));
            }
            let loaded = ctx
                .load_module(Ptx::from_binary(module.cubin))
                .map_err(|e| {
                    KernelError::Cuda(format!(
                        "loading the kernels of {} for {}: {e:?}",
                        module.name, compiled.arch
                    ))
                })?;
            for name in module.entry_points {
                let function = loaded.load_function(name).map_err(|e| {
                    KernelError::Cuda(format!("finding kernel {name} in {}: {e:?}", module.name))
                })?;
                functions.insert(name, function);
            }
        }
        let stream = ctx.default_stream();
        let blas = Blas::new(&stream, info.compute_capability.0)?;
        let norm = NormScratch {
            device: stream
                .alloc_zeros::<f64>(NORM_BLOCKS_MAX)
                .map_err(driver("allocating the norm's partial sums"))?,
            host: vec![0.0; NORM_BLOCKS_MAX],
        };
        Ok(Gpu {
            info,
            ctx,
            stream,
            functions,
            blas,
            norm: Mutex::new(norm),
            warnings,
            bias_epilogue: AtomicBool::new(true),
        })
    }

    /// The device.
    pub fn info(&self) -> &CudaDeviceInfo {
        &self.info
    }

    /// The stream every op and helper runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's (primary) context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's free and total memory in bytes, as the driver reports them now (the free
    /// part excludes what this context already holds: its kernels, cuBLASLt, its buffers).
    pub fn memory(&self) -> Result<(u64, u64), KernelError> {
        let (free, total) = self
            .ctx
            .mem_get_info()
            .map_err(driver("reading the device's memory"))?;
        Ok((free as u64, total as u64))
    }

    /// What went wrong without stopping [`Gpu::open`] (kernel cache trouble, NVRTC warnings),
    /// for the caller to report: this crate never prints.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Waits until every op queued so far has run; reports the first failure among them.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(driver("waiting for the GPU"))
    }

    /// `n` zeroed f32 values on the device.
    pub fn zeros_f32(&self, n: usize) -> Result<CudaSlice<f32>, KernelError> {
        self.zeros(n)
    }

    /// `n` zeroed u32 values on the device.
    pub fn zeros_u32(&self, n: usize) -> Result<CudaSlice<u32>, KernelError> {
        self.zeros(n)
    }

    /// `n` zeroed bf16 values on the device.
    pub fn zeros_bf16(&self, n: usize) -> Result<CudaSlice<bf16>, KernelError> {
        self.zeros(n)
    }

    /// `n` zeroed values of any device type on the device.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, KernelError> {
        self.stream.alloc_zeros::<T>(n).map_err(|e| {
            KernelError::Cuda(format!(
                "allocating {n} values of {} bytes on the GPU: {e:?}",
                std::mem::size_of::<T>()
            ))
        })
    }

    /// A new device buffer holding `src`.
    pub fn upload_f32(&self, src: &[f32]) -> Result<CudaSlice<f32>, KernelError> {
        self.stream
            .clone_htod(src)
            .map_err(driver("uploading f32 values"))
    }

    /// Copies `src` into the first `src.len()` values of `dst`.
    pub fn upload_f32_into(
        &self,
        src: &[f32],
        dst: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        assert!(
            src.len() <= dst.len(),
            "upload_f32_into: {} values do not fit a view of {}",
            src.len(),
            dst.len()
        );
        self.stream
            .memcpy_htod(src, dst)
            .map_err(driver("uploading f32 values"))
    }

    /// Copies `src` into the first `src.len()` values of `dst`.
    pub fn upload_u32_into(
        &self,
        src: &[u32],
        dst: &mut CudaSlice<u32>,
    ) -> Result<(), KernelError> {
        assert!(
            src.len() <= dst.len(),
            "upload_u32_into: {} values do not fit a buffer of {}",
            src.len(),
            dst.len()
        );
        self.stream
            .memcpy_htod(src, dst)
            .map_err(driver("uploading u32 values"))
    }

    /// Copies `src` to `dst` (same length) and waits for the copy, so `dst` is ready on return.
    pub fn download_f32(
        &self,
        src: &CudaView<'_, f32>,
        dst: &mut [f32],
    ) -> Result<(), KernelError> {
        assert_eq!(
            src.len(),
            dst.len(),
            "download_f32: the view and the host slice differ in length"
        );
        self.stream
            .memcpy_dtoh(src, dst)
            .map_err(driver("downloading f32 values"))?;
        self.synchronize()
    }

    /// The kernel `name`. Every name the ops launch is checked against the sources by a test,
    /// so a miss is a bug of this crate, reported as an error rather than a panic.
    pub(crate) fn function(&self, name: &'static str) -> Result<&CudaFunction, KernelError> {
        self.functions.get(name).ok_or_else(|| {
            KernelError::Cuda(format!("kernel {name} is not in the compiled modules"))
        })
    }

    /// Whether the matmul bias may be fused into the GEMM.
    pub(crate) fn bias_epilogue(&self) -> bool {
        self.bias_epilogue.load(Ordering::Relaxed)
    }
}

/// A driver error as a [`KernelError`], naming what was being done.
pub(crate) fn driver(what: &str) -> impl FnOnce(DriverError) -> KernelError + '_ {
    move |e| KernelError::Cuda(format!("{what}: {e:?}"))
}
