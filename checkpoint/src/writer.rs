//! The per-rank asynchronous writer: a staging buffer allocated at start-up, moved by ownership
//! between the training loop and one writer thread, with at most one save in flight.

use std::collections::HashMap;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};

use crate::error::{CheckpointError, Result};
use crate::format::{step_dir_name, Compression, Dtype, ShardInfo, ShardMeta, TensorSpec};
use crate::write::write_shard;

/// Saves that may be in flight at once: one. A save that finds one running waits (the stall).
pub const SAVES_IN_FLIGHT_MAX: usize = 1;

/// Writes one word in every page of `words`, so that the kernel maps the whole buffer now, at
/// start-up, and the first save does not pay for page faults (zeroed allocations are lazy).
fn touch_pages(words: &mut [u64]) {
    const WORDS_PER_PAGE: usize = 4096 / 8;
    for w in words.iter_mut().step_by(WORDS_PER_PAGE) {
        // SAFETY: `w` is a valid, exclusive reference; the volatile write only keeps the
        // compiler from eliding a store of the value the allocation already holds.
        unsafe { std::ptr::write_volatile(w, 0) };
    }
}

/// Host memory for one rank's tensors, 8-byte aligned per tensor. Owned by exactly one side
/// (training loop or writer thread) at a time.
#[derive(Debug)]
pub struct StagingBuffer {
    words: Vec<u64>,
    specs: Vec<TensorSpec>,
    /// Byte range of each tensor, aligned to 8 bytes, in `specs` order.
    ranges: Vec<Range<usize>>,
    index: HashMap<String, usize>,
}

impl StagingBuffer {
    /// Allocates room for `specs`, which are validated (sizes, unique names).
    pub fn new(specs: Vec<TensorSpec>) -> Result<Self> {
        let mut ranges = Vec::with_capacity(specs.len());
        let mut index = HashMap::with_capacity(specs.len());
        let mut at = 0usize;
        for (i, spec) in specs.iter().enumerate() {
            spec.validate()?;
            if index.insert(spec.name.clone(), i).is_some() {
                return Err(CheckpointError::bad_input(format!(
                    "tensor `{}` is listed twice",
                    spec.name
                )));
            }
            let len = spec.byte_len().unwrap_or(0);
            ranges.push(at..at + len);
            at = (at + len).next_multiple_of(8);
        }
        let mut words = vec![0u64; at / 8];
        touch_pages(&mut words);
        Ok(StagingBuffer {
            words,
            specs,
            ranges,
            index,
        })
    }

    /// Total bytes of tensor data (without alignment padding).
    pub fn data_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len() as u64).sum()
    }

    fn bytes(&self) -> &[u8] {
        words_as_bytes(&self.words)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        words_as_bytes_mut(&mut self.words)
    }

    /// The tensors and their bytes, in spec order, as `write_shard` takes them.
    fn views(&self) -> Vec<(&TensorSpec, &[u8])> {
        let bytes = self.bytes();
        self.specs
            .iter()
            .zip(&self.ranges)
            .map(|(s, r)| (s, &bytes[r.clone()]))
            .collect()
    }
}

/// The bytes of a `u64` slice.
fn words_as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: the pointer and length describe exactly the memory of `words`, which is
    // initialized; u8 has alignment 1; the shared borrow keeps it alive and unchanged.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) }
}

/// The bytes of a `u64` slice, mutably.
fn words_as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: as in `words_as_bytes`; the exclusive borrow makes this the only view, and any
    // byte pattern written through it is a valid u64.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
}

/// A mutable view of the staging buffer handed to `save`'s fill closure.
pub struct Staging<'a> {
    buf: &'a mut StagingBuffer,
}

impl Staging<'_> {
    /// The specs of the staged tensors, in order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.buf.specs
    }

    /// The bytes of tensor `name`, `None` if there is no such tensor.
    pub fn bytes_mut(&mut self, name: &str) -> Option<&mut [u8]> {
        let r = self.buf.ranges[*self.buf.index.get(name)?].clone();
        Some(&mut self.buf.bytes_mut()[r])
    }

    /// Every staged tensor with its bytes, in spec order, all at once (to fill them in parallel).
    pub fn all_mut(&mut self) -> Vec<(&TensorSpec, &mut [u8])> {
        let buf = &mut *self.buf;
        let bytes = words_as_bytes_mut(&mut buf.words);
        let mut out = Vec::with_capacity(buf.specs.len());
        let mut rest = bytes;
        let mut at = 0usize;
        for (spec, r) in buf.specs.iter().zip(&buf.ranges) {
            let (_, tail) = rest.split_at_mut(r.start - at);
            let (mine, tail) = tail.split_at_mut(r.len());
            out.push((spec, mine));
            rest = tail;
            at = r.end;
        }
        out
    }

    /// Tensor `name` as f32s, `None` if there is no such tensor or it is not `F32`.
    pub fn f32_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let i = *self.buf.index.get(name)?;
        if self.buf.specs[i].dtype != Dtype::F32 {
            return None;
        }
        let r = self.buf.ranges[i].clone();
        let bytes = &mut self.buf.bytes_mut()[r];
        // SAFETY: each tensor starts at a multiple of 8 bytes of a `Vec<u64>` allocation, so the
        // pointer is aligned for f32; the length is a whole number of f32s (spec size); every bit
        // pattern is a valid f32; the borrow of `self` keeps the view exclusive.
        Some(unsafe {
            std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f32>(), bytes.len() / 4)
        })
    }

    /// Copies `src` into tensor `name`; its length must be the tensor's size.
    pub fn copy_from(&mut self, name: &str, src: &[u8]) -> Result<()> {
        let dst = self
            .bytes_mut(name)
            .ok_or_else(|| CheckpointError::bad_input(format!("no staged tensor `{name}`")))?;
        if dst.len() != src.len() {
            return Err(CheckpointError::bad_input(format!(
                "tensor `{name}` holds {} bytes, {} given",
                dst.len(),
                src.len()
            )));
        }
        dst.copy_from_slice(src);
        Ok(())
    }
}

/// Timing of one `save` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveStats {
    /// The step saved.
    pub step: u64,
    /// Time the training loop was held: `wait + copy`.
    pub stall: Duration,
    /// Time spent waiting for the previous save to finish.
    pub wait: Duration,
    /// Time spent in the fill closure (the snapshot copy).
    pub copy: Duration,
    /// Tensor bytes handed to the writer.
    pub bytes: u64,
}

/// The result of one finished save.
#[derive(Debug)]
pub struct SaveOutcome {
    /// The step that was saved.
    pub step: u64,
    /// The written shard, or why the save failed (reported once; the writer stays usable).
    pub result: Result<ShardInfo>,
}

struct Job {
    step: u64,
    buf: StagingBuffer,
}

struct Done {
    step: u64,
    result: Result<ShardInfo>,
    buf: StagingBuffer,
}

/// What the writer thread needs to name and write shards.
struct WriterConfig {
    root: PathBuf,
    rank: usize,
    world_size: usize,
    layout_hash: String,
    compression: Compression,
}

/// One rank's asynchronous shard writer.
pub struct AsyncWriter {
    rank: usize,
    staging: Option<StagingBuffer>,
    in_flight: Option<u64>,
    job_tx: Option<Sender<Job>>,
    done_rx: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    outcomes: Vec<SaveOutcome>,
    latest_durable: Option<u64>,
}

impl AsyncWriter {
    /// Allocates the staging buffer (sum of tensor sizes) now, at start-up, and spawns the
    /// writer thread, which writes into `ckpt_root/step_NNNNNNNNN/`.
    pub fn new(
        ckpt_root: &Path,
        rank: usize,
        world_size: usize,
        layout_hash: String,
        tensors: Vec<TensorSpec>,
        compression: Compression,
    ) -> Result<Self> {
        if rank >= world_size {
            return Err(CheckpointError::bad_input(format!(
                "rank {rank} is not below world size {world_size}"
            )));
        }
        let staging = StagingBuffer::new(tensors)?;
        let (job_tx, job_rx) = bounded::<Job>(SAVES_IN_FLIGHT_MAX);
        let (done_tx, done_rx) = bounded::<Done>(SAVES_IN_FLIGHT_MAX);
        let cfg = WriterConfig {
            root: ckpt_root.to_path_buf(),
            rank,
            world_size,
            layout_hash,
            compression,
        };
        let thread = std::thread::Builder::new()
            .name(format!("ckpt-writer-{rank}"))
            .spawn(move || writer_loop(cfg, job_rx, done_tx))
            .map_err(|e| CheckpointError::io("spawn writer thread for", ckpt_root, e))?;
        Ok(AsyncWriter {
            rank,
            staging: Some(staging),
            in_flight: None,
            job_tx: Some(job_tx),
            done_rx,
            thread: Some(thread),
            outcomes: Vec::new(),
            latest_durable: None,
        })
    }

    /// Waits for the previous save to finish (that wait plus the copy below is the stall,
    /// returned), lets `fill` copy this step's tensors into the staging buffer, then hands the
    /// buffer to the writer thread and returns.
    pub fn save(&mut self, step: u64, fill: impl FnOnce(&mut Staging<'_>)) -> Result<SaveStats> {
        let t0 = Instant::now();
        if self.in_flight.is_some() {
            let done = self
                .done_rx
                .recv()
                .map_err(|_| self.gone("writer exited during a save"))?;
            self.accept(done);
        }
        let wait = t0.elapsed();
        let buf = self
            .staging
            .as_mut()
            .ok_or_else(|| CheckpointError::WriterGone {
                rank: self.rank,
                detail: "staging buffer was lost".to_string(),
            })?;
        fill(&mut Staging { buf });
        let stall = t0.elapsed();
        let buf = self.staging.take().expect("staging buffer checked above");
        let bytes = buf.data_bytes();
        let tx = self
            .job_tx
            .as_ref()
            .ok_or_else(|| self.gone("writer is shut down"))?;
        if let Err(e) = tx.send(Job { step, buf }) {
            self.staging = Some(e.into_inner().buf);
            return Err(self.gone("writer thread exited"));
        }
        self.in_flight = Some(step);
        Ok(SaveStats {
            step,
            stall,
            wait,
            copy: stall - wait,
            bytes,
        })
    }

    /// Non-blocking: outcomes of saves that finished since the last call, oldest first.
    pub fn poll(&mut self) -> Vec<SaveOutcome> {
        if self.in_flight.is_some() {
            match self.done_rx.try_recv() {
                Ok(done) => self.accept(done),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => self.lose_in_flight(),
            }
        }
        std::mem::take(&mut self.outcomes)
    }

    /// The newest step whose shard this rank has made durable, if any, as of the last `poll`,
    /// `save` or `wait_idle`: it does not move by itself, so callers waiting on it must poll.
    pub fn latest_durable_step(&self) -> Option<u64> {
        self.latest_durable
    }

    /// The step being written now, if any.
    pub fn in_flight_step(&self) -> Option<u64> {
        self.in_flight
    }

    /// Blocks until no save is in flight, at most `timeout`. The finished save's outcome is
    /// kept for the next [`poll`](Self::poll).
    pub fn wait_idle(&mut self, timeout: Duration) -> Result<()> {
        let Some(step) = self.in_flight else {
            return Ok(());
        };
        match self.done_rx.recv_timeout(timeout) {
            Ok(done) => {
                self.accept(done);
                Ok(())
            }
            Err(RecvTimeoutError::Timeout) => Err(CheckpointError::Timeout {
                what: format!("the save of step {step} on rank {}", self.rank),
                timeout_ms: timeout.as_millis() as u64,
            }),
            Err(RecvTimeoutError::Disconnected) => {
                self.lose_in_flight();
                Err(self.gone("writer exited during a save"))
            }
        }
    }

    fn accept(&mut self, done: Done) {
        self.staging = Some(done.buf);
        self.in_flight = None;
        if done.result.is_ok() {
            self.latest_durable = Some(self.latest_durable.map_or(done.step, |s| s.max(done.step)));
        }
        self.outcomes.push(SaveOutcome {
            step: done.step,
            result: done.result,
        });
    }

    fn lose_in_flight(&mut self) {
        if let Some(step) = self.in_flight.take() {
            let err = self.gone("writer thread exited");
            self.outcomes.push(SaveOutcome {
                step,
                result: Err(err),
            });
        }
    }

    fn gone(&self, detail: &str) -> CheckpointError {
        CheckpointError::WriterGone {
            rank: self.rank,
            detail: detail.to_string(),
        }
    }
}

impl Drop for AsyncWriter {
    /// Lets an in-flight save finish (so no `.tmp` is left half-written), then joins the thread.
    fn drop(&mut self) {
        self.job_tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer_loop(cfg: WriterConfig, jobs: Receiver<Job>, done: Sender<Done>) {
    for Job { step, buf } in jobs {
        let dir = cfg.root.join(step_dir_name(step));
        let meta = ShardMeta {
            step,
            rank: cfg.rank,
            world_size: cfg.world_size,
            layout_hash: cfg.layout_hash.clone(),
        };
        // A panic in the write (a bug) becomes a failed save instead of losing the buffer.
        let result = catch_unwind(AssertUnwindSafe(|| {
            write_shard(&dir, &meta, &buf.views(), cfg.compression)
        }))
        .unwrap_or_else(|_| {
            Err(CheckpointError::WriterGone {
                rank: cfg.rank,
                detail: format!("panic while writing step {step}"),
            })
        });
        if done.send(Done { step, result, buf }).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_aligns_tensors_and_views_f32() {
        let specs = vec![
            TensorSpec::new("a", Dtype::U8, vec![3]),
            TensorSpec::new("b", Dtype::F32, vec![2]),
        ];
        let mut buf = StagingBuffer::new(specs).expect("valid specs");
        assert_eq!(buf.ranges, vec![0..3, 8..16]);
        assert_eq!(buf.data_bytes(), 11);
        let mut st = Staging { buf: &mut buf };
        st.f32_mut("b")
            .expect("f32 tensor")
            .copy_from_slice(&[1.5, -2.0]);
        assert!(st.f32_mut("a").is_none());
        assert!(st.copy_from("a", &[1, 2]).is_err());
        let all = st.all_mut();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].1.len(), all[1].1.len()), (3, 8));
        st.copy_from("a", &[1, 2, 3]).expect("right size");
        let views = buf.views();
        assert_eq!(views[0].1, &[1, 2, 3]);
        assert_eq!(
            views[1].1,
            [1.5f32.to_le_bytes(), (-2.0f32).to_le_bytes()]
                .concat()
                .as_slice()
        );
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let specs = vec![
            TensorSpec::new("a", Dtype::U8, vec![1]),
            TensorSpec::new("a", Dtype::U8, vec![1]),
        ];
        assert!(StagingBuffer::new(specs).is_err());
    }
}
