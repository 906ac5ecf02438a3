//! The ops of [`Gpu`]: the CPU reference kernels of [`crate::cpu`] on device views, with the
//! same names, argument order, shapes, assertions (the very shape checks of the CPU kernels,
//! `crate::cpu::shapes`) and accumulation rules (backward ops add into their gradients).
//! Activation-type ops are generic over [`GpuFloat`]; the optimizer, the norm and the casts
//! work on f32 master values.
//!
//! Two deliberate differences from the CPU signatures: the layernorm's mean and rstd and the
//! cross-entropy's losses are always f32 (statistics, never stored in bf16), and ids (tokens,
//! targets) live on the device, so an id out of range cannot be asserted: the kernels write
//! NaN instead of reading out of bounds (the loss turns NaN and training stops as diverged).
//!
//! Every launch states the kernel's C signature next to its arguments; the arguments are
//! pushed in that order with those types (`int` is i32, `unsigned long long` is u64).

use super::blas::{self, Operands};
use super::compile::{COL_LANES, COL_TILE, ROW_THREADS};
use super::float::{f32_only, GpuFloat};
use super::gpu::{driver, Gpu, NORM_BLOCKS_MAX, NORM_CHUNK_MIN};
use crate::cpu::shapes::{
    check_adamw_update, check_attention_backward, check_attention_forward, check_encoder_backward,
    check_encoder_forward, check_gelu_backward, check_gelu_forward, check_layernorm_backward,
    check_layernorm_forward, check_matmul_backward, check_matmul_forward, check_residual_backward,
    check_residual_forward, check_softmax_crossentropy_backward,
    check_softmax_crossentropy_forward, check_softmax_forward,
};
use crate::cpu::AdamW;
use crate::KernelError;
use cudarc::driver::{
    CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DriverError, LaunchConfig, PushKernelArg,
};
use half::bf16;

/// Most blocks of an element-wise launch; the kernels' grid-stride loops cover the rest.
const ELEMENTWISE_BLOCKS_MAX: usize = 1 << 20;

/// Longest sequence the attention kernels take: a score row of T f32 values sits in the
/// block's shared memory, which must stay within the 48 KiB every GPU grants without opt-in.
pub const ATTENTION_T_MAX: usize = 8192;

/// `x` as a kernel's `int`; shapes beyond i32 are a caller bug, like a wrong length.
fn int(x: usize, what: &str) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("{what} = {x} does not fit the kernels' int"))
}

/// `x` as a kernel's `unsigned long long`.
fn u64_of(x: usize) -> u64 {
    x as u64
}

/// One thread per element, blocks of ROW_THREADS.
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(ROW_THREADS as usize)
        .clamp(1, ELEMENTWISE_BLOCKS_MAX);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of ROW_THREADS per row, with `shared_mem_bytes` of dynamic shared memory.
fn rows(n: usize, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (int(n, "the number of rows") as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes,
    }
}

/// Column reductions: one block of (COL_TILE, COL_LANES) threads per COL_TILE columns.
fn columns(cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(COL_TILE as usize) as u32, 1, 1),
        block_dim: (COL_TILE, COL_LANES, 1),
        shared_mem_bytes: 0,
    }
}

/// A failed launch as a [`KernelError`] naming the kernel.
fn launched(name: &'static str) -> impl FnOnce(DriverError) -> KernelError {
    move |e| KernelError::Cuda(format!("launching kernel {name}: {e:?}"))
}

impl Gpu {
    /// out (B,T,C) = `wte[tokens[b,t]] + wpe[t]`. tokens (B,T) as u32, wte (Vp,C), wpe (maxT,C)
    /// with maxT >= T. A token >= Vp gives a row of NaN.
    #[allow(clippy::too_many_arguments)]
    pub fn encoder_forward<T: GpuFloat>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        tokens: &CudaView<'_, u32>,
        wte: &CudaView<'_, T>,
        wpe: &CudaView<'_, T>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<(), KernelError> {
        let vp = check_encoder_forward(out.len(), tokens.len(), wte.len(), wpe.len(), b, t, c);
        let n = b * t;
        if n == 0 {
            return Ok(());
        }
        let name = T::ENTRIES.encoder_forward;
        let (n_, t_, c_) = (int(n, "N"), int(t, "T"), int(c, "C"));
        let vp = int(vp, "Vp");
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* out, const unsigned* tokens, const T* wte, const T* wpe, int n, int t, int c,
        //  int vp)
        args.arg(&mut *out).arg(tokens).arg(wte).arg(wpe);
        args.arg(&n_).arg(&t_).arg(&c_).arg(&vp);
        // SAFETY: the arguments match the kernel's signature; out holds N*C values, tokens N,
        // wte Vp*C, wpe at least T*C (asserted above), and the kernel stays inside them.
        unsafe { args.launch(elementwise(n * c)) }.map_err(launched(name))?;
        Ok(())
    }

    /// Accumulates into dwte (Vp,C) and dwpe (maxT,C) (only the first T rows of dwpe are
    /// touched). dout (B,T,C), tokens (B,T). Deterministic: each row of dwte adds its rows of
    /// dout in row order, each row of dwpe its batches in order.
    #[allow(clippy::too_many_arguments)]
    pub fn encoder_backward<T: GpuFloat>(
        &self,
        dwte: &mut CudaViewMut<'_, T>,
        dwpe: &mut CudaViewMut<'_, T>,
        dout: &CudaView<'_, T>,
        tokens: &CudaView<'_, u32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<(), KernelError> {
        let vp = check_encoder_backward(dwte.len(), dwpe.len(), dout.len(), tokens.len(), b, t, c);
        let n = b * t;
        if n == 0 {
            return Ok(());
        }
        let (b_, t_, n_, c_) = (int(b, "B"), int(t, "T"), int(n, "N"), int(c, "C"));
        let vp = int(vp, "Vp");
        let name = T::ENTRIES.encoder_wte_backward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* dwte, const T* dout, const unsigned* tokens, int n, int c, int vp)
        args.arg(&mut *dwte).arg(dout).arg(tokens);
        args.arg(&n_).arg(&c_).arg(&vp);
        // SAFETY: the arguments match the signature; one block per row of dout (N rows of C),
        // tokens N, dwte Vp*C; rows with a token >= Vp are skipped.
        unsafe { args.launch(rows(n, 0)) }.map_err(launched(name))?;
        let name = T::ENTRIES.encoder_wpe_backward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* dwpe, const T* dout, int b, int t, int c)
        args.arg(&mut *dwpe).arg(dout).arg(&b_).arg(&t_).arg(&c_);
        // SAFETY: the arguments match the signature; the kernel writes dwpe[..T*C] (dwpe has
        // at least that) and reads dout (B*T*C).
        unsafe { args.launch(elementwise(t * c)) }.map_err(launched(name))?;
        Ok(())
    }

    /// inp/out (N,C), weight/bias (C), mean/rstd (N) saved for backward (f32 for every T).
    /// eps = 1e-5.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward<T: GpuFloat>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        mean: &mut CudaViewMut<'_, f32>,
        rstd: &mut CudaViewMut<'_, f32>,
        inp: &CudaView<'_, T>,
        weight: &CudaView<'_, T>,
        bias: &CudaView<'_, T>,
        n: usize,
        c: usize,
    ) -> Result<(), KernelError> {
        check_layernorm_forward(
            out.len(),
            mean.len(),
            rstd.len(),
            inp.len(),
            weight.len(),
            bias.len(),
            n,
            c,
        );
        if n == 0 {
            return Ok(());
        }
        let c_ = int(c, "C");
        let name = T::ENTRIES.layernorm_forward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* out, float* mean, float* rstd, const T* inp, const T* weight, const T* bias,
        //  int c)
        args.arg(&mut *out).arg(&mut *mean).arg(&mut *rstd);
        args.arg(inp).arg(weight).arg(bias).arg(&c_);
        // SAFETY: the arguments match the signature; one block per row, every length asserted.
        unsafe { args.launch(rows(n, 0)) }.map_err(launched(name))?;
        Ok(())
    }

    /// Accumulates into dinp (N,C), dweight (C), dbias (C). dout and inp (N,C), weight (C),
    /// mean and rstd (N) as saved by [`Gpu::layernorm_forward`]. Deterministic.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward<T: GpuFloat>(
        &self,
        dinp: &mut CudaViewMut<'_, T>,
        dweight: &mut CudaViewMut<'_, T>,
        dbias: &mut CudaViewMut<'_, T>,
        dout: &CudaView<'_, T>,
        inp: &CudaView<'_, T>,
        weight: &CudaView<'_, T>,
        mean: &CudaView<'_, f32>,
        rstd: &CudaView<'_, f32>,
        n: usize,
        c: usize,
    ) -> Result<(), KernelError> {
        check_layernorm_backward(
            dinp.len(),
            dweight.len(),
            dbias.len(),
            dout.len(),
            inp.len(),
            weight.len(),
            mean.len(),
            rstd.len(),
            n,
            c,
        );
        if n == 0 {
            return Ok(());
        }
        let (n_, c_) = (int(n, "N"), int(c, "C"));
        let name = T::ENTRIES.layernorm_inp_backward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* dinp, const T* dout, const T* inp, const T* weight, const float* mean,
        //  const float* rstd, int c)
        args.arg(&mut *dinp).arg(dout).arg(inp).arg(weight);
        args.arg(mean).arg(rstd).arg(&c_);
        // SAFETY: the arguments match the signature; one block per row, lengths asserted.
        unsafe { args.launch(rows(n, 0)) }.map_err(launched(name))?;
        let name = T::ENTRIES.layernorm_params_backward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* dweight, T* dbias, const T* dout, const T* inp, const float* mean,
        //  const float* rstd, int n, int c)
        args.arg(&mut *dweight).arg(&mut *dbias).arg(dout).arg(inp);
        args.arg(mean).arg(rstd).arg(&n_).arg(&c_);
        // SAFETY: the arguments match the signature; the blocks cover the C columns and skip
        // threads past the last one.
        unsafe { args.launch(columns(c)) }.map_err(launched(name))?;
        Ok(())
    }

    /// out (N,OC) = inp (N,C) · weightᵀ + bias; weight is (OC,C) row-major (llm.c orientation),
    /// bias (OC) optional. cuBLASLt with f32 compute (no TF32); the bias is fused into the GEMM
    /// when cuBLASLt can, else written first and accumulated onto.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_forward<T: GpuFloat>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        inp: &CudaView<'_, T>,
        weight: &CudaView<'_, T>,
        bias: Option<&CudaView<'_, T>>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<(), KernelError> {
        let bias_len = bias.map(|bias| bias.len());
        check_matmul_forward(out.len(), inp.len(), weight.len(), bias_len, n, c, oc);
        if n == 0 {
            return Ok(());
        }
        let plan = blas::forward_plan(n, c, oc);
        if let Some(bias) = bias.filter(|_| self.bias_epilogue()) {
            if self.gemm::<T>(&plan, weight, inp, out, Some(bias), 0.0)? {
                return Ok(());
            }
        }
        let beta = match bias {
            Some(bias) => {
                self.bias_broadcast(out, bias, n, oc)?;
                1.0
            }
            None => 0.0,
        };
        self.gemm::<T>(&plan, weight, inp, out, None, beta)?;
        Ok(())
    }

    /// out[row] = bias for every row, for a GEMM to accumulate onto.
    fn bias_broadcast<T: GpuFloat>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        bias: &CudaView<'_, T>,
        n: usize,
        oc: usize,
    ) -> Result<(), KernelError> {
        let (n_, oc_) = (int(n, "N"), int(oc, "OC"));
        let name = T::ENTRIES.matmul_bias_forward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* out, const T* bias, int n, int oc)
        args.arg(&mut *out).arg(bias).arg(&n_).arg(&oc_);
        // SAFETY: the arguments match the signature; out is (N,OC) and bias (OC), asserted by
        // the caller.
        unsafe { args.launch(elementwise(n * oc)) }.map_err(launched(name))?;
        Ok(())
    }

    /// Runs one GEMM plan on views: A, B, D as in the plan, bias (one value per row of D) as a
    /// cuBLASLt epilogue. Returns false, having run nothing, when the bias cannot be fused.
    fn gemm<T: GpuFloat>(
        &self,
        plan: &blas::GemmPlan,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        d: &mut CudaViewMut<'_, T>,
        bias: Option<&CudaView<'_, T>>,
        beta: f32,
    ) -> Result<bool, KernelError> {
        let stream = self.stream();
        let (a_ptr, _a_guard) = a.device_ptr(stream);
        let (b_ptr, _b_guard) = b.device_ptr(stream);
        let bias_ptr = bias.map(|bias| bias.device_ptr(stream));
        let (d_ptr, _d_guard) = d.device_ptr_mut(stream);
        let ops = Operands {
            a: a_ptr,
            b: b_ptr,
            d: d_ptr,
        };
        // SAFETY: the views are live device buffers of T whose lengths the callers asserted
        // against the plan's shapes; D is a `&mut` view, so it overlaps none of the others;
        // the guards keep the stream ordering of cudarc's views until the GEMM is queued.
        unsafe {
            self.blas.matmul(
                stream,
                T::BLAS_TYPE,
                plan,
                ops,
                bias_ptr.as_ref().map(|(ptr, _)| *ptr),
                beta,
            )
        }
    }

    /// Accumulates: dinp (N,C) += dout·weight; dweight (OC,C) += doutᵀ·inp; dbias (OC) +=
    /// Σ_rows dout. dout (N,OC), inp (N,C), weight (OC,C). The GEMMs accumulate with beta = 1;
    /// dbias is a column sum in a fixed order (deterministic).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_backward<T: GpuFloat>(
        &self,
        dinp: &mut CudaViewMut<'_, T>,
        dweight: &mut CudaViewMut<'_, T>,
        dbias: Option<&mut CudaViewMut<'_, T>>,
        dout: &CudaView<'_, T>,
        inp: &CudaView<'_, T>,
        weight: &CudaView<'_, T>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<(), KernelError> {
        check_matmul_backward(
            dinp.len(),
            dweight.len(),
            dbias.as_ref().map(|dbias| dbias.len()),
            dout.len(),
            inp.len(),
            weight.len(),
            n,
            c,
            oc,
        );
        if n == 0 {
            return Ok(());
        }
        self.gemm::<T>(&blas::dinp_plan(n, c, oc), weight, dout, dinp, None, 1.0)?;
        self.gemm::<T>(&blas::dweight_plan(n, c, oc), inp, dout, dweight, None, 1.0)?;
        if let Some(dbias) = dbias {
            let (n_, oc_) = (int(n, "N"), int(oc, "OC"));
            let name = T::ENTRIES.matmul_bias_backward;
            let mut args = self.stream().launch_builder(self.function(name)?);
            // (T* dbias, const T* dout, int n, int oc)
            args.arg(dbias).arg(dout).arg(&n_).arg(&oc_);
            // SAFETY: the arguments match the signature; dbias (OC), dout (N,OC) asserted.
            unsafe { args.launch(columns(oc)) }.map_err(launched(name))?;
        }
        Ok(())
    }

    /// Causal multi-head self-attention. inp (B,T,3C) holds q,k,v (head h uses channels
    /// h*hs..(h+1)*hs of each, hs = C/NH); out (B,T,C); preatt and att (B,NH,T,T) are saved for
    /// backward (att = softmax of the scaled, causally masked preatt; 0 above the diagonal in
    /// both). T is at most [`ATTENTION_T_MAX`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward<T: GpuFloat>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        preatt: &mut CudaViewMut<'_, T>,
        att: &mut CudaViewMut<'_, T>,
        inp: &CudaView<'_, T>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<(), KernelError> {
        check_attention_forward(out.len(), preatt.len(), att.len(), inp.len(), b, t, c, nh);
        assert_attention_t_max("attention_forward", t);
        if b == 0 {
            return Ok(());
        }
        let (n_, t_, c_, nh_) = (int(b * t, "B*T"), int(t, "T"), int(c, "C"), int(nh, "NH"));
        let name = T::ENTRIES.attention_softmax_forward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* preatt, T* att, const T* qkv, int t_len, int c, int nh)
        args.arg(&mut *preatt).arg(&mut *att).arg(inp);
        args.arg(&t_).arg(&c_).arg(&nh_);
        // SAFETY: the arguments match the signature; one block per score row (B*NH*T), each
        // with T f32 of shared memory; every length asserted.
        unsafe { args.launch(rows(b * nh * t, score_row_bytes(t))) }.map_err(launched(name))?;
        let name = T::ENTRIES.attention_values_forward;
        let att = att.as_view();
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* out, const T* att, const T* qkv, int n, int t_len, int c, int nh)
        args.arg(&mut *out).arg(&att).arg(inp);
        args.arg(&n_).arg(&t_).arg(&c_).arg(&nh_);
        // SAFETY: the arguments match the signature; one thread per element of out (B*T*C).
        unsafe { args.launch(elementwise(b * t * c)) }.map_err(launched(name))?;
        Ok(())
    }

    /// dinp (B,T,3C) accumulates; dpreatt and datt (B,NH,T,T) are scratch this op overwrites
    /// entirely. dout (B,T,C); inp and att as given to and saved by
    /// [`Gpu::attention_forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<T: GpuFloat>(
        &self,
        dinp: &mut CudaViewMut<'_, T>,
        dpreatt: &mut CudaViewMut<'_, T>,
        datt: &mut CudaViewMut<'_, T>,
        dout: &CudaView<'_, T>,
        inp: &CudaView<'_, T>,
        att: &CudaView<'_, T>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<(), KernelError> {
        check_attention_backward(
            dinp.len(),
            dpreatt.len(),
            datt.len(),
            dout.len(),
            inp.len(),
            att.len(),
            b,
            t,
            c,
            nh,
        );
        assert_attention_t_max("attention_backward", t);
        if b == 0 {
            return Ok(());
        }
        let (n_, t_, c_, nh_) = (int(b * t, "B*T"), int(t, "T"), int(c, "C"), int(nh, "NH"));
        let name = T::ENTRIES.attention_scores_backward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* dpreatt, T* datt, const T* dout, const T* qkv, const T* att, int t_len, int c,
        //  int nh)
        args.arg(&mut *dpreatt)
            .arg(&mut *datt)
            .arg(dout)
            .arg(inp)
            .arg(att);
        args.arg(&t_).arg(&c_).arg(&nh_);
        // SAFETY: the arguments match the signature; one block per score row with T f32 of
        // shared memory; every length asserted.
        unsafe { args.launch(rows(b * nh * t, score_row_bytes(t))) }.map_err(launched(name))?;
        let name = T::ENTRIES.attention_qkv_backward;
        let dpreatt = dpreatt.as_view();
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* dinp, const T* dpreatt, const T* dout, const T* qkv, const T* att, int n,
        //  int t_len, int c, int nh)
        args.arg(&mut *dinp)
            .arg(&dpreatt)
            .arg(dout)
            .arg(inp)
            .arg(att);
        args.arg(&n_).arg(&t_).arg(&c_).arg(&nh_);
        // SAFETY: the arguments match the signature; one thread per element of dinp (B*T*3C).
        unsafe { args.launch(elementwise(b * t * 3 * c)) }.map_err(launched(name))?;
        Ok(())
    }

    /// GELU, tanh approximation. out and inp have the same length (any shape).
    pub fn gelu_forward<T: GpuFloat>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        inp: &CudaView<'_, T>,
    ) -> Result<(), KernelError> {
        check_gelu_forward(out.len(), inp.len());
        let n = out.len();
        let name = T::ENTRIES.gelu_forward;
        if n == 0 {
            return Ok(());
        }
        let n_ = u64_of(n);
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* out, const T* inp, unsigned long long n)
        args.arg(&mut *out).arg(inp).arg(&n_);
        // SAFETY: the arguments match the signature; both views hold n values.
        unsafe { args.launch(elementwise(n)) }.map_err(launched(name))?;
        Ok(())
    }

    /// dinp accumulates dout * gelu'(inp). All three have the same length.
    pub fn gelu_backward<T: GpuFloat>(
        &self,
        dinp: &mut CudaViewMut<'_, T>,
        inp: &CudaView<'_, T>,
        dout: &CudaView<'_, T>,
    ) -> Result<(), KernelError> {
        check_gelu_backward(dinp.len(), inp.len(), dout.len());
        let n = inp.len();
        if n == 0 {
            return Ok(());
        }
        let n_ = u64_of(n);
        let name = T::ENTRIES.gelu_backward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* dinp, const T* inp, const T* dout, unsigned long long n)
        args.arg(&mut *dinp).arg(inp).arg(dout).arg(&n_);
        // SAFETY: the arguments match the signature; all three views hold n values.
        unsafe { args.launch(elementwise(n)) }.map_err(launched(name))?;
        Ok(())
    }

    /// out = a + b. All three have the same length.
    pub fn residual_forward<T: GpuFloat>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
    ) -> Result<(), KernelError> {
        check_residual_forward(out.len(), a.len(), b.len());
        let n = out.len();
        if n == 0 {
            return Ok(());
        }
        let n_ = u64_of(n);
        let name = T::ENTRIES.residual_forward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* out, const T* a, const T* b, unsigned long long n)
        args.arg(&mut *out).arg(a).arg(b).arg(&n_);
        // SAFETY: the arguments match the signature; all three views hold n values.
        unsafe { args.launch(elementwise(n)) }.map_err(launched(name))?;
        Ok(())
    }

    /// da += dout; db += dout. All three have the same length.
    pub fn residual_backward<T: GpuFloat>(
        &self,
        da: &mut CudaViewMut<'_, T>,
        db: &mut CudaViewMut<'_, T>,
        dout: &CudaView<'_, T>,
    ) -> Result<(), KernelError> {
        check_residual_backward(da.len(), db.len(), dout.len());
        let n = dout.len();
        if n == 0 {
            return Ok(());
        }
        let n_ = u64_of(n);
        let name = T::ENTRIES.residual_backward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* da, T* db, const T* dout, unsigned long long n)
        args.arg(&mut *da).arg(&mut *db).arg(dout).arg(&n_);
        // SAFETY: the arguments match the signature; all three views hold n values.
        unsafe { args.launch(elementwise(n)) }.map_err(launched(name))?;
        Ok(())
    }

    /// Softmax over the first v columns of each row of logits (N,Vp) into probs (N,Vp) (padded
    /// columns 0); used for sampling.
    pub fn softmax_forward<T: GpuFloat>(
        &self,
        probs: &mut CudaViewMut<'_, T>,
        logits: &CudaView<'_, T>,
        n: usize,
        v: usize,
        vp: usize,
    ) -> Result<(), KernelError> {
        check_softmax_forward(probs.len(), logits.len(), n, v, vp);
        if n == 0 {
            return Ok(());
        }
        let (v_, vp_) = (int(v, "V"), int(vp, "Vp"));
        let name = T::ENTRIES.softmax_forward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* probs, const T* logits, int v, int vp)
        args.arg(&mut *probs).arg(logits).arg(&v_).arg(&vp_);
        // SAFETY: the arguments match the signature; one block per row of Vp values.
        unsafe { args.launch(rows(n, 0)) }.map_err(launched(name))?;
        Ok(())
    }

    /// logits (N,Vp), targets (N) < v; losses (N, f32) = `-log softmax(logits[row, ..v])[target]`.
    /// Padded columns v..Vp are ignored; a target >= v gives a NaN loss.
    pub fn softmax_crossentropy_forward<T: GpuFloat>(
        &self,
        losses: &mut CudaViewMut<'_, f32>,
        logits: &CudaView<'_, T>,
        targets: &CudaView<'_, u32>,
        n: usize,
        v: usize,
        vp: usize,
    ) -> Result<(), KernelError> {
        check_softmax_crossentropy_forward(losses.len(), logits.len(), targets.len(), n, v, vp);
        if n == 0 {
            return Ok(());
        }
        let (v_, vp_) = (int(v, "V"), int(vp, "Vp"));
        let name = T::ENTRIES.softmax_crossentropy_forward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (float* losses, const T* logits, const unsigned* targets, int v, int vp)
        args.arg(&mut *losses)
            .arg(logits)
            .arg(targets)
            .arg(&v_)
            .arg(&vp_);
        // SAFETY: the arguments match the signature; one block per row, lengths asserted.
        unsafe { args.launch(rows(n, 0)) }.map_err(launched(name))?;
        Ok(())
    }

    /// The fused pass used in training: reads logits (N,Vp), writes losses (N, f32) like the
    /// forward, and overwrites logits IN PLACE with dlogits = dloss * (softmax -
    /// onehot(target)) for columns < v and 0 for padded columns. A target >= v gives NaN.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_crossentropy_backward<T: GpuFloat>(
        &self,
        logits_to_dlogits: &mut CudaViewMut<'_, T>,
        losses: &mut CudaViewMut<'_, f32>,
        targets: &CudaView<'_, u32>,
        dloss: f32,
        n: usize,
        v: usize,
        vp: usize,
    ) -> Result<(), KernelError> {
        check_softmax_crossentropy_backward(
            logits_to_dlogits.len(),
            losses.len(),
            targets.len(),
            n,
            v,
            vp,
        );
        if n == 0 {
            return Ok(());
        }
        let (v_, vp_) = (int(v, "V"), int(vp, "Vp"));
        let name = T::ENTRIES.softmax_crossentropy_backward;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (T* logits_to_dlogits, float* losses, const unsigned* targets, float dloss, int v,
        //  int vp)
        args.arg(&mut *logits_to_dlogits)
            .arg(&mut *losses)
            .arg(targets);
        args.arg(&dloss).arg(&v_).arg(&vp_);
        // SAFETY: the arguments match the signature; one block per row, lengths asserted.
        unsafe { args.launch(rows(n, 0)) }.map_err(launched(name))?;
        Ok(())
    }

    /// Decoupled AdamW on f32 master weights, the CPU reference's formula; the bias
    /// corrections are computed in f64 as there. All four views have the same length.
    pub fn adamw_update(
        &self,
        params: &mut CudaViewMut<'_, f32>,
        grads: &CudaView<'_, f32>,
        m: &mut CudaViewMut<'_, f32>,
        v: &mut CudaViewMut<'_, f32>,
        hp: &AdamW,
    ) -> Result<(), KernelError> {
        check_adamw_update(params.len(), grads.len(), m.len(), v.len(), hp.step);
        let len = params.len();
        if len == 0 {
            return Ok(());
        }
        let correction1 = (1.0 - f64::from(hp.beta1).powf(hp.step as f64)) as f32;
        let correction2 = (1.0 - f64::from(hp.beta2).powf(hp.step as f64)) as f32;
        let n_ = u64_of(len);
        let name = f32_only::ADAMW_UPDATE;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (float* params, const float* grads, float* m, float* v, unsigned long long n,
        //  float lr, float beta1, float beta2, float eps, float weight_decay,
        //  float correction1, float correction2)
        args.arg(&mut *params)
            .arg(grads)
            .arg(&mut *m)
            .arg(&mut *v)
            .arg(&n_);
        args.arg(&hp.lr).arg(&hp.beta1).arg(&hp.beta2).arg(&hp.eps);
        args.arg(&hp.weight_decay)
            .arg(&correction1)
            .arg(&correction2);
        // SAFETY: the arguments match the signature; all four views hold n values.
        unsafe { args.launch(elementwise(len)) }.map_err(launched(name))?;
        Ok(())
    }

    /// Sum of squares of x as f64, bit-identical from run to run: fixed chunks (their size a
    /// function of the length alone) are summed on the device, in a fixed tree order within
    /// each, and the partial sums are added on the host in chunk order. Waits for the GPU.
    pub fn global_norm_squared(&self, x: &CudaView<'_, f32>) -> Result<f64, KernelError> {
        let len = x.len();
        if len == 0 {
            return Ok(0.0);
        }
        let chunk = NORM_CHUNK_MIN.max(len.div_ceil(NORM_BLOCKS_MAX));
        let blocks = len.div_ceil(chunk);
        // A poisoned lock only means another thread panicked mid-call; the buffers stay valid.
        let mut scratch = self.norm.lock().unwrap_or_else(|e| e.into_inner());
        let scratch = &mut *scratch;
        let (n_, chunk_) = (u64_of(len), u64_of(chunk));
        let name = f32_only::GLOBAL_NORM_SQUARED;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (double* partials, const float* x, unsigned long long n, unsigned long long chunk)
        args.arg(&mut scratch.device).arg(x).arg(&n_).arg(&chunk_);
        let config = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the signature; `blocks` <= NORM_BLOCKS_MAX partials
        // fit the buffer, and each block reads its chunk of x only up to n.
        unsafe { args.launch(config) }.map_err(launched(name))?;
        let partials = &mut scratch.host[..blocks];
        self.stream()
            .memcpy_dtoh(&scratch.device.slice(..blocks), partials)
            .map_err(driver("downloading the norm's partial sums"))?;
        self.synchronize()?;
        Ok(partials.iter().fold(0.0, |acc, &p| acc + p))
    }

    /// Multiplies x by s in place (used for gradient clipping).
    pub fn scale(&self, x: &mut CudaViewMut<'_, f32>, s: f32) -> Result<(), KernelError> {
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let n_ = u64_of(n);
        let name = f32_only::SCALE;
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (float* x, unsigned long long n, float s)
        args.arg(&mut *x).arg(&n_).arg(&s);
        // SAFETY: the arguments match the signature; x holds n values.
        unsafe { args.launch(elementwise(n)) }.map_err(launched(name))?;
        Ok(())
    }

    /// out = inp rounded to bf16 (to nearest, ties to even). Same lengths.
    pub fn cast_f32_to_bf16(
        &self,
        out: &mut CudaViewMut<'_, bf16>,
        inp: &CudaView<'_, f32>,
    ) -> Result<(), KernelError> {
        self.cast(f32_only::CAST_F32_TO_BF16, out, inp)
    }

    /// out = inp widened to f32 (exact). Same lengths.
    pub fn cast_bf16_to_f32(
        &self,
        out: &mut CudaViewMut<'_, f32>,
        inp: &CudaView<'_, bf16>,
    ) -> Result<(), KernelError> {
        self.cast(f32_only::CAST_BF16_TO_F32, out, inp)
    }

    fn cast<O, I>(
        &self,
        name: &'static str,
        out: &mut CudaViewMut<'_, O>,
        inp: &CudaView<'_, I>,
    ) -> Result<(), KernelError> {
        assert_eq!(
            out.len(),
            inp.len(),
            "{name}: out and inp must have the same length"
        );
        let n = out.len();
        if n == 0 {
            return Ok(());
        }
        let n_ = u64_of(n);
        let mut args = self.stream().launch_builder(self.function(name)?);
        // (O* out, const I* inp, unsigned long long n), O and I being the cast's two types.
        args.arg(&mut *out).arg(inp).arg(&n_);
        // SAFETY: the callers pair each kernel with its element types; both views hold n
        // values.
        unsafe { args.launch(elementwise(n)) }.map_err(launched(name))?;
        Ok(())
    }
}

/// Dynamic shared memory of the attention kernels: one score row of T f32.
fn score_row_bytes(t: usize) -> u32 {
    (t * std::mem::size_of::<f32>()) as u32
}

/// The attention ops' own limit on T, on top of the CPU kernels' shape checks.
fn assert_attention_t_max(what: &str, t: usize) {
    assert!(
        t <= ATTENTION_T_MAX,
        "{what}: T = {t} is beyond the kernels' {ATTENTION_T_MAX}"
    );
}
