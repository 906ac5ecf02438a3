//! Matrix products through cuBLASLt, in the CPU reference's row-major orientation, with f32
//! compute (never TF32) for both f32 and bf16 matrices.
//!
//! cuBLASLt is column-major. A row-major (r, c) matrix with row stride c, read column-major,
//! is its transpose: a (c × r) matrix with leading dimension c. So every row-major product
//! `Y = X · W` runs as the column-major `Yᵀ = Wᵀ · Xᵀ`, and each plan below says which stored
//! matrix each operand is, and whether cuBLASLt transposes it. The plans are plain data, and a
//! CPU test runs them through a column-major GEMM written from the BLAS definition and
//! compares with `cpu::matmul_forward` / `cpu::matmul_backward`.

use crate::KernelError;
use cudarc::cublaslt::result::{self, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// One column-major GEMM `D = alpha · op(A) · op(B) + beta · D`, D being m × n, op(A) m × k and
/// op(B) k × n; the leading dimensions are those of the matrices as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct GemmPlan {
    /// op(A) = Aᵀ when true, A otherwise.
    pub trans_a: bool,
    /// op(B) = Bᵀ when true, B otherwise.
    pub trans_b: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub lda: i64,
    pub ldb: i64,
    pub ldd: i64,
}

impl GemmPlan {
    /// (rows, columns) of A as stored, before the op.
    pub fn a_dims(&self) -> (u64, u64) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    /// (rows, columns) of B as stored, before the op.
    pub fn b_dims(&self) -> (u64, u64) {
        if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }
}

fn dim(x: usize) -> u64 {
    x as u64
}

fn ld(x: usize) -> i64 {
    i64::try_from(x).expect("a matrix dimension beyond i64")
}

/// Forward: out (N,OC) = inp (N,C) · weightᵀ, as the column-major outᵀ (OC × N) = W · inpᵀ.
/// - A is `weight`: row-major (OC,C) reads as the column-major Wᵀ (C × OC, ld C); transposed
///   by cuBLASLt (trans_a) it is W (OC × C).
/// - B is `inp`: row-major (N,C) reads as inpᵀ (C × N, ld C), used as is.
/// - D is `out`: row-major (N,OC) reads as outᵀ (OC × N, ld OC). The bias epilogue adds
///   bias[i] to row i of D, i.e. bias[oc] to column oc of `out`.
pub(crate) fn forward_plan(n: usize, c: usize, oc: usize) -> GemmPlan {
    GemmPlan {
        trans_a: true,
        trans_b: false,
        m: dim(oc),
        n: dim(n),
        k: dim(c),
        lda: ld(c),
        ldb: ld(c),
        ldd: ld(oc),
    }
}

/// Input gradient: dinp (N,C) += dout (N,OC) · weight (OC,C), as the column-major
/// dinpᵀ (C × N) += Wᵀ (C × OC) · doutᵀ (OC × N).
/// - A is `weight`: row-major (OC,C) reads as Wᵀ (C × OC, ld C), used as is.
/// - B is `dout`: row-major (N,OC) reads as doutᵀ (OC × N, ld OC), used as is.
/// - D is `dinp`: row-major (N,C) reads as dinpᵀ (C × N, ld C).
pub(crate) fn dinp_plan(n: usize, c: usize, oc: usize) -> GemmPlan {
    GemmPlan {
        trans_a: false,
        trans_b: false,
        m: dim(c),
        n: dim(n),
        k: dim(oc),
        lda: ld(c),
        ldb: ld(oc),
        ldd: ld(c),
    }
}

/// Weight gradient: dweight (OC,C) += doutᵀ (OC,N) · inp (N,C), as the column-major
/// dweightᵀ (C × OC) += inpᵀ (C × N) · dout (N × OC).
/// - A is `inp`: row-major (N,C) reads as inpᵀ (C × N, ld C), used as is.
/// - B is `dout`: row-major (N,OC) reads as doutᵀ (OC × N, ld OC); transposed by cuBLASLt
///   (trans_b) it is dout (N × OC).
/// - D is `dweight`: row-major (OC,C) reads as dweightᵀ (C × OC, ld C).
pub(crate) fn dweight_plan(n: usize, c: usize, oc: usize) -> GemmPlan {
    GemmPlan {
        trans_a: false,
        trans_b: true,
        m: dim(c),
        n: dim(oc),
        k: dim(n),
        lda: ld(c),
        ldb: ld(oc),
        ldd: ld(c),
    }
}

/// Device addresses of one GEMM's operands.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Operands {
    pub a: u64,
    pub b: u64,
    pub d: u64,
}

/// The largest power of two dividing `ptr`, at most 256: what cuBLASLt may assume about a
/// buffer's alignment. Views into a flat parameter buffer can start anywhere.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        return 256;
    }
    (ptr & ptr.wrapping_neg()).min(256) as u32
}

/// Everything the choice of algorithm depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AlgoKey {
    plan: GemmPlan,
    dtype: sys::cudaDataType,
    bias: bool,
    alignments: [u32; 3],
}

/// A cuBLASLt handle, a workspace and the algorithm chosen for each problem.
pub(crate) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// Each problem keeps the algorithm the heuristic chose for it the first time (`None`: no
    /// algorithm fuses its bias), so repeated calls are bit-identical and the heuristic runs
    /// once per shape. The lock also serialises every use of the handle and of the shared
    /// workspace.
    algos: Mutex<HashMap<AlgoKey, Option<sys::cublasLtMatmulAlgo_t>>>,
}

// SAFETY: the handle is created and destroyed by this struct alone, and every call that uses
// it (or the workspace) runs under the `algos` lock, so no two threads use it at once.
unsafe impl Send for Blas {}
// SAFETY: as above: shared references only reach the handle through the lock.
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created in `Blas::new`, destroyed only here. An error cannot be reported
        // from a drop, and leaking the handle is harmless.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// An error of cuBLASLt, naming what failed.
fn blas_error<'a>(
    what: &'a str,
    plan: &'a GemmPlan,
) -> impl FnOnce(CublasError) -> KernelError + 'a {
    move |e| {
        KernelError::Cuda(format!(
            "cuBLASLt {what} for a {}x{}x{} GEMM: {e:?}",
            plan.m, plan.n, plan.k
        ))
    }
}

/// RAII wrappers of the cuBLASLt descriptors of one call.
struct Desc(sys::cublasLtMatmulDesc_t);
struct Layout(sys::cublasLtMatrixLayout_t);
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once here.
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once here.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once here.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}

impl Desc {
    fn set<V>(
        &self,
        attr: sys::cublasLtMatmulDescAttributes_t,
        value: &V,
    ) -> Result<(), CublasError> {
        // SAFETY: the descriptor is live; `value` is the attribute's documented type and
        // cuBLASLt copies its size_of::<V>() bytes.
        unsafe {
            result::set_matmul_desc_attribute(
                self.0,
                attr,
                (value as *const V).cast::<c_void>(),
                std::mem::size_of::<V>(),
            )
        }
    }
}

impl Pref {
    fn set<V>(
        &self,
        attr: sys::cublasLtMatmulPreferenceAttributes_t,
        value: &V,
    ) -> Result<(), CublasError> {
        // SAFETY: as for Desc::set.
        unsafe {
            result::set_matmul_pref_attribute(
                self.0,
                attr,
                (value as *const V).cast::<c_void>(),
                std::mem::size_of::<V>(),
            )
        }
    }
}

impl Blas {
    /// A handle and a workspace of the size NVIDIA recommends: 32 MiB on Hopper and later,
    /// 4 MiB before.
    pub fn new(stream: &Arc<CudaStream>, compute_major: i32) -> Result<Self, KernelError> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| KernelError::Cuda(format!("binding the CUDA context: {e:?}")))?;
        let size = if compute_major >= 9 {
            32 << 20
        } else {
            4 << 20
        };
        let workspace = stream.alloc_zeros::<u8>(size).map_err(|e| {
            KernelError::Cuda(format!(
                "allocating the cuBLASLt workspace ({size} bytes): {e:?}"
            ))
        })?;
        let handle = result::create_handle()
            .map_err(|e| KernelError::Cuda(format!("creating a cuBLASLt handle: {e:?}")))?;
        Ok(Self {
            handle,
            workspace,
            algos: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `D = op(A) · op(B) + beta · D` on `stream`, plus `bias` (a device address, one
    /// value per row of D) through cuBLASLt's bias epilogue when given. Returns false, having
    /// run nothing, when the bias cannot be fused (an address not 16-byte aligned, or no
    /// algorithm for it): the caller then adds the bias itself.
    ///
    /// # Safety
    /// The operands must be live device buffers of `dtype` elements, large enough for the
    /// plan's matrices as stored, and D must not overlap A, B or the bias; nothing else may
    /// write A, B or the bias before the stream has run the GEMM.
    pub unsafe fn matmul(
        &self,
        stream: &CudaStream,
        dtype: sys::cudaDataType,
        plan: &GemmPlan,
        ops: Operands,
        bias: Option<u64>,
        beta: f32,
    ) -> Result<bool, KernelError> {
        if bias.is_some_and(|b| alignment(b) < 16) {
            return Ok(false);
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| KernelError::Cuda(format!("binding the CUDA context: {e:?}")))?;
        let desc = self.desc(plan, bias)?;
        let (a_rows, a_cols) = plan.a_dims();
        let (b_rows, b_cols) = plan.b_dims();
        let layout = |rows, cols, ld| {
            result::create_matrix_layout(dtype, rows, cols, ld)
                .map(Layout)
                .map_err(blas_error("creating a matrix layout", plan))
        };
        let a = layout(a_rows, a_cols, plan.lda)?;
        let b = layout(b_rows, b_cols, plan.ldb)?;
        let d = layout(plan.m, plan.n, plan.ldd)?;
        let key = AlgoKey {
            plan: *plan,
            dtype,
            bias: bias.is_some(),
            alignments: [alignment(ops.a), alignment(ops.b), alignment(ops.d)],
        };
        // A poisoned lock only means another thread panicked mid-call; the map stays valid.
        let mut algos = self.algos.lock().unwrap_or_else(|e| e.into_inner());
        let algo = match algos.get(&key) {
            Some(known) => *known,
            None => {
                let found = match self.heuristic(&key, &desc, &a, &b, &d) {
                    Ok(algo) => Some(algo),
                    // No algorithm with the bias epilogue: remembered, so the caller's unfused
                    // path is taken without asking again.
                    Err(CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED))
                        if bias.is_some() =>
                    {
                        None
                    }
                    Err(e) => return Err(blas_error("finding an algorithm", plan)(e)),
                };
                *algos.entry(key).or_insert(found)
            }
        };
        let Some(algo) = algo else {
            return Ok(false);
        };
        let alpha = 1.0f32;
        let (workspace, _workspace_guard) = self.workspace.device_ptr(stream);
        let as_ptr = |address: u64| address as *const c_void;
        // SAFETY: the descriptors and the handle are live; the caller guarantees the
        // operands; alpha and beta are f32 host values as the f32 scale type requires; the
        // workspace is ours and its size is the one the heuristic was told.
        unsafe {
            result::matmul(
                self.handle,
                desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                as_ptr(ops.a),
                a.0,
                as_ptr(ops.b),
                b.0,
                as_ptr(ops.d),
                d.0,
                ops.d as *mut c_void,
                d.0,
                &algo,
                workspace as *mut c_void,
                self.workspace.len(),
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(blas_error("running the GEMM", plan))?;
        Ok(true)
    }

    /// The operation: f32 compute and scale (CUBLAS_COMPUTE_32F: never TF32, whatever the
    /// inputs), the transposes, and the bias epilogue when there is a bias.
    fn desc(&self, plan: &GemmPlan, bias: Option<u64>) -> Result<Desc, KernelError> {
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map(Desc)
        .map_err(blas_error("creating the operation", plan))?;
        type Attr = sys::cublasLtMatmulDescAttributes_t;
        // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, as an int32.
        let op = |transpose: bool| i32::from(transpose);
        desc.set(Attr::CUBLASLT_MATMUL_DESC_TRANSA, &op(plan.trans_a))
            .and_then(|()| desc.set(Attr::CUBLASLT_MATMUL_DESC_TRANSB, &op(plan.trans_b)))
            .map_err(blas_error("setting the transposes", plan))?;
        if let Some(bias) = bias {
            // The epilogue is a uint32 enum; the bias pointer a device address (void*).
            let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32;
            let pointer = bias as *const c_void;
            desc.set(Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)
                .and_then(|()| desc.set(Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &pointer))
                .map_err(blas_error("setting the bias epilogue", plan))?;
        }
        Ok(desc)
    }

    /// The heuristic's first algorithm for the problem, given the workspace size and the
    /// operands' actual alignments (cuBLASLt otherwise assumes 256-byte alignment).
    fn heuristic(
        &self,
        key: &AlgoKey,
        desc: &Desc,
        a: &Layout,
        b: &Layout,
        d: &Layout,
    ) -> Result<sys::cublasLtMatmulAlgo_t, CublasError> {
        type Attr = sys::cublasLtMatmulPreferenceAttributes_t;
        let pref = result::create_matmul_pref().map(Pref)?;
        let workspace_bytes = self.workspace.len() as u64;
        pref.set(
            Attr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &workspace_bytes,
        )?;
        let [align_a, align_b, align_d] = key.alignments;
        pref.set(Attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a)?;
        pref.set(Attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b)?;
        // C is D (in place).
        pref.set(Attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d)?;
        pref.set(Attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d)?;
        // SAFETY: every descriptor is live for the call.
        let found = unsafe {
            result::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, d.0, d.0, pref.0)
        }?;
        Ok(found.algo)
    }
}

#[cfg(test)]
mod tests {
    //! The plans against the CPU reference, through a column-major GEMM written from the BLAS
    //! definition: this checks every transpose and leading dimension without a GPU.

    use super::*;
    use crate::cpu;

    /// `D = op(A) · op(B) + beta · D`, column-major, exactly as BLAS defines it.
    fn colmajor_gemm(p: &GemmPlan, a: &[f64], b: &[f64], beta: f64, d: &mut [f64]) {
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let (lda, ldb, ldd) = (p.lda as usize, p.ldb as usize, p.ldd as usize);
        let fits = |(rows, cols): (u64, u64), ld: usize, len: usize| {
            ld >= rows as usize && (cols as usize - 1) * ld + rows as usize <= len
        };
        assert!(fits(p.a_dims(), lda, a.len()), "A does not fit its buffer");
        assert!(fits(p.b_dims(), ldb, b.len()), "B does not fit its buffer");
        assert!(fits((p.m, p.n), ldd, d.len()), "D does not fit its buffer");
        for j in 0..n {
            for i in 0..m {
                let mut acc = 0.0;
                for l in 0..k {
                    let a_il = if p.trans_a {
                        a[l + i * lda]
                    } else {
                        a[i + l * lda]
                    };
                    let b_lj = if p.trans_b {
                        b[j + l * ldb]
                    } else {
                        b[l + j * ldb]
                    };
                    acc += a_il * b_lj;
                }
                // As in BLAS, D is not read when beta is zero (it may hold NaN).
                let at = i + j * ldd;
                d[at] = if beta == 0.0 { acc } else { beta * d[at] + acc };
            }
        }
    }

    fn values(len: usize, seed: u64) -> Vec<f64> {
        // A small LCG is enough here: the values only need to differ.
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect()
    }

    fn assert_close(what: &str, got: &[f64], want: &[f64]) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-12, "{what}[{i}]: {g} vs {w}");
        }
    }

    #[test]
    fn plans_reproduce_the_cpu_matmul() {
        // Distinct sizes so that any swapped dimension or leading dimension shows.
        let (n, c, oc) = (5, 7, 3);
        let (inp, weight, dout) = (values(n * c, 1), values(oc * c, 2), values(n * oc, 3));

        let mut want = vec![0.0; n * oc];
        cpu::matmul_forward(&mut want, &inp, &weight, None, n, c, oc);
        let mut got = vec![f64::NAN; n * oc];
        colmajor_gemm(&forward_plan(n, c, oc), &weight, &inp, 0.0, &mut got);
        assert_close("out", &got, &want);

        let prefill = values(n * c + oc * c, 4);
        let (mut dinp_want, mut dw_want) = (prefill[..n * c].to_vec(), prefill[n * c..].to_vec());
        cpu::matmul_backward(
            &mut dinp_want,
            &mut dw_want,
            None,
            &dout,
            &inp,
            &weight,
            n,
            c,
            oc,
        );
        let mut dinp = prefill[..n * c].to_vec();
        colmajor_gemm(&dinp_plan(n, c, oc), &weight, &dout, 1.0, &mut dinp);
        assert_close("dinp", &dinp, &dinp_want);
        let mut dweight = prefill[n * c..].to_vec();
        colmajor_gemm(&dweight_plan(n, c, oc), &inp, &dout, 1.0, &mut dweight);
        assert_close("dweight", &dweight, &dw_want);
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0), 256);
        assert_eq!(alignment(4), 4);
        assert_eq!(alignment(0x7f00_0000_0104), 4);
        assert_eq!(alignment(0x7f00_0000_0110), 16);
        assert_eq!(alignment(0x7f00_0000_1000), 256);
    }
}
