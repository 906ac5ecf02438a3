//! The thread that owns one rank's NCCL communicator. It creates the CUDA context, the
//! communicator's stream and the communicator itself, makes every NCCL call, and runs the
//! watchdog. `NcclComm` talks to it over channels, one request and one reply at a time, and
//! never waits for a reply longer than the request's deadline plus a grace period.
//!
//! The raw `ncclComm_t` never leaves this thread, which is why nothing here needs `Send`: NCCL
//! communicators may not be used by two threads at once, and this one is used by one thread only.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::{result as cu_result, sys as cu, CudaContext, CudaSlice, CudaStream};
use cudarc::driver::{DevicePtr, DriverError};
use cudarc::nccl::{result as nccl_result, sys as nccl};

use super::watchdog::{Progress, Watchdog, Watched};
use super::NcclId;
use crate::{CommError, Result};

pub(crate) const BACKEND: &str = "NCCL";

/// How long past a request's deadline the caller waits for the owner's reply: room for
/// `ncclCommAbort`, which waits for NCCL's kernels and proxy thread to stop.
pub(crate) const OWNER_REPLY_GRACE_MS: u64 = 30_000;

/// How long dropping an `NcclComm` waits for its owner thread to abort the communicator and end.
const OWNER_SHUTDOWN_WAIT_MS: u64 = 30_000;

/// The scratch buffer of host-slice collectives grows in whole multiples of this.
const SCRATCH_GRANULE_BYTES: usize = 64 * 1024;

/// NCCL 2.30.0 in NCCL's encoding: the release whose `ncclConfig_t` layout cudarc's bindings
/// (feature `nccl` = 2.30) describe. Older libraries read only the fields they know: NCCL copies
/// `min(config.size, its own size)` bytes and uses the version to skip newer fields.
const NCCL_CONFIG_VERSION: u32 = 23_000;
/// `NCCL_API_MAGIC`, which marks a config as initialised.
const NCCL_CONFIG_MAGIC: u32 = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: let NCCL choose.
const NCCL_UNDEF: c_int = c_int::MIN;

/// A collective on device addresses. In a [`HostPlan`] the addresses are byte offsets into the
/// owner's scratch buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Coll {
    AllReduce {
        send: u64,
        recv: u64,
        count: usize,
        dtype: nccl::ncclDataType_t,
        op: nccl::ncclRedOp_t,
    },
    ReduceScatter {
        send: u64,
        recv: u64,
        recv_count: usize,
        dtype: nccl::ncclDataType_t,
    },
    AllGather {
        send: u64,
        recv: u64,
        send_count: usize,
        dtype: nccl::ncclDataType_t,
    },
    Broadcast {
        buf: u64,
        count: usize,
        dtype: nccl::ncclDataType_t,
        root: c_int,
    },
}

/// Bytes of one element of `dtype`.
pub(crate) fn dtype_bytes(dtype: nccl::ncclDataType_t) -> usize {
    use nccl::ncclDataType_t as T;
    match dtype {
        T::ncclInt8 | T::ncclUint8 | T::ncclFloat8e4m3 | T::ncclFloat8e5m2 => 1,
        T::ncclFloat16 | T::ncclBfloat16 => 2,
        T::ncclInt32 | T::ncclUint32 | T::ncclFloat32 => 4,
        T::ncclInt64 | T::ncclUint64 | T::ncclFloat64 => 8,
        T::ncclNumTypes => unreachable!("ncclNumTypes is not a data type"),
    }
}

impl Coll {
    /// The same collective with every address moved by `base`.
    fn offset_by(self, base: u64) -> Coll {
        match self {
            Coll::AllReduce {
                send,
                recv,
                count,
                dtype,
                op,
            } => Coll::AllReduce {
                send: send + base,
                recv: recv + base,
                count,
                dtype,
                op,
            },
            Coll::ReduceScatter {
                send,
                recv,
                recv_count,
                dtype,
            } => Coll::ReduceScatter {
                send: send + base,
                recv: recv + base,
                recv_count,
                dtype,
            },
            Coll::AllGather {
                send,
                recv,
                send_count,
                dtype,
            } => Coll::AllGather {
                send: send + base,
                recv: recv + base,
                send_count,
                dtype,
            },
            Coll::Broadcast {
                buf,
                count,
                dtype,
                root,
            } => Coll::Broadcast {
                buf: buf + base,
                count,
                dtype,
                root,
            },
        }
    }

    /// The end (exclusive) of the furthest byte the collective touches, for `world` ranks.
    fn extent(self, world: usize) -> u64 {
        let bytes = |count: usize, dtype| (count * dtype_bytes(dtype)) as u64;
        match self {
            Coll::AllReduce {
                send,
                recv,
                count,
                dtype,
                ..
            } => send.max(recv) + bytes(count, dtype),
            Coll::ReduceScatter {
                send,
                recv,
                recv_count,
                dtype,
            } => (send + bytes(world * recv_count, dtype)).max(recv + bytes(recv_count, dtype)),
            Coll::AllGather {
                send,
                recv,
                send_count,
                dtype,
            } => (send + bytes(send_count, dtype)).max(recv + bytes(world * send_count, dtype)),
            Coll::Broadcast {
                buf, count, dtype, ..
            } => buf + bytes(count, dtype),
        }
    }
}

/// A host-slice collective: the first `upload_len` bytes of the request's staging buffer go to
/// the scratch buffer at `upload_to`, the collective runs on scratch offsets, and `download_len`
/// bytes at `download_from` come back into the start of the staging buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostPlan {
    pub upload_to: usize,
    pub upload_len: usize,
    pub coll: Coll,
    pub download_from: usize,
    pub download_len: usize,
    /// Scratch bytes the plan needs: the furthest byte it uploads, reduces or downloads.
    pub scratch_len: usize,
}

/// What a request asks the owner to do.
pub(crate) enum Work {
    /// A collective on the caller's device buffers, already ordered on the owner's stream.
    Device(Coll),
    /// A collective on host data, through the scratch buffer.
    Host(HostPlan),
}

struct Request {
    op: &'static str,
    deadline: Instant,
    /// The call's timeout, which set `deadline`; for messages.
    timeout_ms: u64,
    work: Work,
    /// Host data in and out; moved to the owner and back, so the owner never points into
    /// memory the caller could free after giving up on a reply.
    staging: Vec<u8>,
}

struct Reply {
    result: Result<()>,
    staging: Vec<u8>,
}

/// What the owner needs to create the communicator.
pub(crate) struct Params {
    pub rank: usize,
    pub world: usize,
    pub device: usize,
    pub id: NcclId,
    pub timeout_ms: u64,
    pub deadline: Instant,
}

/// The CUDA handles the owner shares once its communicator is up.
pub(crate) struct Ready {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

/// The caller's end of the owner thread.
pub(crate) struct OwnerHandle {
    requests: Option<SyncSender<Request>>,
    replies: Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
    /// Set when a reply did not come in time: the owner is stuck in a CUDA or NCCL call.
    stuck: bool,
}

fn setup_error(rank: usize, detail: String) -> CommError {
    CommError::Setup {
        backend: BACKEND,
        rank,
        detail,
    }
}

fn backend_error(op: &'static str, detail: String) -> CommError {
    CommError::Backend {
        backend: BACKEND,
        op,
        detail,
    }
}

/// `timeout_ms` from now (a year when that overflows `Instant`).
pub(crate) fn deadline_after(timeout_ms: u64) -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_millis(timeout_ms))
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// The time left until `deadline`, plus the grace for an abort.
fn reply_wait(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(OWNER_REPLY_GRACE_MS)
}

/// Starts the owner thread of rank `setup.rank` and waits until its communicator is up (or
/// failed, or the deadline plus the grace passed).
pub(crate) fn start(setup: Params) -> Result<(OwnerHandle, Ready)> {
    let rank = setup.rank;
    let deadline = setup.deadline;
    let timeout_ms = setup.timeout_ms;
    // Capacity 1: the caller sends one request and waits for its reply before the next.
    let (request_tx, request_rx) = mpsc::sync_channel::<Request>(1);
    let (reply_tx, reply_rx) = mpsc::sync_channel::<Reply>(1);
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<Ready>>(1);
    let thread = std::thread::Builder::new()
        .name(format!("lazarus-nccl-r{rank}"))
        .spawn(move || serve(setup, ready_tx, request_rx, reply_tx))
        .map_err(|e| setup_error(rank, format!("cannot start the NCCL owner thread: {e}")))?;
    let ready = match ready_rx.recv_timeout(reply_wait(deadline)) {
        Ok(ready) => ready?,
        Err(RecvTimeoutError::Timeout) => {
            // The thread is left to itself: it ends, aborting what it made, if it ever returns.
            return Err(setup_error(
                rank,
                format!(
                    "creating the NCCL communicator did not return within {timeout_ms} ms plus \
                     {OWNER_REPLY_GRACE_MS} ms: a CUDA or NCCL call is stuck (NCCL_COMM_BLOCKING=1 \
                     set in the environment makes NCCL calls block)"
                ),
            ));
        }
        Err(RecvTimeoutError::Disconnected) => {
            let _ = thread.join();
            return Err(setup_error(
                rank,
                "the NCCL owner thread ended during setup (it panicked)".to_string(),
            ));
        }
    };
    let handle = OwnerHandle {
        requests: Some(request_tx),
        replies: reply_rx,
        thread: Some(thread),
        stuck: false,
    };
    Ok((handle, ready))
}

impl OwnerHandle {
    /// Sends `work`, to be done within `timeout_ms` from now, and waits for the reply at most that
    /// long plus the grace. Returns the
    /// staging buffer with the result (the owner sends it back whatever the outcome). After a
    /// missing reply the handle is stuck and every later call fails at once.
    pub(crate) fn call(
        &mut self,
        op: &'static str,
        timeout_ms: u64,
        work: Work,
        staging: Vec<u8>,
    ) -> (Result<()>, Vec<u8>) {
        if self.stuck {
            return (Err(self.stuck_error(op)), staging);
        }
        let deadline = deadline_after(timeout_ms);
        let request = Request {
            op,
            deadline,
            timeout_ms,
            work,
            staging,
        };
        let sent = match &self.requests {
            Some(requests) => requests.send(request).map_err(|e| e.0.staging),
            None => Err(request.staging),
        };
        if let Err(staging) = sent {
            self.stuck = true;
            return (Err(self.stuck_error(op)), staging);
        }
        match self.replies.recv_timeout(reply_wait(deadline)) {
            Ok(reply) => (reply.result, reply.staging),
            Err(_) => {
                self.stuck = true;
                (Err(self.stuck_error(op)), Vec::new())
            }
        }
    }

    fn stuck_error(&self, op: &'static str) -> CommError {
        backend_error(
            op,
            format!(
                "the thread that owns the NCCL communicator did not answer within the deadline \
                 plus {OWNER_REPLY_GRACE_MS} ms, or has ended: a CUDA or NCCL call is stuck; the \
                 communicator cannot be used again, restart the run from the last committed \
                 checkpoint"
            ),
        )
    }
}

impl Drop for OwnerHandle {
    fn drop(&mut self) {
        // Closing the request channel tells the owner to abort its communicator and end.
        drop(self.requests.take());
        if self.stuck {
            // It is blocked in a call that did not return: waiting would only delay the caller.
            return;
        }
        let deadline = Instant::now() + Duration::from_millis(OWNER_SHUTDOWN_WAIT_MS);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                // A late reply to a request the caller gave up on; keep waiting for the end.
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    if let Some(thread) = self.thread.take() {
                        let _ = thread.join();
                    }
                    return;
                }
                Err(RecvTimeoutError::Timeout) => return,
            }
        }
    }
}

/// The owner thread: creates the communicator, reports, then serves requests until the
/// `NcclComm` is dropped (its request channel closes). Waiting for the next request is the only
/// unbounded wait, and it ends with the communicator's owner.
fn serve(
    setup: Params,
    ready: SyncSender<Result<Ready>>,
    requests: Receiver<Request>,
    replies: SyncSender<Reply>,
) {
    let mut owner = match Owner::create(&setup) {
        Ok(owner) => owner,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let shared = Ready {
        ctx: Arc::clone(&owner.ctx),
        stream: Arc::clone(&owner.stream),
    };
    if ready.send(Ok(shared)).is_err() {
        return;
    }
    while let Ok(request) = requests.recv() {
        let mut staging = request.staging;
        let limits = (request.deadline, request.timeout_ms);
        let result = owner.run(request.op, limits, request.work, &mut staging);
        if replies.send(Reply { result, staging }).is_err() {
            break;
        }
    }
}

/// A communicator handle, aborted exactly once: by the watchdog, or when the owner ends.
struct RawComm(nccl::ncclComm_t);

impl RawComm {
    fn abort(&mut self) -> std::result::Result<(), String> {
        let comm = std::mem::replace(&mut self.0, ptr::null_mut());
        if comm.is_null() {
            return Ok(());
        }
        // SAFETY: `comm` came from ncclCommInitRankConfig and has not been aborted: the handle is
        // nulled above, so no later call reaches it. Abort also stops NCCL kernels on the GPU.
        match unsafe { nccl_result::comm_abort(comm) } {
            Ok(_) => Ok(()),
            Err(e) => Err(describe(e.0, ptr::null_mut())),
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        // Abort, not destroy: ncclCommDestroy may wait for peers that are gone. Nothing is in
        // flight here (every call waited for its collective), so nothing is lost.
        let _ = self.abort();
    }
}

/// NCCL's name for `code` and its last error message.
fn describe(code: nccl::ncclResult_t, comm: nccl::ncclComm_t) -> String {
    // SAFETY: both return null or a NUL-terminated string that NCCL owns and keeps alive;
    // ncclGetLastError does not use its argument (null is allowed).
    let (name, last) = unsafe {
        (
            c_text(nccl::ncclGetErrorString(code)),
            c_text(nccl::ncclGetLastError(comm)),
        )
    };
    if last.is_empty() {
        format!("{code:?} ({name})")
    } else {
        format!("{code:?} ({name}): {last}")
    }
}

/// # Safety
/// `text` must be null or point to a NUL-terminated string that outlives the call.
unsafe fn c_text(text: *const c_char) -> String {
    if text.is_null() {
        String::new()
    } else {
        // SAFETY: as the caller guarantees.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: NCCL calls return `ncclInProgress` instead of
/// blocking, so the watchdog can poll them and abort a hung one.
fn nonblocking_config() -> nccl::ncclConfig_t {
    nccl::ncclConfig_t {
        size: std::mem::size_of::<nccl::ncclConfig_t>(),
        magic: NCCL_CONFIG_MAGIC,
        version: NCCL_CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: NCCL_UNDEF,
        minCTAs: NCCL_UNDEF,
        maxCTAs: NCCL_UNDEF,
        netName: ptr::null(),
        splitShare: NCCL_UNDEF,
        trafficClass: NCCL_UNDEF,
        commName: ptr::null(),
        collnetEnable: NCCL_UNDEF,
        CTAPolicy: NCCL_UNDEF,
        shrinkShare: NCCL_UNDEF,
        nvlsCTAs: NCCL_UNDEF,
        nChannelsPerNetPeer: NCCL_UNDEF,
        nvlinkCentricSched: NCCL_UNDEF,
        graphUsageMode: NCCL_UNDEF,
        numRmaCtx: NCCL_UNDEF,
        maxP2pPeers: NCCL_UNDEF,
    }
}

/// What the watchdog polls: the communicator's state and, for a collective, the stream.
struct Live<'a> {
    comm: &'a mut RawComm,
    stream: Option<cu::CUstream>,
}

impl Watched for Live<'_> {
    fn poll(&mut self) -> Progress {
        if self.comm.0.is_null() {
            return Progress::Failed("the communicator has been aborted".to_string());
        }
        let mut state = nccl::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator (checked above) and a valid out-pointer.
        let called = unsafe { nccl::ncclCommGetAsyncError(self.comm.0, &mut state) };
        if called != nccl::ncclResult_t::ncclSuccess {
            let why = describe(called, self.comm.0);
            return Progress::Failed(format!("ncclCommGetAsyncError failed: {why}"));
        }
        match state {
            nccl::ncclResult_t::ncclSuccess => {}
            nccl::ncclResult_t::ncclInProgress => return Progress::Pending,
            error => return Progress::Failed(describe(error, self.comm.0)),
        }
        let Some(stream) = self.stream else {
            return Progress::Done;
        };
        // SAFETY: the owner's stream, which lives as long as the owner.
        match unsafe { cu::cuStreamQuery(stream) } {
            cu::CUresult::CUDA_SUCCESS => Progress::Done,
            cu::CUresult::CUDA_ERROR_NOT_READY => Progress::Pending,
            error => Progress::Failed(format!("the CUDA stream failed: {:?}", DriverError(error))),
        }
    }

    fn abort(&mut self) -> std::result::Result<(), String> {
        self.comm.abort()
    }
}

/// Enqueues `coll` on `stream`.
///
/// # Safety
/// `comm` must be a live communicator on the thread's current CUDA context, `stream` a stream of
/// that context, and every address range of `coll` valid device memory until the collective
/// completes or the communicator is aborted.
unsafe fn enqueue(
    coll: Coll,
    comm: nccl::ncclComm_t,
    stream: cu::CUstream,
) -> std::result::Result<(), nccl::ncclResult_t> {
    let stream = stream as nccl::cudaStream_t;
    let sendp = |a: u64| a as usize as *const c_void;
    let recvp = |a: u64| a as usize as *mut c_void;
    // SAFETY: as the caller guarantees.
    let enqueued = unsafe {
        match coll {
            Coll::AllReduce {
                send,
                recv,
                count,
                dtype,
                op,
            } => nccl_result::all_reduce(sendp(send), recvp(recv), count, dtype, op, comm, stream),
            Coll::ReduceScatter {
                send,
                recv,
                recv_count,
                dtype,
            } => nccl_result::reduce_scatter(
                sendp(send),
                recvp(recv),
                recv_count,
                dtype,
                nccl::ncclRedOp_t::ncclSum,
                comm,
                stream,
            ),
            Coll::AllGather {
                send,
                recv,
                send_count,
                dtype,
            } => nccl_result::all_gather(sendp(send), recvp(recv), send_count, dtype, comm, stream),
            Coll::Broadcast {
                buf,
                count,
                dtype,
                root,
            } => nccl_result::broadcast(sendp(buf), recvp(buf), count, dtype, root, comm, stream),
        }
    };
    enqueued.map(|_| ()).map_err(|e| e.0)
}

/// The owner thread's state. Fields drop in order: the communicator is aborted before the
/// scratch buffer it may point into is freed, and both before the stream and the context.
struct Owner {
    comm: RawComm,
    scratch: Option<CudaSlice<u8>>,
    scratch_ptr: u64,
    scratch_len: usize,
    watchdog: Watchdog,
    world: usize,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

impl Owner {
    /// Opens the device, makes the stream and creates the communicator, waiting (with the
    /// watchdog) until NCCL reports it ready or the deadline passes.
    fn create(s: &Params) -> Result<Owner> {
        let cuda = |what: &str, e: DriverError| {
            setup_error(s.rank, format!("{what} on CUDA device {}: {e:?}", s.device))
        };
        let ctx = CudaContext::new(s.device).map_err(|e| cuda("opening the context", e))?;
        // SAFETY: the only buffer made through this context handle is the scratch buffer, used on
        // `stream` alone, so cudarc's per-buffer events would order nothing.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda("creating the stream", e))?;
        let mut comm = RawComm(ptr::null_mut());
        let mut config = nonblocking_config();
        let id = nccl::ncclUniqueId {
            internal: s.id.0.map(|b| b as c_char),
        };
        // SAFETY: valid out-pointer and config; rank and world size were checked to fit c_int;
        // the context of this device is current on this thread (CudaContext::new binds it).
        let started = unsafe {
            nccl_result::comm_init_rank_config(
                &mut comm.0,
                s.world as c_int,
                id,
                s.rank as c_int,
                &mut config,
            )
        };
        if let Err(e) = started {
            // A non-blocking communicator may exist with its error set; `comm` aborts it on drop.
            let why = describe(e.0, comm.0);
            return Err(setup_error(
                s.rank,
                format!("ncclCommInitRankConfig failed: {why}"),
            ));
        }
        let mut watchdog = Watchdog::new(BACKEND, s.rank);
        let mut live = Live {
            comm: &mut comm,
            stream: None,
        };
        watchdog
            .wait("nccl_init", s.deadline, s.timeout_ms, &mut live)
            .map_err(|e| init_error(s, e))?;
        Ok(Owner {
            comm,
            scratch: None,
            scratch_ptr: 0,
            scratch_len: 0,
            watchdog,
            world: s.world,
            stream,
            ctx,
        })
    }

    /// Does one request; `limits` is its deadline and the timeout that set it.
    fn run(
        &mut self,
        op: &'static str,
        limits: (Instant, u64),
        work: Work,
        staging: &mut [u8],
    ) -> Result<()> {
        self.watchdog.check(op)?;
        match work {
            Work::Device(coll) => self.collective(op, limits, coll),
            Work::Host(plan) => self.host(op, limits, plan, staging),
        }
    }

    /// Enqueues `coll` and waits for it under the watchdog.
    fn collective(&mut self, op: &'static str, limits: (Instant, u64), coll: Coll) -> Result<()> {
        let stream = self.stream.cu_stream();
        // SAFETY: the communicator is live (the watchdog checked it is not aborted); the
        // caller's device buffers stay borrowed until the reply, which comes after the
        // collective completed or the communicator was aborted; scratch offsets were checked
        // against the scratch buffer's length.
        let enqueued = unsafe { enqueue(coll, self.comm.0, stream) };
        let failed = enqueued.err().map(|code| describe(code, self.comm.0));
        let mut live = Live {
            comm: &mut self.comm,
            stream: Some(stream),
        };
        if let Some(why) = failed {
            let detail = format!("enqueueing the collective failed: {why}");
            return Err(self.watchdog.fail(op, detail, &mut live));
        }
        self.watchdog.wait(op, limits.0, limits.1, &mut live)
    }

    /// Uploads the staging bytes, runs the collective on the scratch buffer, downloads the result.
    fn host(
        &mut self,
        op: &'static str,
        limits: (Instant, u64),
        plan: HostPlan,
        staging: &mut [u8],
    ) -> Result<()> {
        assert!(
            plan.upload_len <= staging.len()
                && plan.download_len <= staging.len()
                && plan.upload_to + plan.upload_len <= plan.scratch_len
                && plan.download_from + plan.download_len <= plan.scratch_len
                && plan.coll.extent(self.world) <= plan.scratch_len as u64,
            "host plan out of bounds: {plan:?} with {} staging bytes",
            staging.len()
        );
        let base = match self.ensure_scratch(plan.scratch_len) {
            Ok(base) => base,
            Err(why) => return Err(self.fail(op, why)),
        };
        let stream = self.stream.cu_stream();
        if plan.upload_len > 0 {
            // SAFETY: the destination lies inside the scratch buffer (asserted above). The source
            // is pageable, so the driver has read it by the time the call returns.
            let copied = unsafe {
                cu_result::memcpy_htod_async(
                    base + plan.upload_to as u64,
                    &staging[..plan.upload_len],
                    stream,
                )
            };
            if let Err(e) = copied {
                return Err(self.fail(op, format!("copying to the device failed: {e:?}")));
            }
        }
        self.collective(op, limits, plan.coll.offset_by(base))?;
        if plan.download_len > 0 {
            // SAFETY: the source lies inside the scratch buffer and the stream is idle (the
            // collective completed); a copy into pageable memory returns once it is done.
            let copied = unsafe {
                cu_result::memcpy_dtoh_async(
                    &mut staging[..plan.download_len],
                    base + plan.download_from as u64,
                    stream,
                )
            };
            if let Err(e) = copied {
                return Err(self.fail(op, format!("copying from the device failed: {e:?}")));
            }
            let mut live = Live {
                comm: &mut self.comm,
                stream: Some(stream),
            };
            self.watchdog.wait(op, limits.0, limits.1, &mut live)?;
        }
        Ok(())
    }

    fn fail(&mut self, op: &'static str, detail: String) -> CommError {
        let mut live = Live {
            comm: &mut self.comm,
            stream: None,
        };
        self.watchdog.fail(op, detail, &mut live)
    }

    /// The scratch buffer's device address, grown to at least `len` bytes.
    fn ensure_scratch(&mut self, len: usize) -> std::result::Result<u64, String> {
        if len <= self.scratch_len {
            return Ok(self.scratch_ptr);
        }
        let want = len
            .max(self.scratch_len.saturating_mul(2))
            .next_multiple_of(SCRATCH_GRANULE_BYTES);
        // Free the old buffer first (stream-ordered; the stream is idle between collectives).
        self.scratch = None;
        self.scratch_len = 0;
        let slice = self
            .stream
            .alloc_zeros::<u8>(want)
            .map_err(|e| format!("allocating {want} bytes of device scratch failed: {e:?}"))?;
        let address = {
            let (address, _record) = slice.device_ptr(&self.stream);
            address
        };
        self.scratch_ptr = address;
        self.scratch_len = want;
        self.scratch = Some(slice);
        Ok(address)
    }
}

/// The setup error for a failed or timed-out `ncclCommInitRankConfig`.
fn init_error(s: &Params, e: CommError) -> CommError {
    let detail = match e {
        CommError::Timeout { .. } => format!(
            "the NCCL communicator of {} ranks did not come up within {} ms: some rank did not \
             join (not started, crashed, given another rendezvous key or world size, or its \
             network is blocked; NCCL_DEBUG=INFO shows which)",
            s.world, s.timeout_ms
        ),
        other => format!("creating the NCCL communicator failed: {other}"),
    };
    setup_error(s.rank, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_cover_what_each_collective_touches() {
        let f32t = nccl::ncclDataType_t::ncclFloat32;
        let rs = Coll::ReduceScatter {
            send: 0,
            recv: 8,
            recv_count: 2,
            dtype: f32t,
        };
        assert_eq!(rs.extent(4), 32);
        let ag = Coll::AllGather {
            send: 24,
            recv: 0,
            send_count: 2,
            dtype: f32t,
        };
        assert_eq!(ag.extent(4), 32);
        assert_eq!(ag.offset_by(100).extent(4), 132);
        assert_eq!(dtype_bytes(nccl::ncclDataType_t::ncclBfloat16), 2);
    }

    #[test]
    fn the_config_is_marked_initialised_and_non_blocking() {
        let c = nonblocking_config();
        assert_eq!(c.magic, NCCL_CONFIG_MAGIC);
        assert_eq!(c.blocking, 0);
        assert_eq!(c.size, std::mem::size_of::<nccl::ncclConfig_t>());
        assert_eq!(c.minCTAs, c_int::MIN);
    }
}
