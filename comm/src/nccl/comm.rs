//! `NcclComm`: one rank of an NCCL communicator, its setup, the `Communicator` methods on host
//! slices (through the owner thread's device scratch buffer) and collectives on device buffers.

use std::cell::RefCell;
use std::ffi::c_int;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::sys::{ncclDataType_t, ncclRedOp_t};
use cudarc::nccl::NcclType;

use super::libs::libraries_available;
use super::owner::BACKEND;
use super::owner::{self, deadline_after, dtype_bytes, Coll, HostPlan, OwnerHandle, Params, Work};
use super::rendezvous::{self, NcclId, NCCL_ID_BYTES};
use crate::kind::Kind;
use crate::{CommError, Communicator, Result};

/// One rank of an NCCL communicator, driving one GPU; see the [module docs](super) for the
/// threads, the deadline and what determinism to expect.
///
/// The `Communicator` methods take host slices: each copies the data to a device buffer, runs the
/// collective on the communicator's own stream, copies the result back and waits, all within
/// `timeout()`. The `*_device` methods run on device buffers and are what a GPU trainer calls.
/// Every call blocks until its collective has completed on the GPU.
pub struct NcclComm {
    rank: usize,
    world: usize,
    device: usize,
    timeout_ms: u64,
    /// Dropped first: the owner thread aborts the communicator and ends before the CUDA handles
    /// below are released.
    owner: RefCell<OwnerHandle>,
    /// Marks the point of the caller's stream that a device collective must wait for.
    join: CudaEvent,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    /// Host bytes moved to the owner thread and back, kept between calls so that the step loop
    /// does not allocate once the largest collective has run.
    staging: RefCell<Vec<u8>>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world_size", &self.world)
            .field("device", &self.device)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

fn setup_error(rank: usize, detail: String) -> CommError {
    CommError::Setup {
        backend: BACKEND,
        rank,
        detail,
    }
}

fn bad_argument(op: &'static str, detail: String) -> CommError {
    CommError::BadArgument { op, detail }
}

fn check_rank(rank: usize, world_size: usize) -> Result<()> {
    if world_size == 0 || rank >= world_size || c_int::try_from(world_size).is_err() {
        return Err(bad_argument(
            "nccl_init",
            format!("rank {rank} of world size {world_size}: need 0 <= rank < world size <= 2^31"),
        ));
    }
    Ok(())
}

fn check_libraries(rank: usize) -> Result<()> {
    libraries_available().map_err(|why| setup_error(rank, why))
}

/// Checks that CUDA device `device` exists (the libraries were checked already).
fn check_device(rank: usize, device: usize) -> Result<()> {
    device_present(device).map_err(|why| setup_error(rank, why))
}

fn device_present(device: usize) -> std::result::Result<(), String> {
    let count =
        CudaContext::device_count().map_err(|e| format!("the CUDA driver failed: {e:?}"))?;
    let count = usize::try_from(count).unwrap_or(0);
    if device >= count {
        return Err(format!(
            "CUDA device {device} was asked for but {count} device(s) are visible \
             (CUDA_VISIBLE_DEVICES={}): pass the node-local rank when every process sees all \
             GPUs of its node, 0 when the scheduler gives each task its own GPU",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
        ));
    }
    Ok(())
}

/// `send.len() == world * part` for reduce-scatter and all-gather; the error says what is off.
fn check_parts(op: &'static str, full: usize, part: usize, world: usize) -> Result<()> {
    if Some(full) != part.checked_mul(world) {
        return Err(bad_argument(
            op,
            format!(
                "the full buffer has {full} elements, expected world size {world} x the part's \
                 {part}; pad the buffer to a multiple of the world size"
            ),
        ));
    }
    Ok(())
}

/// The plan of an all-reduce of `count` elements of `dtype` in place at offset 0.
fn all_reduce_plan(count: usize, dtype: ncclDataType_t, op: ncclRedOp_t) -> HostPlan {
    let bytes = count * dtype_bytes(dtype);
    HostPlan {
        upload_to: 0,
        upload_len: bytes,
        coll: Coll::AllReduce {
            send: 0,
            recv: 0,
            count,
            dtype,
            op,
        },
        download_from: 0,
        download_len: bytes,
        scratch_len: bytes,
    }
}

/// Values that host collectives move as bytes (in the machine's order, which the GPU shares).
trait HostValue: Copy {
    const BYTES: usize;
    const DTYPE: ncclDataType_t;
    fn put(self, out: &mut [u8]);
    fn get(bytes: &[u8]) -> Self;
}

macro_rules! host_value {
    ($t:ty, $dtype:ident) => {
        impl HostValue for $t {
            const BYTES: usize = std::mem::size_of::<$t>();
            const DTYPE: ncclDataType_t = ncclDataType_t::$dtype;
            fn put(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_ne_bytes());
            }
            fn get(bytes: &[u8]) -> Self {
                let mut raw = [0u8; std::mem::size_of::<$t>()];
                raw.copy_from_slice(bytes);
                <$t>::from_ne_bytes(raw)
            }
        }
    };
}

host_value!(f32, ncclFloat32);
host_value!(f64, ncclFloat64);
host_value!(u64, ncclUint64);
host_value!(u8, ncclUint8);

fn encode<T: HostValue>(values: &[T], out: &mut [u8]) {
    for (chunk, v) in out.chunks_exact_mut(T::BYTES).zip(values) {
        v.put(chunk);
    }
}

fn decode<T: HostValue>(bytes: &[u8], values: &mut [T]) {
    for (v, chunk) in values.iter_mut().zip(bytes.chunks_exact(T::BYTES)) {
        *v = T::get(chunk);
    }
}

impl NcclComm {
    /// Joins the communicator of `world_size` ranks as `rank`, on CUDA device `device`, with
    /// NCCL's id exchanged through `<rendezvous_dir>/nccl-id-<key>` (see
    /// [`rendezvous`](super::rendezvous)): rank 0 creates and publishes it, the others wait for
    /// it. The id wait, the communicator's creation and every later collective are each bounded
    /// by `collective_timeout_ms`.
    ///
    /// `device` is the node-local rank when every process sees all GPUs of its node, 0 when the
    /// scheduler gives each task one GPU through `CUDA_VISIBLE_DEVICES`. `key` must be the same
    /// on every rank of this launch attempt and new for each attempt
    /// ([`rendezvous_key_from_env`](super::rendezvous::rendezvous_key_from_env)).
    pub fn init(
        rank: usize,
        world_size: usize,
        device: usize,
        rendezvous_dir: &Path,
        key: &str,
        collective_timeout_ms: u64,
    ) -> Result<NcclComm> {
        check_rank(rank, world_size)?;
        rendezvous::validate_key(key)?;
        check_libraries(rank)?;
        // Before the rendezvous, so that a rank without its GPU fails before rank 0 publishes.
        check_device(rank, device)?;
        let id = rendezvous::exchange_id_through_file(
            rank,
            world_size,
            rendezvous_dir,
            key,
            collective_timeout_ms,
            || Self::new_id(rank),
        )?;
        let comm = Self::init_with_id(rank, world_size, device, id, collective_timeout_ms)?;
        if rank == 0 {
            // NCCL's creation is collective, so every rank has read the id by now; the file has
            // served its purpose. Best effort: a leftover is never read under another key.
            if let Ok(path) = rendezvous::id_file_path(rendezvous_dir, key) {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(comm)
    }

    /// Joins a communicator whose ranks are `bootstrap`'s (e.g. `MpiComm`), with NCCL's id
    /// broadcast from rank 0 over `bootstrap`. The ranks first agree that all of them can open
    /// CUDA, NCCL and their device, so a rank without them fails every rank at once instead of
    /// leaving the others waiting in NCCL's setup.
    pub fn init_through(
        bootstrap: &dyn Communicator,
        device: usize,
        collective_timeout_ms: u64,
    ) -> Result<NcclComm> {
        let (rank, world_size) = (bootstrap.rank(), bootstrap.world_size());
        let usable = libraries_available().and_then(|()| device_present(device));
        let any_unusable = bootstrap.all_reduce_max_u64(u64::from(usable.is_err()))?;
        if let Err(why) = usable {
            return Err(setup_error(rank, why));
        }
        if any_unusable != 0 {
            return Err(setup_error(
                rank,
                "another rank cannot open CUDA, NCCL or its GPU (its error says why)".to_string(),
            ));
        }
        let id = rendezvous::exchange_id_through(bootstrap, || Self::new_id(rank))?;
        Self::init_with_id(rank, world_size, device, id, collective_timeout_ms)
    }

    /// Joins the communicator identified by `id`, which every rank must be given.
    pub fn init_with_id(
        rank: usize,
        world_size: usize,
        device: usize,
        id: NcclId,
        collective_timeout_ms: u64,
    ) -> Result<NcclComm> {
        check_rank(rank, world_size)?;
        check_libraries(rank)?;
        check_device(rank, device)?;
        let params = Params {
            rank,
            world: world_size,
            device,
            id,
            timeout_ms: collective_timeout_ms,
            deadline: deadline_after(collective_timeout_ms),
        };
        let (owner, ready) = owner::start(params)?;
        let join = ready
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| setup_error(rank, format!("creating a CUDA event failed: {e:?}")))?;
        Ok(NcclComm {
            rank,
            world: world_size,
            device,
            timeout_ms: collective_timeout_ms,
            owner: RefCell::new(owner),
            join,
            stream: ready.stream,
            ctx: ready.ctx,
            staging: RefCell::new(Vec::new()),
        })
    }

    /// A new NCCL unique id (`ncclGetUniqueId`); rank 0 makes it, `rank` names errors.
    pub fn new_id(rank: usize) -> Result<NcclId> {
        check_libraries(rank)?;
        let id = cudarc::nccl::result::get_uniqueid()
            .map_err(|e| setup_error(rank, format!("ncclGetUniqueId failed: {:?}", e.0)))?;
        let mut bytes = [0u8; NCCL_ID_BYTES];
        for (b, c) in bytes.iter_mut().zip(id.internal) {
            *b = c as u8;
        }
        Ok(NcclId(bytes))
    }

    /// The CUDA device this rank drives.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The CUDA context of the device (its primary context, the one the trainer's uses too).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream the collectives run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Changes the deadline of the calls that follow, e.g. a long one for the first collectives
    /// (NCCL connects peers lazily, on first use) and a shorter one once the run is going.
    pub fn set_collective_timeout_ms(&mut self, collective_timeout_ms: u64) {
        self.timeout_ms = collective_timeout_ms;
    }

    /// Sends `work` to the owner thread and waits for it within `timeout()` plus the grace.
    fn submit(&self, op: &'static str, work: Work, staging: Vec<u8>) -> Result<Vec<u8>> {
        let timeout_ms = self.timeout_ms;
        let (result, staging) = self.owner.borrow_mut().call(op, timeout_ms, work, staging);
        match result {
            Ok(()) => Ok(staging),
            Err(e) => {
                self.staging.replace(staging);
                Err(e)
            }
        }
    }

    /// Runs a host collective: `upload` fills the bytes sent to the device; the result holds the
    /// bytes that came back.
    fn host_collective(
        &self,
        op: &'static str,
        plan: HostPlan,
        upload: impl FnOnce(&mut [u8]),
    ) -> Result<Downloaded<'_>> {
        let mut staging = self.staging.take();
        // Grows only when a larger collective comes; otherwise reuses the allocation.
        staging.resize(plan.upload_len.max(plan.download_len), 0);
        upload(&mut staging[..plan.upload_len]);
        let bytes = self.submit(op, Work::Host(plan), staging)?;
        Ok(Downloaded {
            bytes,
            len: plan.download_len,
            home: &self.staging,
        })
    }

    /// Makes the communicator's stream wait for the work queued so far on `stream`.
    fn order_after(&self, op: &'static str, stream: &CudaStream) -> Result<()> {
        if stream.context().ordinal() != self.device {
            return Err(bad_argument(
                op,
                format!(
                    "the stream belongs to CUDA device {}, this communicator to device {}",
                    stream.context().ordinal(),
                    self.device
                ),
            ));
        }
        self.join
            .record(stream)
            .and_then(|()| self.stream.wait(&self.join))
            .map_err(|e| CommError::Backend {
                backend: BACKEND,
                op,
                detail: format!("ordering after the caller's stream failed: {e:?}"),
            })
    }

    fn device_collective(&self, op: &'static str, coll: Coll) -> Result<()> {
        self.submit(op, Work::Device(coll), Vec::new()).map(|_| ())
    }

    /// Element-wise sum of `buf` over all ranks, in place, on the device. The collective starts
    /// after the work already queued on `stream` (the stream that wrote `buf`; work on other
    /// streams that touches `buf` must be finished or joined into `stream` by the caller), and
    /// the call returns once it has completed. After an error the contents of `buf` are
    /// undefined.
    pub fn all_reduce_sum_device<T: NcclType, B: DevicePtrMut<T>>(
        &self,
        stream: &CudaStream,
        buf: &mut B,
    ) -> Result<()> {
        let op = "all_reduce_sum_device";
        let count = buf.len();
        if count == 0 {
            return Ok(());
        }
        self.order_after(op, stream)?;
        let (address, _record) = buf.device_ptr_mut(&self.stream);
        let coll = Coll::AllReduce {
            send: address,
            recv: address,
            count,
            dtype: T::as_nccl_type(),
            op: ncclRedOp_t::ncclSum,
        };
        self.device_collective(op, coll)
    }

    /// Sums `send` (length `world_size * recv.len()`) over ranks on the device and leaves slice
    /// `rank()` of the sum in `recv`; ordering as in [`NcclComm::all_reduce_sum_device`].
    pub fn reduce_scatter_sum_device<T, S, R>(
        &self,
        stream: &CudaStream,
        send: &S,
        recv: &mut R,
    ) -> Result<()>
    where
        T: NcclType,
        S: DevicePtr<T>,
        R: DevicePtrMut<T>,
    {
        let op = "reduce_scatter_sum_device";
        let count = recv.len();
        check_parts(op, send.len(), count, self.world)?;
        if count == 0 {
            return Ok(());
        }
        self.order_after(op, stream)?;
        let (send_address, _read) = send.device_ptr(&self.stream);
        let (recv_address, _written) = recv.device_ptr_mut(&self.stream);
        let coll = Coll::ReduceScatter {
            send: send_address,
            recv: recv_address,
            recv_count: count,
            dtype: T::as_nccl_type(),
        };
        self.device_collective(op, coll)
    }

    /// Reduce-scatter in place: sums `buf` (length a multiple of the world size) over ranks and
    /// leaves slice `rank()` of the sum in that slice of `buf` (ZeRO's gradient shard); the rest
    /// of `buf` is undefined afterwards. Ordering as in [`NcclComm::all_reduce_sum_device`].
    pub fn reduce_scatter_sum_device_in_place<T: NcclType, B: DevicePtrMut<T>>(
        &self,
        stream: &CudaStream,
        buf: &mut B,
    ) -> Result<()> {
        let op = "reduce_scatter_sum_device_in_place";
        let count = self.part_of(op, buf.len())?;
        if count == 0 {
            return Ok(());
        }
        self.order_after(op, stream)?;
        let (address, _record) = buf.device_ptr_mut(&self.stream);
        let coll = Coll::ReduceScatter {
            send: address,
            recv: address + (self.rank * count * std::mem::size_of::<T>()) as u64,
            recv_count: count,
            dtype: T::as_nccl_type(),
        };
        self.device_collective(op, coll)
    }

    /// Gathers every rank's `send` into `recv` (length `world_size * send.len()`), in rank order,
    /// on the device; ordering as in [`NcclComm::all_reduce_sum_device`].
    pub fn all_gather_device<T, S, R>(
        &self,
        stream: &CudaStream,
        send: &S,
        recv: &mut R,
    ) -> Result<()>
    where
        T: NcclType,
        S: DevicePtr<T>,
        R: DevicePtrMut<T>,
    {
        let op = "all_gather_device";
        let count = send.len();
        check_parts(op, recv.len(), count, self.world)?;
        if count == 0 {
            return Ok(());
        }
        self.order_after(op, stream)?;
        let (send_address, _read) = send.device_ptr(&self.stream);
        let (recv_address, _written) = recv.device_ptr_mut(&self.stream);
        let coll = Coll::AllGather {
            send: send_address,
            recv: recv_address,
            send_count: count,
            dtype: T::as_nccl_type(),
        };
        self.device_collective(op, coll)
    }

    /// All-gather in place: every rank's slice `rank()` of `buf` (length a multiple of the world
    /// size) goes to that slice of every rank's `buf` (ZeRO's updated parameters). Ordering as
    /// in [`NcclComm::all_reduce_sum_device`].
    pub fn all_gather_device_in_place<T: NcclType, B: DevicePtrMut<T>>(
        &self,
        stream: &CudaStream,
        buf: &mut B,
    ) -> Result<()> {
        let op = "all_gather_device_in_place";
        let count = self.part_of(op, buf.len())?;
        if count == 0 {
            return Ok(());
        }
        self.order_after(op, stream)?;
        let (address, _record) = buf.device_ptr_mut(&self.stream);
        let coll = Coll::AllGather {
            send: address + (self.rank * count * std::mem::size_of::<T>()) as u64,
            recv: address,
            send_count: count,
            dtype: T::as_nccl_type(),
        };
        self.device_collective(op, coll)
    }

    /// [`NcclComm::all_reduce_sum_device`] on f32.
    pub fn all_reduce_sum_f32_device<B: DevicePtrMut<f32>>(
        &self,
        stream: &CudaStream,
        buf: &mut B,
    ) -> Result<()> {
        self.all_reduce_sum_device(stream, buf)
    }

    /// [`NcclComm::reduce_scatter_sum_device`] on f32.
    pub fn reduce_scatter_sum_f32_device<S: DevicePtr<f32>, R: DevicePtrMut<f32>>(
        &self,
        stream: &CudaStream,
        send: &S,
        recv: &mut R,
    ) -> Result<()> {
        self.reduce_scatter_sum_device(stream, send, recv)
    }

    /// [`NcclComm::all_gather_device`] on f32.
    pub fn all_gather_f32_device<S: DevicePtr<f32>, R: DevicePtrMut<f32>>(
        &self,
        stream: &CudaStream,
        send: &S,
        recv: &mut R,
    ) -> Result<()> {
        self.all_gather_device(stream, send, recv)
    }

    /// The length of one rank's slice of an in-place buffer of `len` elements.
    fn part_of(&self, op: &'static str, len: usize) -> Result<usize> {
        if !len.is_multiple_of(self.world) {
            return Err(bad_argument(
                op,
                format!(
                    "the buffer has {len} elements, not a multiple of the world size {}; pad it",
                    self.world
                ),
            ));
        }
        Ok(len / self.world)
    }

    fn all_reduce_host<T: HostValue>(&self, kind: Kind, buf: &mut [T]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let plan = all_reduce_plan(buf.len(), T::DTYPE, ncclRedOp_t::ncclSum);
        let bytes = self.host_collective(kind.name(), plan, |out| encode(buf, out))?;
        decode(&bytes, buf);
        Ok(())
    }

    fn min_max(&self, kind: Kind, value: u64, op: ncclRedOp_t) -> Result<u64> {
        let plan = all_reduce_plan(1, ncclDataType_t::ncclUint64, op);
        let bytes = self.host_collective(kind.name(), plan, |out| encode(&[value], out))?;
        Ok(u64::get(&bytes))
    }
}

/// The bytes a host collective brought back; returns the staging buffer for reuse when dropped.
struct Downloaded<'a> {
    bytes: Vec<u8>,
    len: usize,
    home: &'a RefCell<Vec<u8>>,
}

impl std::ops::Deref for Downloaded<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Drop for Downloaded<'_> {
    fn drop(&mut self) {
        self.home.replace(std::mem::take(&mut self.bytes));
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_host(Kind::AllReduceF32, buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce_host(Kind::AllReduceF64, buf)
    }

    fn reduce_scatter_sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let op = Kind::ReduceScatterF32.name();
        let count = recv.len();
        check_parts(op, send.len(), count, self.world)?;
        if count == 0 {
            return Ok(());
        }
        let part_bytes = count * 4;
        let plan = HostPlan {
            upload_to: 0,
            upload_len: send.len() * 4,
            coll: Coll::ReduceScatter {
                send: 0,
                recv: (self.rank * part_bytes) as u64,
                recv_count: count,
                dtype: ncclDataType_t::ncclFloat32,
            },
            download_from: self.rank * part_bytes,
            download_len: part_bytes,
            scratch_len: send.len() * 4,
        };
        let bytes = self.host_collective(op, plan, |out| encode(send, out))?;
        decode(&bytes, recv);
        Ok(())
    }

    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let op = Kind::AllGatherF32.name();
        let count = send.len();
        check_parts(op, recv.len(), count, self.world)?;
        if count == 0 {
            return Ok(());
        }
        let part_bytes = count * 4;
        let own = self.rank * part_bytes;
        let plan = HostPlan {
            upload_to: own,
            upload_len: part_bytes,
            coll: Coll::AllGather {
                send: own as u64,
                recv: 0,
                send_count: count,
                dtype: ncclDataType_t::ncclFloat32,
            },
            download_from: 0,
            download_len: recv.len() * 4,
            scratch_len: recv.len() * 4,
        };
        let bytes = self.host_collective(op, plan, |out| encode(send, out))?;
        decode(&bytes, recv);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let op = Kind::Broadcast.name();
        let root_c = c_int::try_from(root).ok().filter(|_| root < self.world);
        let Some(root_c) = root_c else {
            return Err(bad_argument(
                op,
                format!("root {root} out of range for {} ranks", self.world),
            ));
        };
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len();
        let plan = HostPlan {
            upload_to: 0,
            upload_len: len,
            coll: Coll::Broadcast {
                buf: 0,
                count: len,
                dtype: ncclDataType_t::ncclUint8,
                root: root_c,
            },
            download_from: 0,
            download_len: len,
            scratch_len: len,
        };
        let bytes = self.host_collective(op, plan, |out| out.copy_from_slice(buf))?;
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        // An all-reduce completes only once every rank has contributed: a barrier. One byte
        // with max, so no value can overflow or be NaN.
        let plan = all_reduce_plan(1, ncclDataType_t::ncclUint8, ncclRedOp_t::ncclMax);
        self.host_collective(Kind::Barrier.name(), plan, |out| out[0] = 0)
            .map(drop)
    }

    fn all_reduce_min_u64(&self, value: u64) -> Result<u64> {
        self.min_max(Kind::MinU64, value, ncclRedOp_t::ncclMin)
    }

    fn all_reduce_max_u64(&self, value: u64) -> Result<u64> {
        self.min_max(Kind::MaxU64, value, ncclRedOp_t::ncclMax)
    }
}
