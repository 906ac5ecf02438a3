//! A rank's ZeRO-1 optimizer shard on the GPU (feature `cuda`): its slice of the master
//! parameters, AdamW's moments and the reduced gradient slice live on the device, the update
//! runs there, and a checkpoint's snapshot is an asynchronous device-to-host copy into pinned
//! host memory on a side stream.
//!
//! The order of one step, with a save at step s:
//! - step s: AdamW writes the shard on the compute stream; [`CudaShard::begin_snapshot`] makes
//!   the side stream wait for it and queues the three copies there, then training goes on;
//! - step s+1: forward and backward run on the compute stream while the copies run on the side
//!   stream; the host waits for them ([`CudaShard::snapshot`]) and hands the pinned slices to
//!   the checkpoint writer before the update; [`CudaShard::update`] also makes the compute stream
//!   wait for the copies, so AdamW can never overwrite what is still being copied.
//!
//! The collectives stay the communicator's host ones: the reduced gradient slice comes up
//! before the update and the updated parameter slice goes down for the all-gather.

use crate::config::TrainConfig;
use crate::cuda_model::driver;
use crate::optim::segment_hparams;
use crate::{Result, TrainError};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use lazarus_kernels::cuda::Gpu;
use std::ops::Range;
use std::sync::Arc;

/// The three host slices of a snapshot, in pinned memory.
struct Pinned {
    params: PinnedHostSlice<f32>,
    m: PinnedHostSlice<f32>,
    v: PinnedHostSlice<f32>,
}

/// One rank's optimizer shard on its GPU.
pub struct CudaShard {
    /// Master parameters of the owned slice (padded length).
    params: CudaSlice<f32>,
    /// The reduced, clipped gradient slice of this step.
    grads: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    /// Values of the slice that a checkpoint holds (the slice without the padding).
    saved_len: usize,
    /// The stream the snapshot copies run on.
    side: Arc<CudaStream>,
    /// Recorded on the compute stream after an update; the side stream waits for it.
    updated: CudaEvent,
    /// Recorded on the side stream after a snapshot's copies.
    copied: CudaEvent,
    /// Allocated with the shard, so that a lack of pinnable memory shows at start-up rather
    /// than at the first save hours later; `None` when the saved part is empty.
    pinned: Option<Pinned>,
    /// A snapshot was queued and not yet awaited.
    in_flight: bool,
    /// A snapshot was queued since the last update, so the next update must wait for it.
    update_waits: bool,
}

impl CudaShard {
    /// Allocates the shard (`len` values, of which the first `saved_len` are checkpointed) with
    /// zeroed moments, the side stream, its events and the pinned host memory of a snapshot.
    ///
    /// The ordering between the compute stream and the side stream is this type's own events,
    /// so it holds whether or not cudarc tracks the buffers' uses (the trainer turns that
    /// tracking off; see `device::open_cuda`): copies wait for the update they save, the next
    /// update waits for the copies, and loading or dropping the shard waits for them too.
    pub fn new(gpu: &Gpu, len: usize, saved_len: usize) -> Result<Self> {
        assert!(saved_len <= len, "the saved part is longer than the shard");
        let zeros = |n| gpu.zeros_f32(n).map_err(TrainError::Kernel);
        let ctx = gpu.context();
        let side = ctx
            .new_stream()
            .map_err(driver("creating the snapshot stream"))?;
        let event = || ctx.new_event(None).map_err(driver("creating an event"));
        let pinned = if saved_len == 0 {
            None
        } else {
            // SAFETY: the pinned slices are only read after a copy into them has completed
            // (`snapshot` waits for it), so their unset initial contents are never observed.
            let alloc = || unsafe { ctx.alloc_pinned_with_flags::<f32>(saved_len, 0) };
            let what = format!(
                "pinning {} MB of host memory for checkpoint snapshots (the rank's parameters, \
                 m and v)",
                3 * 4 * saved_len / 1_000_000
            );
            Some(Pinned {
                params: alloc().map_err(driver(&what))?,
                m: alloc().map_err(driver(&what))?,
                v: alloc().map_err(driver(&what))?,
            })
        };
        Ok(CudaShard {
            params: zeros(len)?,
            grads: zeros(len)?,
            m: zeros(len)?,
            v: zeros(len)?,
            saved_len,
            side,
            updated: event()?,
            copied: event()?,
            pinned,
            in_flight: false,
            update_waits: false,
        })
    }

    /// Values in the shard (padded).
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether the shard is empty (a rank owning only padding past a tiny model).
    pub fn is_empty(&self) -> bool {
        self.params.len() == 0
    }

    /// Replaces the shard's state with host values (a fresh start or a restore), each of the
    /// shard's padded length.
    pub fn load(&mut self, gpu: &Gpu, params: &[f32], m: &[f32], v: &[f32]) -> Result<()> {
        self.wait_for_copies()?;
        let n = self.len();
        assert!(
            params.len() == n && m.len() == n && v.len() == n,
            "shard state of the wrong length"
        );
        let s = gpu.stream();
        for (src, dst) in [
            (params, &mut self.params),
            (m, &mut self.m),
            (v, &mut self.v),
        ] {
            s.memcpy_htod(src, dst)
                .map_err(driver("uploading the optimizer shard"))?;
        }
        gpu.synchronize().map_err(TrainError::Kernel)
    }

    /// AdamW on the shard with the reduced gradient slice `grads` (host, padded length), per
    /// segment of `segments` (ranges of the padded flat buffer, shard starting at
    /// `own_start`); the updated parameter slice is copied into `params_out` for the
    /// all-gather. `step` counts the updates done before this one.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        gpu: &Gpu,
        cfg: &TrainConfig,
        segments: &[(Range<usize>, bool)],
        own_start: usize,
        grads: &[f32],
        lr: f32,
        step: u64,
        params_out: &mut [f32],
    ) -> Result<()> {
        let s = gpu.stream();
        if self.update_waits {
            // The snapshot's copies read the state this update overwrites.
            s.wait(&self.copied)
                .map_err(driver("ordering the update after the snapshot"))?;
            self.update_waits = false;
        }
        s.memcpy_htod(grads, &mut self.grads)
            .map_err(driver("uploading the gradient slice"))?;
        for (r, decay) in segments {
            let l = r.start - own_start..r.end - own_start;
            let hp = segment_hparams(cfg, *decay, lr, step);
            gpu.adamw_update(
                &mut self.params.slice_mut(l.clone()),
                &self.grads.slice(l.clone()),
                &mut self.m.slice_mut(l.clone()),
                &mut self.v.slice_mut(l),
                &hp,
            )?;
        }
        gpu.download_f32(&self.params.slice(..), params_out)
            .map_err(TrainError::Kernel)
    }

    /// Queues the copy of the shard's saved part (parameters, m, v) into pinned host memory on
    /// the side stream, after the last update; returns at once.
    ///
    /// # Panics
    /// If the previous snapshot has not been taken: the training loop takes every snapshot
    /// before it starts the next.
    pub fn begin_snapshot(&mut self, gpu: &Gpu) -> Result<()> {
        assert!(
            !self.in_flight,
            "a checkpoint snapshot was started while the previous one was not yet taken"
        );
        let n = self.saved_len;
        let Some(pinned) = self.pinned.as_mut() else {
            // A rank that owns only padding saves empty slices: nothing to copy.
            self.in_flight = true;
            return Ok(());
        };
        self.updated
            .record(gpu.stream())
            .map_err(driver("marking the end of the update"))?;
        self.side
            .wait(&self.updated)
            .map_err(driver("ordering the snapshot after the update"))?;
        let what = "copying the optimizer shard to the host";
        for (src, dst) in [
            (&self.params, &mut pinned.params),
            (&self.m, &mut pinned.m),
            (&self.v, &mut pinned.v),
        ] {
            self.side
                .memcpy_dtoh(&src.slice(..n), dst)
                .map_err(driver(what))?;
        }
        self.copied
            .record(&self.side)
            .map_err(driver("marking the end of the snapshot"))?;
        self.in_flight = true;
        self.update_waits = true;
        Ok(())
    }

    /// Waits for the snapshot's copies and returns its parameters, m and v (the saved part of
    /// the shard, as of the update before [`CudaShard::begin_snapshot`]).
    ///
    /// # Panics
    /// If no snapshot was started since the last one was taken.
    pub fn snapshot(&mut self) -> Result<(&[f32], &[f32], &[f32])> {
        assert!(
            self.in_flight,
            "a checkpoint snapshot was taken without being started"
        );
        let Some(pinned) = &self.pinned else {
            // Nothing was copied: the saved part is empty.
            self.in_flight = false;
            return Ok((&[], &[], &[]));
        };
        self.copied
            .synchronize()
            .map_err(driver("waiting for the snapshot copies"))?;
        self.in_flight = false;
        let what = "reading the snapshot";
        Ok((
            pinned.params.as_slice().map_err(driver(what))?,
            pinned.m.as_slice().map_err(driver(what))?,
            pinned.v.as_slice().map_err(driver(what))?,
        ))
    }
}

impl CudaShard {
    /// Waits until no snapshot copy reads the shard's buffers.
    fn wait_for_copies(&self) -> Result<()> {
        if self.pinned.is_some() {
            self.copied
                .synchronize()
                .map_err(driver("waiting for the snapshot copies"))?;
        }
        Ok(())
    }
}

impl Drop for CudaShard {
    /// The buffers are freed on the compute stream; a copy still reading them on the side
    /// stream (a run ending on an error mid-step) must finish first.
    fn drop(&mut self) {
        if let Err(e) = self.wait_for_copies() {
            // Nothing is left to report it to; the process is tearing the shard down.
            eprintln!("warning: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    //! The shard's update against the CPU's AdamW, the snapshot's contents, and a whole run on
    //! the GPU stopped and resumed from its checkpoints against an uninterrupted one. Skipped
    //! (and saying so) where no GPU is usable, unless LAZARUS_REQUIRE_GPU=1.

    use super::*;
    use crate::cuda_model::tests::gpu_or_skip;
    use crate::optim::adamw_step;
    use crate::rng::Rng;

    /// The message of the panic `f` must raise.
    fn panic_text(f: impl FnOnce()) -> String {
        let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .expect_err("expected a panic");
        e.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| e.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    }

    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n)
            .map(|_| ((r.next_u64() % 2001) as f32 / 1000.0 - 1.0) * scale)
            .collect()
    }

    fn close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1e-3),
                "{what}[{i}]: gpu {g} vs cpu {w}"
            );
        }
    }

    #[test]
    fn the_update_matches_the_cpu_and_a_snapshot_keeps_its_step() {
        let Some(gpu) = gpu_or_skip() else { return };
        let cfg = TrainConfig::default();
        // A shard of 1000 values starting at 3000: two tensors, one without weight decay, and
        // 10 values of padding that are never saved.
        let (start, len, saved) = (3000, 1000, 990);
        let segments = vec![(3000..3600, true), (3600..3990, false)];
        let mut shard = CudaShard::new(&gpu, len, saved).unwrap();
        let e = panic_text(|| {
            let _ = shard.snapshot();
        });
        assert!(e.contains("without being started"), "{e}");

        let p0 = random(len, 1, 0.5);
        let (mut m, mut v) = (random(len, 2, 0.01), random(len, 3, 0.0));
        v.iter_mut().for_each(|x| *x = x.abs() + 1e-4);
        shard.load(&gpu, &p0, &m, &v).unwrap();
        let (g1, g2) = (random(len, 4, 1.0), random(len, 5, 1.0));

        let mut p = p0.clone();
        adamw_step(&cfg, &segments, start, &mut p, &g1, &mut m, &mut v, 1e-2, 7);
        let mut out1 = vec![f32::NAN; len];
        let step = |shard: &mut CudaShard, g: &[f32], out: &mut [f32]| {
            shard
                .update(&gpu, &cfg, &segments, start, g, 1e-2, 7, out)
                .unwrap()
        };
        step(&mut shard, &g1, &mut out1);
        close("params after one update", &out1, &p);
        // The padding past the last segment is never updated.
        assert_eq!(&out1[saved..], &p0[saved..]);

        shard.begin_snapshot(&gpu).unwrap();
        let e = panic_text(|| {
            let _ = shard.begin_snapshot(&gpu);
        });
        assert!(e.contains("previous one"), "{e}");
        // The next update runs before the snapshot is taken; the snapshot keeps step one.
        let mut out2 = vec![f32::NAN; len];
        step(&mut shard, &g2, &mut out2);
        assert_ne!(out2, out1);
        let (sp, sm, sv) = shard.snapshot().unwrap();
        assert_eq!(sp.len(), saved);
        assert!(sp
            .iter()
            .zip(&out1)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        close("m of the snapshot", sm, &m[..saved]);
        close("v of the snapshot", sv, &v[..saved]);
        // Taken once per start.
        assert!(panic_text(|| {
            let _ = shard.snapshot();
        })
        .contains("without being started"));
        // A second snapshot after the update holds the second step.
        shard.begin_snapshot(&gpu).unwrap();
        let (sp, _, _) = shard.snapshot().unwrap();
        assert!(sp
            .iter()
            .zip(&out2)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        // A rank whose slice is all padding saves empty slices.
        let mut pad = CudaShard::new(&gpu, 8, 0).unwrap();
        pad.begin_snapshot(&gpu).unwrap();
        let (p, m, v) = pad.snapshot().unwrap();
        assert!(p.is_empty() && m.is_empty() && v.is_empty());
    }

    /// d2-like, tiny: a run on the GPU saving at every step (so every snapshot overlaps the
    /// next step), stopped at step 2 and resumed, ends bit-identical to an uninterrupted one,
    /// and its losses follow the CPU run's.
    #[test]
    fn a_gpu_run_stopped_and_resumed_is_bit_identical_to_an_uninterrupted_one() {
        use crate::run::{run, RunOptions, RunOutcome};
        use lazarus_comm::SingleRank;
        if gpu_or_skip().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (train, _) = crate::corpus::synth(&dir.path().join("data"), 5, 20_000).unwrap();
        let cfg = |name: &str, device| TrainConfig {
            model: "d2".into(),
            layers: Some(1),
            heads: Some(2),
            channels: Some(32),
            seq: 16,
            batch: 2,
            steps: 4,
            warmup_steps: 1,
            val_every: 0,
            val_batches: 1,
            log_every: 1,
            save_every: 1,
            stats_interval_s: 0,
            data: train.clone(),
            run_dir: dir.path().join(name),
            device,
            ..TrainConfig::default()
        };
        let go = |cfg: TrainConfig, stop_at| {
            let opts = RunOptions {
                stop_at,
                final_save_timeout_ms: 60_000,
                ..RunOptions::default()
            };
            let mut warn = |e: crate::train::Event| {
                if let crate::train::Event::Warn(w) = e {
                    panic!("{w}")
                }
            };
            run(cfg, opts, Box::new(SingleRank::new()), &mut warn).unwrap()
        };
        let metrics = |o: RunOutcome| match o {
            RunOutcome::Complete(m) => m,
            other => panic!("the run did not complete: {other:?}"),
        };
        let cuda = crate::config::ComputeDevice::Cuda;
        let whole = metrics(go(cfg("whole", cuda), None));
        match go(cfg("parts", cuda), Some(2)) {
            RunOutcome::Stopped {
                step: 2,
                committed: Some(2),
                ..
            } => {}
            other => panic!("expected a stop at 2 with step 2 committed: {other:?}"),
        }
        let resumed = metrics(go(cfg("parts", cuda), None));
        assert_eq!(resumed.step, 4);
        assert_eq!(resumed.params_sha256, whole.params_sha256);
        assert_eq!(resumed.final_loss.to_bits(), whole.final_loss.to_bits());

        let cpu = metrics(go(cfg("cpu", crate::config::ComputeDevice::Cpu), None));
        let rel = ((whole.final_loss - cpu.final_loss) / cpu.final_loss).abs();
        assert!(
            rel < 1e-3,
            "final loss: cuda {} vs cpu {}",
            whole.final_loss,
            cpu.final_loss
        );

        // A run that diverges in the step after a save still commits that save, whose copy
        // was in flight when the step began.
        let wild = TrainConfig {
            lr: 1e38,
            ..cfg("wild", cuda)
        };
        let root = wild.run_dir.join(crate::run::CHECKPOINTS_DIR);
        let opts = RunOptions {
            final_save_timeout_ms: 60_000,
            ..RunOptions::default()
        };
        let e = run(wild, opts, Box::new(SingleRank::new()), &mut |_| {})
            .expect_err("a learning rate of 1e38 diverges");
        let crate::TrainError::Diverged { step, .. } = e else {
            panic!("expected divergence, got {e}")
        };
        let committed: Vec<u64> = lazarus_checkpoint::discover_committed(&root)
            .unwrap()
            .iter()
            .map(|(_, m)| m.step)
            .collect();
        assert!(
            step >= 2 && committed.first() == Some(&(step - 1)),
            "diverged at {step}, committed {committed:?}"
        );
    }
}
