//! Every CUDA op against the CPU reference (`crate::cpu`), for f32 and bf16, on fresh random
//! inputs. Output buffers are poisoned with NaN before each run; gradient buffers start from
//! random values, so an op that overwrites instead of adding fails; deterministic reductions
//! run twice and must agree bit for bit. The bf16 variants get inputs rounded to bf16, and the
//! CPU reference runs in f32 on the same rounded values.
//!
//! Without a usable GPU (no libcuda, no device) each test prints that it was skipped and why,
//! and passes. A GPU that is present but cannot be opened fails the tests.

use super::{bf16, probe, Gpu, GpuFloat};
use crate::cpu;
use crate::KernelError;
use cudarc::driver::{CudaSlice, CudaView};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// f32 against the CPU: |got - want| <= F32_TOL * max(1, |got|, |want|). The sums differ only
/// in order (tree reductions, cuBLASLt's blocking, fused multiply-adds).
const F32_TOL: f64 = 1e-5;

/// bf16 storage against the f32 CPU on the same rounded inputs, same form: the output's own
/// rounding is 2^-9 relative, plus that of bf16 intermediates (att, dpreatt) an op stores.
const BF16_TOL: f64 = 1e-2;

fn tol<T: GpuFloat>() -> f64 {
    if T::SUFFIX == "f32" {
        F32_TOL
    } else {
        BF16_TOL
    }
}

/// splitmix64: deterministic inputs without a `rand` dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `len` values uniform in [-scale, scale).
    fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                ((unit * 2.0 - 1.0) * f64::from(scale)) as f32
            })
            .collect()
    }

    /// `len` ids below `bound`.
    fn ids(&mut self, len: usize, bound: u32) -> Vec<u32> {
        (0..len)
            .map(|_| (self.next_u64() % u64::from(bound)) as u32)
            .collect()
    }
}

/// The device shared by the tests (opening one per test would recompile and reload the
/// kernels); the lock runs them one at a time.
static GPU: OnceLock<Option<Mutex<Gpu>>> = OnceLock::new();

/// The test GPU, or `None` after printing why the test is skipped.
fn gpu(test: &str) -> Option<MutexGuard<'static, Gpu>> {
    let gpu = GPU.get_or_init(|| match probe(0) {
        Ok(_) => Some(Mutex::new(Gpu::open(0).unwrap_or_else(|e| {
            panic!("a GPU is present but cannot be opened: {e}")
        }))),
        // On the GPU check a missing device is a failure, not a skip.
        Err(e) if std::env::var("LAZARUS_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("LAZARUS_REQUIRE_GPU=1 but no usable GPU: {e}")
        }
        Err(e) => {
            eprintln!("CUDA kernel tests: no usable GPU: {e}");
            None
        }
    });
    match gpu {
        Some(gpu) => Some(gpu.lock().unwrap_or_else(|e| e.into_inner())),
        None => {
            eprintln!("{test}: SKIPPED (no usable CUDA device; see above)");
            None
        }
    }
}

fn ok<V>(result: Result<V, KernelError>) -> V {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// Host values as a new device buffer of T (rounded to nearest).
fn upload<T: GpuFloat>(gpu: &Gpu, x: &[f32]) -> CudaSlice<T> {
    let values: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    gpu.stream()
        .clone_htod(&values)
        .unwrap_or_else(|e| panic!("upload: {e:?}"))
}

fn upload_u32(gpu: &Gpu, x: &[u32]) -> CudaSlice<u32> {
    gpu.stream()
        .clone_htod(x)
        .unwrap_or_else(|e| panic!("upload: {e:?}"))
}

/// `n` NaN on the device: an op must write every value it promises to.
fn poisoned<T: GpuFloat>(gpu: &Gpu, n: usize) -> CudaSlice<T> {
    upload(gpu, &vec![f32::NAN; n])
}

/// A device buffer back on the host, as f32; waits for the GPU.
fn download<T: GpuFloat>(gpu: &Gpu, x: &CudaSlice<T>) -> Vec<f32> {
    let values = gpu
        .stream()
        .clone_dtoh(x)
        .unwrap_or_else(|e| panic!("download: {e:?}"));
    ok(gpu.synchronize());
    values.into_iter().map(T::to_f32).collect()
}

/// The values T can hold: what both sides compute on.
fn rounded<T: GpuFloat>(x: Vec<f32>) -> Vec<f32> {
    x.into_iter().map(|v| T::from_f32(v).to_f32()).collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (f64::from(g), f64::from(w));
        let bound = tol * g.abs().max(w.abs()).max(1.0);
        assert!(
            (g - w).abs() <= bound,
            "{what}[{i}]: got {g}, want {w} (tolerance {bound:e})"
        );
    }
}

fn assert_same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            x.to_bits() == y.to_bits(),
            "{what}[{i}]: {x} then {y} (not bit-identical)"
        );
    }
}

/// Instantiates one check per element type, as tests `<check>::f32` and `<check>::bf16`.
macro_rules! for_each_type {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            #[test]
            fn f32() {
                super::$check::<f32>()
            }

            #[test]
            fn bf16() {
                super::$check::<half::bf16>()
            }
        }
    )*};
}

for_each_type!(
    encoder,
    layernorm,
    matmul,
    matmul_unaligned,
    attention,
    attention_long
);
for_each_type!(gelu, residual, softmax, crossentropy);

fn encoder<T: GpuFloat>() {
    let Some(gpu) = gpu("encoder") else { return };
    // C above the block size, so threads loop over channels; tokens repeat on purpose.
    let (b, t, c, vp, max_t) = (3, 8, 300, 40, 10);
    let n = b * t;
    let mut rng = Rng(1);
    let tokens: Vec<u32> = rng.ids(n, 13).iter().map(|&x| x * 3).collect();
    let wte = rounded::<T>(rng.vec(vp * c, 1.0));
    let wpe = rounded::<T>(rng.vec(max_t * c, 1.0));
    let dout = rounded::<T>(rng.vec(n * c, 1.0));
    let (dwte0, dwpe0) = (
        rounded::<T>(rng.vec(vp * c, 1.0)),
        rounded::<T>(rng.vec(max_t * c, 1.0)),
    );
    let tokens_d = upload_u32(&gpu, &tokens);

    let mut want = vec![0.0; n * c];
    cpu::encoder_forward(&mut want, &tokens, &wte, &wpe, b, t, c);
    let mut out = poisoned::<T>(&gpu, n * c);
    let (wte_d, wpe_d) = (upload::<T>(&gpu, &wte), upload::<T>(&gpu, &wpe));
    ok(gpu.encoder_forward(
        &mut out.as_view_mut(),
        &tokens_d.as_view(),
        &wte_d.as_view(),
        &wpe_d.as_view(),
        b,
        t,
        c,
    ));
    assert_close("encoder out", &download(&gpu, &out), &want, tol::<T>());

    let (mut dwte_want, mut dwpe_want) = (dwte0.clone(), dwpe0.clone());
    cpu::encoder_backward(&mut dwte_want, &mut dwpe_want, &dout, &tokens, b, t, c);
    let dout_d = upload::<T>(&gpu, &dout);
    let run = || {
        let (mut dwte, mut dwpe) = (upload::<T>(&gpu, &dwte0), upload::<T>(&gpu, &dwpe0));
        ok(gpu.encoder_backward(
            &mut dwte.as_view_mut(),
            &mut dwpe.as_view_mut(),
            &dout_d.as_view(),
            &tokens_d.as_view(),
            b,
            t,
            c,
        ));
        (download(&gpu, &dwte), download(&gpu, &dwpe))
    };
    let (dwte, dwpe) = run();
    assert_close("dwte", &dwte, &dwte_want, tol::<T>());
    assert_close("dwpe", &dwpe, &dwpe_want, tol::<T>());
    let (dwte2, dwpe2) = run();
    assert_same_bits("dwte", &dwte, &dwte2);
    assert_same_bits("dwpe", &dwpe, &dwpe2);
}

fn layernorm<T: GpuFloat>() {
    let Some(gpu) = gpu("layernorm") else { return };
    // C above the block size and not a multiple of the column tile.
    let (n, c) = (7, 300);
    let mut rng = Rng(2);
    let inp = rounded::<T>(rng.vec(n * c, 2.0));
    let (weight, bias) = (rounded::<T>(rng.vec(c, 1.0)), rounded::<T>(rng.vec(c, 1.0)));
    let dout = rounded::<T>(rng.vec(n * c, 1.0));
    let (dinp0, dw0, db0) = (
        rounded::<T>(rng.vec(n * c, 1.0)),
        rounded::<T>(rng.vec(c, 1.0)),
        rounded::<T>(rng.vec(c, 1.0)),
    );
    let (mut out_want, mut mean_want, mut rstd_want) =
        (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    cpu::layernorm_forward(
        &mut out_want,
        &mut mean_want,
        &mut rstd_want,
        &inp,
        &weight,
        &bias,
        n,
        c,
    );
    let (inp_d, weight_d, bias_d) = (
        upload::<T>(&gpu, &inp),
        upload::<T>(&gpu, &weight),
        upload::<T>(&gpu, &bias),
    );
    let mut out = poisoned::<T>(&gpu, n * c);
    let (mut mean, mut rstd) = (poisoned::<f32>(&gpu, n), poisoned::<f32>(&gpu, n));
    ok(gpu.layernorm_forward(
        &mut out.as_view_mut(),
        &mut mean.as_view_mut(),
        &mut rstd.as_view_mut(),
        &inp_d.as_view(),
        &weight_d.as_view(),
        &bias_d.as_view(),
        n,
        c,
    ));
    assert_close("ln out", &download(&gpu, &out), &out_want, tol::<T>());
    assert_close("ln mean", &download(&gpu, &mean), &mean_want, F32_TOL);
    assert_close("ln rstd", &download(&gpu, &rstd), &rstd_want, F32_TOL);

    let (mut dinp_want, mut dw_want, mut db_want) = (dinp0.clone(), dw0.clone(), db0.clone());
    cpu::layernorm_backward(
        &mut dinp_want,
        &mut dw_want,
        &mut db_want,
        &dout,
        &inp,
        &weight,
        &mean_want,
        &rstd_want,
        n,
        c,
    );
    // The backward reads the CPU's statistics, so only the backward is under test.
    let (dout_d, mean_d, rstd_d) = (
        upload::<T>(&gpu, &dout),
        upload::<f32>(&gpu, &mean_want),
        upload::<f32>(&gpu, &rstd_want),
    );
    let run = || {
        let (mut dinp, mut dw, mut db) = (
            upload::<T>(&gpu, &dinp0),
            upload::<T>(&gpu, &dw0),
            upload::<T>(&gpu, &db0),
        );
        ok(gpu.layernorm_backward(
            &mut dinp.as_view_mut(),
            &mut dw.as_view_mut(),
            &mut db.as_view_mut(),
            &dout_d.as_view(),
            &inp_d.as_view(),
            &weight_d.as_view(),
            &mean_d.as_view(),
            &rstd_d.as_view(),
            n,
            c,
        ));
        [
            download(&gpu, &dinp),
            download(&gpu, &dw),
            download(&gpu, &db),
        ]
    };
    let first = run();
    assert_close("ln dinp", &first[0], &dinp_want, tol::<T>());
    assert_close("ln dweight", &first[1], &dw_want, tol::<T>());
    assert_close("ln dbias", &first[2], &db_want, tol::<T>());
    for (what, (a, b)) in ["dinp", "dweight", "dbias"]
        .iter()
        .zip(first.iter().zip(&run()))
    {
        assert_same_bits(what, a, b);
    }
}

/// The view of `x` from `offset` on.
fn view<T>(x: &CudaSlice<T>, offset: usize) -> CudaView<'_, T> {
    x.slice(offset..)
}

/// The matmul ops on views that start `offset` elements into their buffers, with and without
/// a bias, fused and unfused, against the CPU.
fn check_matmul<T: GpuFloat>(gpu: &Gpu, offset: usize, seed: u64) {
    let (n, c, oc) = (24, 72, 40);
    let mut rng = Rng(seed);
    let inp = rounded::<T>(rng.vec(n * c, 1.0));
    let weight = rounded::<T>(rng.vec(oc * c, 1.0));
    let bias = rounded::<T>(rng.vec(oc, 1.0));
    let dout = rounded::<T>(rng.vec(n * oc, 1.0));
    let (dinp0, dw0, db0) = (
        rounded::<T>(rng.vec(n * c, 1.0)),
        rounded::<T>(rng.vec(oc * c, 1.0)),
        rounded::<T>(rng.vec(oc, 1.0)),
    );
    // Device buffers with `offset` values in front, so the views start there.
    let padded = |x: &[f32]| {
        let mut v = vec![0.0; offset];
        v.extend_from_slice(x);
        upload::<T>(gpu, &v)
    };
    let (inp_d, weight_d, bias_d, dout_d) =
        (padded(&inp), padded(&weight), padded(&bias), padded(&dout));
    let tail = |x: Vec<f32>| x[offset..].to_vec();

    for (with_bias, fused) in [(false, true), (true, true), (true, false)] {
        let what = format!("matmul (bias {with_bias}, fused {fused}, offset {offset})");
        gpu.bias_epilogue.store(fused, Ordering::Relaxed);
        let bias_h = with_bias.then_some(bias.as_slice());
        let mut want = vec![0.0; n * oc];
        cpu::matmul_forward(&mut want, &inp, &weight, bias_h, n, c, oc);
        let mut out = poisoned::<T>(gpu, offset + n * oc);
        let bias_v = view(&bias_d, offset);
        ok(gpu.matmul_forward(
            &mut out.slice_mut(offset..),
            &view(&inp_d, offset),
            &view(&weight_d, offset),
            with_bias.then_some(&bias_v),
            n,
            c,
            oc,
        ));
        assert_close(
            &format!("{what} out"),
            &tail(download(gpu, &out)),
            &want,
            tol::<T>(),
        );
    }
    gpu.bias_epilogue.store(true, Ordering::Relaxed);

    for with_bias in [false, true] {
        let what = format!("matmul backward (bias {with_bias}, offset {offset})");
        let (mut dinp_want, mut dw_want, mut db_want) = (dinp0.clone(), dw0.clone(), db0.clone());
        cpu::matmul_backward(
            &mut dinp_want,
            &mut dw_want,
            with_bias.then_some(db_want.as_mut_slice()),
            &dout,
            &inp,
            &weight,
            n,
            c,
            oc,
        );
        let run = || {
            let (mut dinp, mut dw, mut db) = (padded(&dinp0), padded(&dw0), padded(&db0));
            let mut db_view = db.slice_mut(offset..);
            ok(gpu.matmul_backward(
                &mut dinp.slice_mut(offset..),
                &mut dw.slice_mut(offset..),
                with_bias.then_some(&mut db_view),
                &view(&dout_d, offset),
                &view(&inp_d, offset),
                &view(&weight_d, offset),
                n,
                c,
                oc,
            ));
            [
                tail(download(gpu, &dinp)),
                tail(download(gpu, &dw)),
                tail(download(gpu, &db)),
            ]
        };
        let first = run();
        assert_close(&format!("{what} dinp"), &first[0], &dinp_want, tol::<T>());
        assert_close(&format!("{what} dweight"), &first[1], &dw_want, tol::<T>());
        // Without a bias, dbias must be left alone: the prefill comes back unchanged.
        assert_close(&format!("{what} dbias"), &first[2], &db_want, tol::<T>());
        for (part, (a, b)) in ["dinp", "dweight", "dbias"]
            .iter()
            .zip(first.iter().zip(&run()))
        {
            assert_same_bits(&format!("{what} {part}"), a, b);
        }
    }
}

fn matmul<T: GpuFloat>() {
    let Some(gpu) = gpu("matmul") else { return };
    check_matmul::<T>(&gpu, 0, 3);
}

/// Views one element into their buffers: 4-byte (f32) or 2-byte (bf16) aligned, as views
/// into a flat parameter buffer can be.
fn matmul_unaligned<T: GpuFloat>() {
    let Some(gpu) = gpu("matmul_unaligned") else {
        return;
    };
    check_matmul::<T>(&gpu, 1, 4);
}

/// Forward and backward attention against the CPU for one shape.
fn check_attention<T: GpuFloat>(gpu: &Gpu, b: usize, t: usize, c: usize, nh: usize, seed: u64) {
    let what = format!("attention (B {b}, T {t}, C {c}, NH {nh})");
    let (n, scores) = (b * t, b * nh * t * t);
    let mut rng = Rng(seed);
    let qkv = rounded::<T>(rng.vec(n * 3 * c, 1.0));
    let dout = rounded::<T>(rng.vec(n * c, 1.0));
    let dinp0 = rounded::<T>(rng.vec(n * 3 * c, 1.0));
    let (mut out_want, mut preatt_want, mut att_want) =
        (vec![0.0; n * c], vec![0.0; scores], vec![0.0; scores]);
    cpu::attention_forward(
        &mut out_want,
        &mut preatt_want,
        &mut att_want,
        &qkv,
        b,
        t,
        c,
        nh,
    );
    let qkv_d = upload::<T>(gpu, &qkv);
    let mut out = poisoned::<T>(gpu, n * c);
    let (mut preatt, mut att) = (poisoned::<T>(gpu, scores), poisoned::<T>(gpu, scores));
    ok(gpu.attention_forward(
        &mut out.as_view_mut(),
        &mut preatt.as_view_mut(),
        &mut att.as_view_mut(),
        &qkv_d.as_view(),
        b,
        t,
        c,
        nh,
    ));
    assert_close(
        &format!("{what} out"),
        &download(gpu, &out),
        &out_want,
        tol::<T>(),
    );
    let preatt_got = download(gpu, &preatt);
    assert_close(
        &format!("{what} preatt"),
        &preatt_got,
        &preatt_want,
        tol::<T>(),
    );
    assert_close(
        &format!("{what} att"),
        &download(gpu, &att),
        &att_want,
        tol::<T>(),
    );

    // The backward reads the CPU's att (rounded to T), so only the backward is under test.
    let att_in = rounded::<T>(att_want);
    let mut dinp_want = dinp0.clone();
    let (mut dpreatt_want, mut datt_want) = (vec![0.0; scores], vec![0.0; scores]);
    cpu::attention_backward(
        &mut dinp_want,
        &mut dpreatt_want,
        &mut datt_want,
        &dout,
        &qkv,
        &att_in,
        b,
        t,
        c,
        nh,
    );
    let (dout_d, att_d) = (upload::<T>(gpu, &dout), upload::<T>(gpu, &att_in));
    let run = || {
        let mut dinp = upload::<T>(gpu, &dinp0);
        let (mut dpreatt, mut datt) = (poisoned::<T>(gpu, scores), poisoned::<T>(gpu, scores));
        ok(gpu.attention_backward(
            &mut dinp.as_view_mut(),
            &mut dpreatt.as_view_mut(),
            &mut datt.as_view_mut(),
            &dout_d.as_view(),
            &qkv_d.as_view(),
            &att_d.as_view(),
            b,
            t,
            c,
            nh,
        ));
        [
            download(gpu, &dinp),
            download(gpu, &dpreatt),
            download(gpu, &datt),
        ]
    };
    let first = run();
    assert_close(&format!("{what} dinp"), &first[0], &dinp_want, tol::<T>());
    assert_close(
        &format!("{what} dpreatt"),
        &first[1],
        &dpreatt_want,
        tol::<T>(),
    );
    assert_close(&format!("{what} datt"), &first[2], &datt_want, tol::<T>());
    for (part, (x, y)) in ["dinp", "dpreatt", "datt"]
        .iter()
        .zip(first.iter().zip(&run()))
    {
        assert_same_bits(&format!("{what} {part}"), x, y);
    }
}

fn attention<T: GpuFloat>() {
    let Some(gpu) = gpu("attention") else { return };
    check_attention::<T>(&gpu, 2, 12, 32, 4, 5);
}

/// T above the block size: each thread of a score row handles several positions.
fn attention_long<T: GpuFloat>() {
    let Some(gpu) = gpu("attention_long") else {
        return;
    };
    check_attention::<T>(&gpu, 1, 300, 16, 2, 6);
}

fn gelu<T: GpuFloat>() {
    let Some(gpu) = gpu("gelu") else { return };
    let n = 5000;
    let mut rng = Rng(7);
    // Inputs in [-4, 4) reach both tails of the activation.
    let inp = rounded::<T>(rng.vec(n, 4.0));
    let dout = rounded::<T>(rng.vec(n, 1.0));
    let dinp0 = rounded::<T>(rng.vec(n, 1.0));
    let mut want = vec![0.0; n];
    cpu::gelu_forward(&mut want, &inp);
    let inp_d = upload::<T>(&gpu, &inp);
    let mut out = poisoned::<T>(&gpu, n);
    ok(gpu.gelu_forward(&mut out.as_view_mut(), &inp_d.as_view()));
    assert_close("gelu out", &download(&gpu, &out), &want, tol::<T>());

    let mut dinp_want = dinp0.clone();
    cpu::gelu_backward(&mut dinp_want, &inp, &dout);
    let mut dinp = upload::<T>(&gpu, &dinp0);
    ok(gpu.gelu_backward(
        &mut dinp.as_view_mut(),
        &inp_d.as_view(),
        &upload::<T>(&gpu, &dout).as_view(),
    ));
    assert_close("gelu dinp", &download(&gpu, &dinp), &dinp_want, tol::<T>());
}

fn residual<T: GpuFloat>() {
    let Some(gpu) = gpu("residual") else { return };
    let n = 5000;
    let mut rng = Rng(8);
    let (a, b, dout) = (
        rounded::<T>(rng.vec(n, 1.0)),
        rounded::<T>(rng.vec(n, 1.0)),
        rounded::<T>(rng.vec(n, 1.0)),
    );
    let (da0, db0) = (rounded::<T>(rng.vec(n, 1.0)), rounded::<T>(rng.vec(n, 1.0)));
    let mut want = vec![0.0; n];
    cpu::residual_forward(&mut want, &a, &b);
    let mut out = poisoned::<T>(&gpu, n);
    ok(gpu.residual_forward(
        &mut out.as_view_mut(),
        &upload::<T>(&gpu, &a).as_view(),
        &upload::<T>(&gpu, &b).as_view(),
    ));
    assert_close("residual out", &download(&gpu, &out), &want, tol::<T>());

    let (mut da_want, mut db_want) = (da0.clone(), db0.clone());
    cpu::residual_backward(&mut da_want, &mut db_want, &dout);
    let (mut da, mut db) = (upload::<T>(&gpu, &da0), upload::<T>(&gpu, &db0));
    ok(gpu.residual_backward(
        &mut da.as_view_mut(),
        &mut db.as_view_mut(),
        &upload::<T>(&gpu, &dout).as_view(),
    ));
    assert_close("residual da", &download(&gpu, &da), &da_want, tol::<T>());
    assert_close("residual db", &download(&gpu, &db), &db_want, tol::<T>());
}

/// Logits (N,Vp) with V above the block size, and huge values in the padded columns, which
/// must change nothing.
fn logits<T: GpuFloat>(rng: &mut Rng, n: usize, v: usize, vp: usize) -> Vec<f32> {
    let mut logits = rounded::<T>(rng.vec(n * vp, 3.0));
    for row in logits.chunks_exact_mut(vp) {
        row[v..].fill(1e30);
    }
    logits
}

fn softmax<T: GpuFloat>() {
    let Some(gpu) = gpu("softmax") else { return };
    let (n, v, vp) = (5, 300, 320);
    let logits = logits::<T>(&mut Rng(9), n, v, vp);
    let mut want = vec![0.0; n * vp];
    cpu::softmax_forward(&mut want, &logits, n, v, vp);
    let mut probs = poisoned::<T>(&gpu, n * vp);
    ok(gpu.softmax_forward(
        &mut probs.as_view_mut(),
        &upload::<T>(&gpu, &logits).as_view(),
        n,
        v,
        vp,
    ));
    assert_close("probs", &download(&gpu, &probs), &want, tol::<T>());
}

fn crossentropy<T: GpuFloat>() {
    let Some(gpu) = gpu("crossentropy") else {
        return;
    };
    let (n, v, vp) = (6, 300, 320);
    let mut rng = Rng(10);
    let logits = logits::<T>(&mut rng, n, v, vp);
    let targets = rng.ids(n, v as u32);
    let dloss = 1.0 / n as f32;
    let targets_d = upload_u32(&gpu, &targets);
    let mut losses_want = vec![0.0; n];
    cpu::softmax_crossentropy_forward(&mut losses_want, &logits, &targets, n, v, vp);
    let mut losses = poisoned::<f32>(&gpu, n);
    ok(gpu.softmax_crossentropy_forward(
        &mut losses.as_view_mut(),
        &upload::<T>(&gpu, &logits).as_view(),
        &targets_d.as_view(),
        n,
        v,
        vp,
    ));
    // The losses are f32 whatever T; the logits are the same rounded values on both sides.
    assert_close("losses", &download(&gpu, &losses), &losses_want, F32_TOL);

    let mut dlogits_want = logits.clone();
    let mut fused_want = vec![0.0; n];
    cpu::softmax_crossentropy_backward(
        &mut dlogits_want,
        &mut fused_want,
        &targets,
        dloss,
        n,
        v,
        vp,
    );
    let mut dlogits = upload::<T>(&gpu, &logits);
    let mut fused = poisoned::<f32>(&gpu, n);
    ok(gpu.softmax_crossentropy_backward(
        &mut dlogits.as_view_mut(),
        &mut fused.as_view_mut(),
        &targets_d.as_view(),
        dloss,
        n,
        v,
        vp,
    ));
    let dlogits = download(&gpu, &dlogits);
    assert_close(
        "fused losses",
        &download(&gpu, &fused),
        &fused_want,
        F32_TOL,
    );
    assert_close("dlogits", &dlogits, &dlogits_want, tol::<T>());
    for row in dlogits.chunks_exact(vp) {
        assert!(
            row[v..].iter().all(|&g| g == 0.0),
            "padded column got a gradient"
        );
    }
}

/// Ids out of range on the device give NaN instead of an out-of-bounds access.
#[test]
fn out_of_range_ids_give_nan() {
    let Some(gpu) = gpu("out_of_range_ids_give_nan") else {
        return;
    };
    // wte has 3 rows: token 3 is past its end.
    let (b, t, c) = (1, 2, 4);
    let tokens = upload_u32(&gpu, &[1, 3]);
    let wte = upload::<f32>(&gpu, &[1.0; 12]);
    let wpe = upload::<f32>(&gpu, &[1.0; 8]);
    let mut out = poisoned::<f32>(&gpu, b * t * c);
    ok(gpu.encoder_forward(
        &mut out.as_view_mut(),
        &tokens.as_view(),
        &wte.as_view(),
        &wpe.as_view(),
        b,
        t,
        c,
    ));
    let out = download(&gpu, &out);
    assert!(out[..c].iter().all(|&x| x == 2.0), "{out:?}");
    assert!(out[c..].iter().all(|x| x.is_nan()), "{out:?}");

    let (n, v, vp) = (2, 3, 4);
    let logits = upload::<f32>(&gpu, &[0.5; 8]);
    let targets = upload_u32(&gpu, &[2, 3]);
    let mut losses = poisoned::<f32>(&gpu, n);
    ok(gpu.softmax_crossentropy_forward(
        &mut losses.as_view_mut(),
        &logits.as_view(),
        &targets.as_view(),
        n,
        v,
        vp,
    ));
    let losses = download(&gpu, &losses);
    assert!((losses[0] - 3f32.ln()).abs() < 1e-6, "{losses:?}");
    assert!(losses[1].is_nan(), "{losses:?}");
}

#[test]
fn adamw_matches_the_cpu() {
    let Some(gpu) = gpu("adamw_matches_the_cpu") else {
        return;
    };
    let len = 10_000;
    let mut rng = Rng(11);
    let mut params_want = rng.vec(len, 1.0);
    let (mut m_want, mut v_want) = (vec![0.0; len], vec![0.0; len]);
    let mut params = upload::<f32>(&gpu, &params_want);
    let (mut m, mut v) = (upload::<f32>(&gpu, &m_want), upload::<f32>(&gpu, &v_want));
    for step in 1..=3 {
        let grads = rng.vec(len, 1.0);
        let hp = cpu::AdamW {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
        };
        cpu::adamw_update(&mut params_want, &grads, &mut m_want, &mut v_want, &hp);
        ok(gpu.adamw_update(
            &mut params.as_view_mut(),
            &upload::<f32>(&gpu, &grads).as_view(),
            &mut m.as_view_mut(),
            &mut v.as_view_mut(),
            &hp,
        ));
    }
    assert_close("params", &download(&gpu, &params), &params_want, F32_TOL);
    assert_close("m", &download(&gpu, &m), &m_want, F32_TOL);
    assert_close("v", &download(&gpu, &v), &v_want, F32_TOL);
}

#[test]
fn global_norm_squared_matches_the_cpu_and_repeats_bit_for_bit() {
    let Some(gpu) = gpu("global_norm_squared") else {
        return;
    };
    // Empty, one partial, several, and beyond NORM_BLOCKS_MAX * NORM_CHUNK_MIN (the chunk
    // grows).
    for len in [0, 1000, 300_000, 70_000_000] {
        let x = Rng(12).vec(len, 1.0);
        let want = cpu::global_norm_squared(&x);
        let x_d = upload::<f32>(&gpu, &x);
        let got = ok(gpu.global_norm_squared(&x_d.as_view()));
        // Only the summation order differs from the CPU's f64 sum.
        assert!(
            (got - want).abs() <= 1e-12 * want.max(1.0),
            "len {len}: got {got}, want {want}"
        );
        let again = ok(gpu.global_norm_squared(&x_d.as_view()));
        assert_eq!(
            got.to_bits(),
            again.to_bits(),
            "len {len}: not bit-identical"
        );
    }
}

#[test]
fn scale_matches_the_cpu_exactly() {
    let Some(gpu) = gpu("scale_matches_the_cpu_exactly") else {
        return;
    };
    let mut want = Rng(13).vec(40_000, 3.0);
    let mut x = upload::<f32>(&gpu, &want);
    cpu::scale(&mut want, 0.37);
    ok(gpu.scale(&mut x.as_view_mut(), 0.37));
    assert_same_bits("scale", &download(&gpu, &x), &want);
}

#[test]
fn casts_round_like_the_half_crate() {
    let Some(gpu) = gpu("casts_round_like_the_half_crate") else {
        return;
    };
    let mut values = Rng(14).vec(10_000, 100.0);
    // Special values, ties (0x3f808000 lies halfway between two bf16 values), subnormals.
    values.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE / 3.0,
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x7f7f_ffff),
    ]);
    let inp = upload::<f32>(&gpu, &values);
    let mut narrow = gpu
        .zeros_bf16(values.len())
        .unwrap_or_else(|e| panic!("{e}"));
    ok(gpu.cast_f32_to_bf16(&mut narrow.as_view_mut(), &inp.as_view()));
    let got: Vec<bf16> = gpu
        .stream()
        .clone_dtoh(&narrow)
        .unwrap_or_else(|e| panic!("{e:?}"));
    for (i, (&g, &x)) in got.iter().zip(&values).enumerate() {
        let want = bf16::from_f32(x);
        assert_eq!(
            g.to_bits(),
            want.to_bits(),
            "value {i} ({x}): bf16 bits differ"
        );
    }
    let mut wide = poisoned::<f32>(&gpu, values.len());
    ok(gpu.cast_bf16_to_f32(&mut wide.as_view_mut(), &narrow.as_view()));
    let wide = download(&gpu, &wide);
    let want: Vec<f32> = got.iter().map(|b| b.to_f32()).collect();
    assert_same_bits("widened", &wide, &want);
}

#[test]
fn copies_round_trip() {
    let Some(gpu) = gpu("copies_round_trip") else {
        return;
    };
    let values = Rng(15).vec(1000, 1.0);
    let mut buffer = ok(gpu.zeros_f32(1200));
    ok(gpu.upload_f32_into(&values, &mut buffer.slice_mut(100..1100)));
    let mut back = vec![f32::NAN; 1000];
    ok(gpu.download_f32(&buffer.slice(100..1100), &mut back));
    assert_same_bits("round trip", &back, &values);
    let copy = ok(gpu.upload_f32(&values));
    let mut again = vec![f32::NAN; 1000];
    ok(gpu.download_f32(&copy.as_view(), &mut again));
    assert_same_bits("upload_f32", &again, &values);
    let mut ids = ok(gpu.zeros_u32(10));
    ok(gpu.upload_u32_into(&[7, 8, 9], &mut ids));
    let ids = gpu
        .stream()
        .clone_dtoh(&ids)
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(ids, [7, 8, 9, 0, 0, 0, 0, 0, 0, 0]);
    ok(gpu.synchronize());
}
