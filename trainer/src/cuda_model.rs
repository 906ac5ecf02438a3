//! The GPT-2 model on the CUDA backend (feature `cuda`): the same forward, fused loss and
//! backward as `model.rs`, op for op, on device buffers allocated once for a maximum (B, T).
//!
//! Parameters arrive from the host once per step and gradients go back once per step; the
//! collectives work on the host copies, as on the CPU backend, and the optimizer shard with
//! its checkpoint snapshot lives on the device (`cuda_shard.rs`).
//!
//! Shapes: B batch, T sequence, C channels, NH heads, V vocab, Vp padded vocab, L layers.

use crate::config::ModelConfig;
use crate::layout::Layout;
use crate::{Result, TrainError};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, DriverError, ValidAsZeroBits};
use lazarus_kernels::cuda::{bf16, Gpu, GpuFloat};
use lazarus_kernels::KernelError;
use std::ops::Range;

/// The element type the model's parameters, gradients and activations are stored in on the
/// device: `f32`, or `bf16` (mixed precision: the master weights and AdamW state stay f32 in
/// the optimizer shard, every kernel computes and accumulates in f32). LayerNorm statistics
/// and the per-token losses are f32 either way.
pub trait Precision: GpuFloat {
    /// The name of the precision in configs and logs.
    const NAME: &'static str;

    /// f32 staging values needed to move `n` values to or from the host.
    fn staging_len(n: usize) -> usize;

    /// Copies host f32 values into `dst` (rounding to `Self`), through `staging`.
    fn upload(
        gpu: &Gpu,
        src: &[f32],
        staging: &mut CudaSlice<f32>,
        dst: &mut CudaSlice<Self>,
    ) -> Result<()>;

    /// Copies `src` widened to f32 into the host's `dst`, through `staging`.
    fn download(
        gpu: &Gpu,
        src: &CudaSlice<Self>,
        staging: &mut CudaSlice<f32>,
        dst: &mut [f32],
    ) -> Result<()>;
}

impl Precision for f32 {
    const NAME: &'static str = "f32";

    fn staging_len(_n: usize) -> usize {
        0
    }

    fn upload(
        gpu: &Gpu,
        src: &[f32],
        _: &mut CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
    ) -> Result<()> {
        gpu.stream()
            .memcpy_htod(src, &mut dst.slice_mut(..src.len()))
            .map_err(driver("uploading the parameters"))
    }

    fn download(
        gpu: &Gpu,
        src: &CudaSlice<f32>,
        _: &mut CudaSlice<f32>,
        dst: &mut [f32],
    ) -> Result<()> {
        gpu.stream()
            .memcpy_dtoh(&src.slice(..dst.len()), dst)
            .map_err(driver("downloading the gradients"))
    }
}

impl Precision for bf16 {
    const NAME: &'static str = "bf16";

    fn staging_len(n: usize) -> usize {
        n
    }

    fn upload(
        gpu: &Gpu,
        src: &[f32],
        staging: &mut CudaSlice<f32>,
        dst: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        let n = src.len();
        gpu.stream()
            .memcpy_htod(src, &mut staging.slice_mut(..n))
            .map_err(driver("uploading the parameters"))?;
        gpu.cast_f32_to_bf16(&mut dst.slice_mut(..n), &staging.slice(..n))
            .map_err(TrainError::Kernel)
    }

    fn download(
        gpu: &Gpu,
        src: &CudaSlice<bf16>,
        staging: &mut CudaSlice<f32>,
        dst: &mut [f32],
    ) -> Result<()> {
        let n = dst.len();
        gpu.cast_bf16_to_f32(&mut staging.slice_mut(..n), &src.slice(..n))
            .map_err(TrainError::Kernel)?;
        gpu.stream()
            .memcpy_dtoh(&staging.slice(..n), dst)
            .map_err(driver("downloading the gradients"))
    }
}

/// What the trainer needs of a model on the GPU, whatever its precision.
pub trait DeviceModel {
    /// The GPU the model runs on.
    fn gpu(&self) -> &Gpu;
    /// The device's name and the precision, for logs.
    fn describe(&self) -> String;
    /// Copies the host's f32 parameters to the device (rounding to the model's precision).
    fn load_params(&mut self, params: &[f32]) -> Result<()>;
    /// Zeroes the device gradients.
    fn zero_grads(&mut self) -> Result<()>;
    /// Copies the device gradients, widened to f32, to the host.
    fn read_grads(&mut self, grads: &mut [f32]) -> Result<()>;
    /// Forward, fused loss and backward; the sum of the per-token losses.
    fn forward_backward(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        dloss: f32,
    ) -> Result<f64>;
    /// Forward and loss only; the sum of the per-token losses.
    fn loss_sum(&mut self, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> Result<f64>;
}

impl<T: Precision> DeviceModel for CudaGpt<T> {
    fn gpu(&self) -> &Gpu {
        CudaGpt::gpu(self)
    }
    fn describe(&self) -> String {
        format!("{}, {}", self.device_name(), T::NAME)
    }
    fn load_params(&mut self, params: &[f32]) -> Result<()> {
        CudaGpt::load_params(self, params)
    }
    fn zero_grads(&mut self) -> Result<()> {
        CudaGpt::zero_grads(self)
    }
    fn read_grads(&mut self, grads: &mut [f32]) -> Result<()> {
        CudaGpt::read_grads(self, grads)
    }
    fn forward_backward(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        dloss: f32,
    ) -> Result<f64> {
        CudaGpt::forward_backward(self, inputs, targets, b, t, dloss)
    }
    fn loss_sum(&mut self, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> Result<f64> {
        CudaGpt::loss_sum(self, inputs, targets, b, t)
    }
}

/// Saved activations of one block on the device, each sized for (B, T) at capacity.
struct DevBlock<T: GpuFloat> {
    ln1: CudaSlice<T>,        // (B,T,C)
    ln1_mean: CudaSlice<f32>, // (B,T)
    ln1_rstd: CudaSlice<f32>, // (B,T)
    qkv: CudaSlice<T>,        // (B,T,3C)
    atty: CudaSlice<T>,       // (B,T,C)
    att: CudaSlice<T>,        // (B,NH,T,T)
    attproj: CudaSlice<T>,    // (B,T,C)
    res2: CudaSlice<T>,       // (B,T,C)
    ln2: CudaSlice<T>,        // (B,T,C)
    ln2_mean: CudaSlice<f32>, // (B,T)
    ln2_rstd: CudaSlice<f32>, // (B,T)
    fch: CudaSlice<T>,        // (B,T,4C)
    fch_gelu: CudaSlice<T>,   // (B,T,4C)
    fcproj: CudaSlice<T>,     // (B,T,C)
    res3: CudaSlice<T>,       // (B,T,C)
}

/// Backward scratch on the device; see `model.rs` for the role of each buffer.
struct DevScratch<T: GpuFloat> {
    preatt: CudaSlice<T>,    // (B,NH,T,T)
    dres: CudaSlice<T>,      // (B,T,C)
    dln: CudaSlice<T>,       // (B,T,C)
    datty: CudaSlice<T>,     // (B,T,C)
    dqkv: CudaSlice<T>,      // (B,T,3C)
    dpreatt: CudaSlice<T>,   // (B,NH,T,T)
    datt: CudaSlice<T>,      // (B,NH,T,T)
    dfch: CudaSlice<T>,      // (B,T,4C)
    dfch_gelu: CudaSlice<T>, // (B,T,4C)
}

/// The model's compute state on one GPU for batches of at most `max_b` x `max_t` tokens.
pub struct CudaGpt<T: Precision = f32> {
    gpu: Gpu,
    pub config: ModelConfig,
    pub layout: Layout,
    max_b: usize,
    max_t: usize,
    /// Parameters (layout.total), uploaded by `load_params`.
    params: CudaSlice<T>,
    /// Gradients (layout.total), zeroed by `zero_grads`, read back by `read_grads`.
    grads: CudaSlice<T>,
    /// f32 values on their way between the host and `params`/`grads` when `T` is narrower.
    staging: CudaSlice<f32>,
    tokens: CudaSlice<u32>,  // (B,T)
    targets: CudaSlice<u32>, // (B,T)
    encoded: CudaSlice<T>,   // (B,T,C)
    blocks: Vec<DevBlock<T>>,
    lnf: CudaSlice<T>,        // (B,T,C)
    lnf_mean: CudaSlice<f32>, // (B,T)
    lnf_rstd: CudaSlice<f32>, // (B,T)
    logits: CudaSlice<T>,     // (B,T,Vp); dlogits after the fused loss
    losses: CudaSlice<f32>,   // (B,T)
    sc: DevScratch<T>,
    /// Host copy of the per-token losses, summed in f64 on the host.
    losses_host: Vec<f32>,
}

/// A driver error as the trainer's error, naming what was being done.
pub(crate) fn driver(what: &str) -> impl FnOnce(DriverError) -> TrainError + '_ {
    move |e| TrainError::Kernel(KernelError::Cuda(format!("{what}: {e:?}")))
}

impl<T: Precision> CudaGpt<T> {
    /// Allocates every device buffer for batches up to (max_b, max_t). Nothing is allocated
    /// afterwards.
    pub fn new(gpu: Gpu, config: ModelConfig, max_b: usize, max_t: usize) -> Result<Self> {
        assert!(
            max_t <= config.block_size,
            "T beyond the model's block size"
        );
        let layout = Layout::gpt2(&config);
        let (c, nh, vp) = (config.channels, config.heads, config.padded_vocab);
        let bt = max_b * max_t;
        let att = max_b * nh * max_t * max_t;
        let f = |n: usize| gpu.zeros_f32(n).map_err(TrainError::Kernel);
        let u = |n: usize| gpu.zeros_u32(n).map_err(TrainError::Kernel);
        let x = |n: usize| gpu.zeros::<T>(n).map_err(TrainError::Kernel);
        let mut blocks = Vec::with_capacity(config.layers);
        for _ in 0..config.layers {
            blocks.push(DevBlock {
                ln1: x(bt * c)?,
                ln1_mean: f(bt)?,
                ln1_rstd: f(bt)?,
                qkv: x(bt * 3 * c)?,
                atty: x(bt * c)?,
                att: x(att)?,
                attproj: x(bt * c)?,
                res2: x(bt * c)?,
                ln2: x(bt * c)?,
                ln2_mean: f(bt)?,
                ln2_rstd: f(bt)?,
                fch: x(bt * 4 * c)?,
                fch_gelu: x(bt * 4 * c)?,
                fcproj: x(bt * c)?,
                res3: x(bt * c)?,
            });
        }
        let sc = DevScratch {
            preatt: x(att)?,
            dres: x(bt * c)?,
            dln: x(bt * c)?,
            datty: x(bt * c)?,
            dqkv: x(bt * 3 * c)?,
            dpreatt: x(att)?,
            datt: x(att)?,
            dfch: x(bt * 4 * c)?,
            dfch_gelu: x(bt * 4 * c)?,
        };
        Ok(CudaGpt {
            params: x(layout.total)?,
            // At least one value: a zero-byte allocation is an error on some drivers.
            staging: f(T::staging_len(layout.total).max(1))?,
            grads: x(layout.total)?,
            tokens: u(bt)?,
            targets: u(bt)?,
            encoded: x(bt * c)?,
            blocks,
            lnf: x(bt * c)?,
            lnf_mean: f(bt)?,
            lnf_rstd: f(bt)?,
            logits: x(bt * vp)?,
            losses: f(bt)?,
            sc,
            losses_host: vec![0.0; bt],
            layout,
            config,
            max_b,
            max_t,
            gpu,
        })
    }

    /// Bytes allocated on the device besides the parameters, the gradients and their staging
    /// (what `estimate::cuda_activation_bytes` predicts).
    pub fn activation_bytes(&self) -> usize {
        let sc = &self.sc;
        let mut wide = vec![&self.lnf_mean, &self.lnf_rstd, &self.losses];
        let mut narrow = vec![
            &self.encoded,
            &self.lnf,
            &self.logits,
            &sc.preatt,
            &sc.dres,
            &sc.dln,
            &sc.datty,
            &sc.dqkv,
            &sc.dpreatt,
            &sc.datt,
            &sc.dfch,
            &sc.dfch_gelu,
        ];
        for a in &self.blocks {
            wide.extend([&a.ln1_mean, &a.ln1_rstd, &a.ln2_mean, &a.ln2_rstd]);
            narrow.extend([
                &a.ln1,
                &a.qkv,
                &a.atty,
                &a.att,
                &a.attproj,
                &a.res2,
                &a.ln2,
                &a.fch,
                &a.fch_gelu,
                &a.fcproj,
                &a.res3,
            ]);
        }
        let wide: usize = wide.iter().map(|x| x.len()).sum();
        let narrow: usize = narrow.iter().map(|x| x.len()).sum();
        let tokens = self.tokens.len() + self.targets.len();
        4 * (wide + tokens) + std::mem::size_of::<T>() * narrow
    }

    /// The GPU the model runs on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The device's name, for logs.
    pub fn device_name(&self) -> &str {
        &self.gpu.info().name
    }

    /// Copies the host parameters (at least `layout.total` values) to the device.
    pub fn load_params(&mut self, params: &[f32]) -> Result<()> {
        let total = self.layout.total;
        assert!(params.len() >= total, "parameter buffer too short");
        T::upload(
            &self.gpu,
            &params[..total],
            &mut self.staging,
            &mut self.params,
        )
    }

    /// Zeroes the device gradients (once per optimizer step; micro-batches accumulate).
    pub fn zero_grads(&mut self) -> Result<()> {
        self.gpu
            .stream()
            .memset_zeros(&mut self.grads)
            .map_err(driver("zeroing the gradients"))
    }

    /// Copies the device gradients into the first `layout.total` values of `grads`.
    pub fn read_grads(&mut self, grads: &mut [f32]) -> Result<()> {
        let total = self.layout.total;
        assert!(grads.len() >= total, "gradient buffer too short");
        T::download(
            &self.gpu,
            &self.grads,
            &mut self.staging,
            &mut grads[..total],
        )
    }

    /// Forward plus loss: the sum of per-token cross-entropy losses over the batch.
    pub fn loss_sum(&mut self, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> Result<f64> {
        self.forward(inputs, b, t)?;
        self.upload_targets(targets)?;
        let (n, v, vp) = (b * t, self.config.vocab, self.config.padded_vocab);
        self.gpu.softmax_crossentropy_forward(
            &mut self.losses.slice_mut(..n),
            &self.logits.slice(..n * vp),
            &self.targets.slice(..n),
            n,
            v,
            vp,
        )?;
        self.sum_losses(n)
    }

    /// Forward, fused loss and backward: adds d(dloss * sum of losses)/dparams into the device
    /// gradients. Returns the sum of the per-token losses.
    pub fn forward_backward(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        dloss: f32,
    ) -> Result<f64> {
        self.forward(inputs, b, t)?;
        self.upload_targets(targets)?;
        let (n, v, vp, c) = (
            b * t,
            self.config.vocab,
            self.config.padded_vocab,
            self.config.channels,
        );
        self.gpu.softmax_crossentropy_backward(
            &mut self.logits.slice_mut(..n * vp),
            &mut self.losses.slice_mut(..n),
            &self.targets.slice(..n),
            dloss,
            n,
            v,
            vp,
        )?;
        let loss = self.sum_losses(n)?;
        let lay = &self.layout;
        let (gpu, sc) = (&self.gpu, &mut self.sc);
        // Head: the logits buffer holds dlogits; wte is tied, so its gradient gets both the
        // head's and the embedding's contributions.
        zero(gpu, &mut sc.dln.slice_mut(..n * c))?;
        gpu.matmul_backward(
            &mut sc.dln.slice_mut(..n * c),
            &mut self.grads.slice_mut(lay.wte.clone()),
            None,
            &self.logits.slice(..n * vp),
            &self.lnf.slice(..n * c),
            &self.params.slice(lay.wte.clone()),
            n,
            c,
            vp,
        )?;
        zero(gpu, &mut sc.dres.slice_mut(..n * c))?;
        let last = match self.blocks.last() {
            Some(a) => a.res3.slice(..n * c),
            None => self.encoded.slice(..n * c),
        };
        with_two_mut(
            &mut self.grads,
            &lay.lnf_w,
            &lay.lnf_b,
            |dw, db| -> Result<()> {
                gpu.layernorm_backward(
                    &mut sc.dres.slice_mut(..n * c),
                    dw,
                    db,
                    &sc.dln.slice(..n * c),
                    &last,
                    &self.params.slice(lay.lnf_w.clone()),
                    &self.lnf_mean.slice(..n),
                    &self.lnf_rstd.slice(..n),
                    n,
                    c,
                )?;
                Ok(())
            },
        )?;
        for l in (0..self.config.layers).rev() {
            let residual = if l == 0 {
                self.encoded.slice(..n * c)
            } else {
                self.blocks[l - 1].res3.slice(..n * c)
            };
            block_backward(
                gpu,
                &self.config,
                lay,
                l,
                &self.blocks[l],
                sc,
                &residual,
                &self.params,
                &mut self.grads,
                b,
                t,
            )?;
        }
        let tokens = self.tokens.slice(..n);
        with_two_mut(&mut self.grads, &lay.wte, &lay.wpe, |dwte, dwpe| {
            gpu.encoder_backward(dwte, dwpe, &sc.dres.slice(..n * c), &tokens, b, t, c)
                .map_err(TrainError::Kernel)
        })?;
        Ok(loss)
    }

    fn upload_targets(&mut self, targets: &[u32]) -> Result<()> {
        let n = targets.len();
        self.gpu
            .stream()
            .memcpy_htod(targets, &mut self.targets.slice_mut(..n))
            .map_err(driver("uploading the targets"))
    }

    /// Sums the first `n` per-token losses on the host in f64, in token order, like the CPU.
    fn sum_losses(&mut self, n: usize) -> Result<f64> {
        self.gpu
            .stream()
            .memcpy_dtoh(&self.losses.slice(..n), &mut self.losses_host[..n])
            .map_err(driver("downloading the losses"))?;
        Ok(self.losses_host[..n].iter().map(|&x| x as f64).sum())
    }

    /// Forward pass over `inputs` (B,T); leaves the logits (B,T,Vp) on the device.
    fn forward(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<()> {
        assert!(b <= self.max_b && t <= self.max_t && inputs.len() == b * t);
        let (c, nh, vp) = (
            self.config.channels,
            self.config.heads,
            self.config.padded_vocab,
        );
        let n = b * t;
        let gpu = &self.gpu;
        gpu.stream()
            .memcpy_htod(inputs, &mut self.tokens.slice_mut(..n))
            .map_err(driver("uploading the tokens"))?;
        let lay = &self.layout;
        let params = &self.params;
        let p = |r: &Range<usize>| params.slice(r.clone());
        gpu.encoder_forward(
            &mut self.encoded.slice_mut(..n * c),
            &self.tokens.slice(..n),
            &p(&lay.wte),
            &p(&lay.wpe),
            b,
            t,
            c,
        )?;
        for l in 0..self.config.layers {
            let (done, rest) = self.blocks.split_at_mut(l);
            let a = &mut rest[0];
            let residual = if l == 0 {
                self.encoded.slice(..n * c)
            } else {
                done[l - 1].res3.slice(..n * c)
            };
            let w = &lay.blocks[l];
            gpu.layernorm_forward(
                &mut a.ln1.slice_mut(..n * c),
                &mut a.ln1_mean.slice_mut(..n),
                &mut a.ln1_rstd.slice_mut(..n),
                &residual,
                &p(&w.ln1_w),
                &p(&w.ln1_b),
                n,
                c,
            )?;
            gpu.matmul_forward(
                &mut a.qkv.slice_mut(..n * 3 * c),
                &a.ln1.slice(..n * c),
                &p(&w.qkv_w),
                Some(&p(&w.qkv_b)),
                n,
                c,
                3 * c,
            )?;
            let att_len = b * nh * t * t;
            gpu.attention_forward(
                &mut a.atty.slice_mut(..n * c),
                &mut self.sc.preatt.slice_mut(..att_len),
                &mut a.att.slice_mut(..att_len),
                &a.qkv.slice(..n * 3 * c),
                b,
                t,
                c,
                nh,
            )?;
            gpu.matmul_forward(
                &mut a.attproj.slice_mut(..n * c),
                &a.atty.slice(..n * c),
                &p(&w.attproj_w),
                Some(&p(&w.attproj_b)),
                n,
                c,
                c,
            )?;
            gpu.residual_forward(
                &mut a.res2.slice_mut(..n * c),
                &residual,
                &a.attproj.slice(..n * c),
            )?;
            gpu.layernorm_forward(
                &mut a.ln2.slice_mut(..n * c),
                &mut a.ln2_mean.slice_mut(..n),
                &mut a.ln2_rstd.slice_mut(..n),
                &a.res2.slice(..n * c),
                &p(&w.ln2_w),
                &p(&w.ln2_b),
                n,
                c,
            )?;
            gpu.matmul_forward(
                &mut a.fch.slice_mut(..n * 4 * c),
                &a.ln2.slice(..n * c),
                &p(&w.fc_w),
                Some(&p(&w.fc_b)),
                n,
                c,
                4 * c,
            )?;
            gpu.gelu_forward(
                &mut a.fch_gelu.slice_mut(..n * 4 * c),
                &a.fch.slice(..n * 4 * c),
            )?;
            gpu.matmul_forward(
                &mut a.fcproj.slice_mut(..n * c),
                &a.fch_gelu.slice(..n * 4 * c),
                &p(&w.fcproj_w),
                Some(&p(&w.fcproj_b)),
                n,
                4 * c,
                c,
            )?;
            gpu.residual_forward(
                &mut a.res3.slice_mut(..n * c),
                &a.res2.slice(..n * c),
                &a.fcproj.slice(..n * c),
            )?;
        }
        let last = match self.blocks.last() {
            Some(a) => a.res3.slice(..n * c),
            None => self.encoded.slice(..n * c),
        };
        gpu.layernorm_forward(
            &mut self.lnf.slice_mut(..n * c),
            &mut self.lnf_mean.slice_mut(..n),
            &mut self.lnf_rstd.slice_mut(..n),
            &last,
            &p(&lay.lnf_w),
            &p(&lay.lnf_b),
            n,
            c,
        )?;
        gpu.matmul_forward(
            &mut self.logits.slice_mut(..n * vp),
            &self.lnf.slice(..n * c),
            &p(&lay.wte),
            None,
            n,
            c,
            vp,
        )?;
        Ok(())
    }
}

/// Zeroes a device view.
fn zero<T: DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, view: &mut CudaViewMut<'_, T>) -> Result<()> {
    gpu.stream()
        .memset_zeros(view)
        .map_err(driver("zeroing a gradient buffer"))
}

/// Runs `f` with mutable views of two disjoint ranges of `buf` (in either order). The
/// backward kernels of a linear or LayerNorm layer write the weight and the bias gradient at
/// once, and cudarc hands out two mutable views of one buffer only through a split.
fn with_two_mut<R, T: DeviceRepr>(
    buf: &mut CudaSlice<T>,
    a: &Range<usize>,
    b: &Range<usize>,
    f: impl FnOnce(&mut CudaViewMut<'_, T>, &mut CudaViewMut<'_, T>) -> Result<R>,
) -> Result<R> {
    if a.start <= b.start {
        assert!(a.end <= b.start, "overlapping gradient ranges");
        let (mut lo, mut hi) = buf.split_at_mut(b.start);
        let (mut x, mut y) = (lo.slice_mut(a.clone()), hi.slice_mut(..b.len()));
        f(&mut x, &mut y)
    } else {
        assert!(b.end <= a.start, "overlapping gradient ranges");
        let (mut lo, mut hi) = buf.split_at_mut(a.start);
        let (mut y, mut x) = (lo.slice_mut(b.clone()), hi.slice_mut(..a.len()));
        f(&mut x, &mut y)
    }
}

/// Backward through block `l`: `sc.dres` holds d(block output) on entry and d(block input)
/// on exit. The same sequence of ops as the CPU model's `block_backward`.
#[allow(clippy::too_many_arguments)]
fn block_backward<T: GpuFloat>(
    gpu: &Gpu,
    cfg: &ModelConfig,
    lay: &Layout,
    l: usize,
    a: &DevBlock<T>,
    sc: &mut DevScratch<T>,
    residual: &CudaView<'_, T>,
    params: &CudaSlice<T>,
    grads: &mut CudaSlice<T>,
    b: usize,
    t: usize,
) -> Result<()> {
    let (c, nh) = (cfg.channels, cfg.heads);
    let n = b * t;
    let w = &lay.blocks[l];
    let p = |r: &Range<usize>| params.slice(r.clone());
    // MLP: res3 = res2 + fcproj(gelu(fc(ln2(res2)))).
    zero(gpu, &mut sc.dfch_gelu.slice_mut(..n * 4 * c))?;
    with_two_mut(grads, &w.fcproj_w, &w.fcproj_b, |dw, db| {
        gpu.matmul_backward(
            &mut sc.dfch_gelu.slice_mut(..n * 4 * c),
            dw,
            Some(db),
            &sc.dres.slice(..n * c),
            &a.fch_gelu.slice(..n * 4 * c),
            &p(&w.fcproj_w),
            n,
            4 * c,
            c,
        )
        .map_err(TrainError::Kernel)
    })?;
    zero(gpu, &mut sc.dfch.slice_mut(..n * 4 * c))?;
    gpu.gelu_backward(
        &mut sc.dfch.slice_mut(..n * 4 * c),
        &a.fch.slice(..n * 4 * c),
        &sc.dfch_gelu.slice(..n * 4 * c),
    )?;
    zero(gpu, &mut sc.dln.slice_mut(..n * c))?;
    with_two_mut(grads, &w.fc_w, &w.fc_b, |dw, db| {
        gpu.matmul_backward(
            &mut sc.dln.slice_mut(..n * c),
            dw,
            Some(db),
            &sc.dfch.slice(..n * 4 * c),
            &a.ln2.slice(..n * c),
            &p(&w.fc_w),
            n,
            c,
            4 * c,
        )
        .map_err(TrainError::Kernel)
    })?;
    with_two_mut(grads, &w.ln2_w, &w.ln2_b, |dw, db| {
        gpu.layernorm_backward(
            &mut sc.dres.slice_mut(..n * c),
            dw,
            db,
            &sc.dln.slice(..n * c),
            &a.res2.slice(..n * c),
            &p(&w.ln2_w),
            &a.ln2_mean.slice(..n),
            &a.ln2_rstd.slice(..n),
            n,
            c,
        )
        .map_err(TrainError::Kernel)
    })?;
    // Attention: res2 = residual + attproj(attention(qkv(ln1(residual)))).
    zero(gpu, &mut sc.datty.slice_mut(..n * c))?;
    with_two_mut(grads, &w.attproj_w, &w.attproj_b, |dw, db| {
        gpu.matmul_backward(
            &mut sc.datty.slice_mut(..n * c),
            dw,
            Some(db),
            &sc.dres.slice(..n * c),
            &a.atty.slice(..n * c),
            &p(&w.attproj_w),
            n,
            c,
            c,
        )
        .map_err(TrainError::Kernel)
    })?;
    let att_len = b * nh * t * t;
    zero(gpu, &mut sc.dqkv.slice_mut(..n * 3 * c))?;
    gpu.attention_backward(
        &mut sc.dqkv.slice_mut(..n * 3 * c),
        &mut sc.dpreatt.slice_mut(..att_len),
        &mut sc.datt.slice_mut(..att_len),
        &sc.datty.slice(..n * c),
        &a.qkv.slice(..n * 3 * c),
        &a.att.slice(..att_len),
        b,
        t,
        c,
        nh,
    )?;
    zero(gpu, &mut sc.dln.slice_mut(..n * c))?;
    with_two_mut(grads, &w.qkv_w, &w.qkv_b, |dw, db| {
        gpu.matmul_backward(
            &mut sc.dln.slice_mut(..n * c),
            dw,
            Some(db),
            &sc.dqkv.slice(..n * 3 * c),
            &a.ln1.slice(..n * c),
            &p(&w.qkv_w),
            n,
            c,
            3 * c,
        )
        .map_err(TrainError::Kernel)
    })?;
    with_two_mut(grads, &w.ln1_w, &w.ln1_b, |dw, db| {
        gpu.layernorm_backward(
            &mut sc.dres.slice_mut(..n * c),
            dw,
            db,
            &sc.dln.slice(..n * c),
            residual,
            &p(&w.ln1_w),
            &a.ln1_mean.slice(..n),
            &a.ln1_rstd.slice(..n),
            n,
            c,
        )
        .map_err(TrainError::Kernel)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    //! The CUDA model against the CPU model on one tiny GPT-2: the loss and every gradient.
    //! Skipped (and saying so) where no GPU is usable, unless LAZARUS_REQUIRE_GPU=1.

    use super::*;
    use crate::model::{init_params, Gpt};

    /// Relative tolerance of the f32 loss sum and of each gradient, measured against the
    /// largest magnitude in its tensor: the summation orders of the two backends differ.
    const LOSS_REL_TOL: f64 = 1e-5;
    const GRAD_REL_TOL: f32 = 1e-4;

    /// GPU 0, or `None` (saying so) where no GPU is usable; a panic under
    /// LAZARUS_REQUIRE_GPU=1.
    pub(crate) fn gpu_or_skip() -> Option<Gpu> {
        match Gpu::open(0) {
            Ok(g) => Some(g),
            Err(e) if std::env::var("LAZARUS_REQUIRE_GPU").as_deref() == Ok("1") => {
                panic!("LAZARUS_REQUIRE_GPU=1 but no GPU: {e}")
            }
            Err(e) => {
                eprintln!("skipped: no usable GPU here ({e})");
                None
            }
        }
    }

    fn tiny() -> ModelConfig {
        ModelConfig {
            layers: 2,
            heads: 2,
            channels: 32,
            vocab: 50,
            padded_vocab: 64,
            block_size: 16,
        }
    }

    fn tokens(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n)
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect()
    }

    /// One batch of the tiny model and what the CPU model makes of it: the reference both
    /// precisions are held against.
    struct Reference {
        cfg: ModelConfig,
        b: usize,
        t: usize,
        layout: Layout,
        params: Vec<f32>,
        inp: Vec<u32>,
        tgt: Vec<u32>,
        dloss: f32,
        loss_cpu: f64,
        want: Vec<f32>,
    }

    fn cpu_reference() -> Reference {
        let cfg = tiny();
        let (b, t) = (2, 16);
        let layout = Layout::gpt2(&cfg);
        let mut params = vec![0.0f32; layout.total];
        init_params(&layout, &cfg, 7, &mut params);
        let (inp, tgt) = (tokens(b * t, 1, cfg.vocab), tokens(b * t, 2, cfg.vocab));
        let dloss = 1.0 / (b * t) as f32;
        let mut cpu = Gpt::new(cfg, b, t, true);
        let mut want = vec![0.0f32; layout.total];
        let loss_cpu = cpu.forward_backward(&params, &mut want, &inp, &tgt, b, t, dloss);
        Reference {
            cfg,
            b,
            t,
            layout,
            params,
            inp,
            tgt,
            dloss,
            loss_cpu,
            want,
        }
    }

    #[test]
    fn the_cuda_model_matches_the_cpu_model_and_repeats_bit_identically() {
        let Some(gpu) = gpu_or_skip() else { return };
        let Reference {
            cfg,
            b,
            t,
            layout,
            params,
            inp,
            tgt,
            dloss,
            loss_cpu,
            want,
        } = cpu_reference();
        let mut dev = CudaGpt::<f32>::new(gpu, cfg, b, t).unwrap();
        assert_eq!(
            dev.activation_bytes(),
            crate::estimate::cuda_activation_bytes(&cfg, b, t, 4),
            "the dry run's device estimate must follow what the model allocates"
        );
        let run = |dev: &mut CudaGpt| {
            dev.load_params(&params).unwrap();
            dev.zero_grads().unwrap();
            let loss = dev.forward_backward(&inp, &tgt, b, t, dloss).unwrap();
            let mut g = vec![f32::NAN; layout.total];
            dev.read_grads(&mut g).unwrap();
            (loss, g)
        };
        let (loss_gpu, got) = run(&mut dev);
        assert!(
            (loss_gpu - loss_cpu).abs() <= LOSS_REL_TOL * loss_cpu.abs(),
            "loss: cuda {loss_gpu} vs cpu {loss_cpu}"
        );
        for tensor in &layout.tensors {
            let r = tensor.range();
            let scale = want[r.clone()].iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for i in r {
                assert!(
                    (got[i] - want[i]).abs() <= GRAD_REL_TOL * scale.max(1e-6),
                    "{} [{}]: cuda {} vs cpu {} (largest {scale})",
                    tensor.name,
                    i - tensor.offset,
                    got[i],
                    want[i]
                );
            }
        }
        // Deterministic kernels: the same inputs give the same bits.
        let (loss_again, again) = run(&mut dev);
        assert_eq!(loss_again.to_bits(), loss_gpu.to_bits());
        assert!(again
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        // Validation (forward and loss only) gives the training pass's loss.
        let l = dev.loss_sum(&inp, &tgt, b, t).unwrap();
        assert_eq!(l.to_bits(), loss_gpu.to_bits());
    }

    /// Mixed precision: bf16 parameters, gradients and activations (f32 math inside every
    /// kernel) against the f32 CPU model. The loss within 2e-2 relative; each tensor's
    /// gradient in direction (cosine >= 0.99) and size (norm within 5%).
    #[test]
    fn the_bf16_model_follows_the_cpu_model_within_bf16_tolerance() {
        let Some(gpu) = gpu_or_skip() else { return };
        let Reference {
            cfg,
            b,
            t,
            layout,
            params,
            inp,
            tgt,
            dloss,
            loss_cpu,
            want,
        } = cpu_reference();
        let mut dev = CudaGpt::<bf16>::new(gpu, cfg, b, t).unwrap();
        assert_eq!(
            dev.activation_bytes(),
            crate::estimate::cuda_activation_bytes(&cfg, b, t, 2)
        );
        dev.load_params(&params).unwrap();
        dev.zero_grads().unwrap();
        let loss = dev.forward_backward(&inp, &tgt, b, t, dloss).unwrap();
        let mut got = vec![f32::NAN; layout.total];
        dev.read_grads(&mut got).unwrap();
        assert!(
            (loss - loss_cpu).abs() <= 2e-2 * loss_cpu.abs(),
            "loss: bf16 {loss} vs cpu {loss_cpu}"
        );
        for tensor in &layout.tensors {
            let r = tensor.range();
            let (g, w) = (&got[r.clone()], &want[r]);
            let dot: f64 = g.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum();
            let norm = |x: &[f32]| x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            let (ng, nw) = (norm(g), norm(w));
            if nw == 0.0 {
                assert_eq!(
                    ng, 0.0,
                    "{}: cpu gradient is zero, bf16's is not",
                    tensor.name
                );
                continue;
            }
            let cos = dot / (ng * nw);
            assert!(cos >= 0.99, "{}: cosine {cos}", tensor.name);
            assert!(
                (ng - nw).abs() <= 0.05 * nw,
                "{}: norm bf16 {ng} vs cpu {nw}",
                tensor.name
            );
        }
    }

    #[test]
    fn micro_batches_accumulate_into_the_gradients() {
        let Some(gpu) = gpu_or_skip() else { return };
        let cfg = tiny();
        let (b, t) = (1, 8);
        let layout = Layout::gpt2(&cfg);
        let mut params = vec![0.0f32; layout.total];
        init_params(&layout, &cfg, 3, &mut params);
        let mut dev = CudaGpt::<f32>::new(gpu, cfg, b, t).unwrap();
        dev.load_params(&params).unwrap();
        let batches: Vec<(Vec<u32>, Vec<u32>)> = (0..2)
            .map(|k| (tokens(t, 10 + k, cfg.vocab), tokens(t, 20 + k, cfg.vocab)))
            .collect();
        let mut each = Vec::new();
        for (i, o) in &batches {
            dev.zero_grads().unwrap();
            dev.forward_backward(i, o, b, t, 0.5).unwrap();
            let mut g = vec![0.0f32; layout.total];
            dev.read_grads(&mut g).unwrap();
            each.push(g);
        }
        dev.zero_grads().unwrap();
        for (i, o) in &batches {
            dev.forward_backward(i, o, b, t, 0.5).unwrap();
        }
        let mut both = vec![0.0f32; layout.total];
        dev.read_grads(&mut both).unwrap();
        for k in 0..layout.total {
            let sum = each[0][k] + each[1][k];
            assert!(
                (both[k] - sum).abs() <= 1e-6 * sum.abs().max(1.0),
                "[{k}] {} vs {sum}",
                both[k]
            );
        }
    }
}
