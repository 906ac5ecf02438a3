//! MPI backend (feature `mpi`): one rank per process under `mpirun` or `srun --mpi=pmix`, built
//! on rsmpi's raw bindings so that every MPI return code is checked.
//!
//! - Determinism: sums never use MPI's own reduction, whose order depends on the algorithm Open
//!   MPI picks. An all-reduce is an all-to-all that brings chunk `r` of every rank's buffer to
//!   rank `r`, a sum of those chunks in rank order (the same kernel and order as the threads
//!   backend, so both give the same bits), and an all-gather of the reduced chunks.
//! - Agreement: every collective starts with one small all-reduce (max) of a header holding the
//!   operation, lengths, root and a local-error flag, so mismatched calls become
//!   [`CommError::BadArgument`] on every rank instead of undefined behaviour or a hang. Barrier
//!   and min/max are that header alone.
//! - Errors: the communicator uses `MPI_ERRORS_RETURN`; codes become [`CommError::Backend`].
//! - Deadline: an MPI collective cannot be cancelled, so a watchdog thread ends the process (exit
//!   code 3, one line on stderr) when a collective outlives `timeout()`; see `Watchdog`.

use std::cell::RefCell;
use std::ffi::{c_int, c_void};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ::mpi::environment::Universe;
use ::mpi::ffi;
use ::mpi::Threading;

use crate::kind::Kind;
use crate::reduce::{chunk_range, sum_regions, Elem};
use crate::{CommError, Communicator, Result};

/// Exit code of a process whose collective outlived its deadline.
pub const WATCHDOG_EXIT_CODE: i32 = 3;

/// How long the idle watchdog sleeps before it checks for shutdown again.
const WATCHDOG_IDLE_POLL_MS: u64 = 1_000;

/// What a rank brings to a collective; see [`MpiComm::agree`].
struct Header {
    kind: Kind,
    len: u64,
    root: u64,
    value: u64,
    /// Why this rank's own arguments are unusable, if they are.
    local_error: Option<String>,
}

impl Header {
    fn new(kind: Kind, len: usize) -> Self {
        Header {
            kind,
            len: len as u64,
            root: 0,
            value: 0,
            local_error: None,
        }
    }
}

/// An element type with its MPI datatype.
trait MpiElem: Elem {
    fn datatype() -> ffi::MPI_Datatype;
}

impl MpiElem for f32 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: a constant handle that mpi-sys initialises at link time.
        unsafe { ffi::RSMPI_FLOAT }
    }
}

impl MpiElem for f64 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: as above.
        unsafe { ffi::RSMPI_DOUBLE }
    }
}

/// A communicator handle that may move between threads.
struct RawComm(ffi::MPI_Comm);

// SAFETY: MPI is initialised with at least `MPI_THREAD_SERIALIZED` (checked in `init`), which
// allows calls from any thread as long as they do not overlap; `MpiComm` is `Send` but not `Sync`
// and the watchdog never calls MPI, so calls on this handle are serialized.
unsafe impl Send for RawComm {}

/// Per-rank counts and displacements of an all-to-all; reused between calls.
#[derive(Default)]
struct Counts {
    send: Vec<c_int>,
    send_displs: Vec<c_int>,
    recv: Vec<c_int>,
    recv_displs: Vec<c_int>,
}

/// One MPI rank of a run; see [`MpiComm::init`].
pub struct MpiComm {
    comm: RawComm,
    rank: usize,
    world: usize,
    timeout_ms: u64,
    counts: RefCell<Counts>,
    /// Receive areas of the sums, grown on first use and then reused.
    scratch_f32: RefCell<Vec<f32>>,
    scratch_f64: RefCell<Vec<f64>>,
    watchdog: Watchdog,
    /// Finalizes MPI when dropped; taken in `Drop` after `comm` is freed.
    universe: Option<Universe>,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("world_size", &self.world)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Turns an MPI return code into a result, with MPI's own description of the error.
fn check(op: &'static str, code: c_int) -> Result<()> {
    if code == ffi::MPI_SUCCESS as c_int {
        return Ok(());
    }
    let mut text = [0u8; ffi::MPI_MAX_ERROR_STRING as usize];
    let mut text_len: c_int = 0;
    // SAFETY: the buffer has MPI_MAX_ERROR_STRING bytes, as MPI_Error_string requires.
    let described = unsafe { ffi::MPI_Error_string(code, text.as_mut_ptr().cast(), &mut text_len) };
    let text_len = usize::try_from(text_len).unwrap_or(0).min(text.len());
    let text = if described == ffi::MPI_SUCCESS as c_int {
        String::from_utf8_lossy(&text[..text_len]).into_owned()
    } else {
        "no description".to_string()
    };
    Err(CommError::Backend {
        backend: "MPI",
        op,
        detail: format!(
            "error code {code} ({text}); check that every rank runs the same program and that \
             the MPI installation is healthy"
        ),
    })
}

fn backend_error(op: &'static str, detail: String) -> CommError {
    CommError::Backend {
        backend: "MPI",
        op,
        detail,
    }
}

/// A count as MPI's `int`, or the reason it does not fit.
fn count(n: usize) -> std::result::Result<c_int, String> {
    c_int::try_from(n).map_err(|_| {
        format!(
            "{n} elements exceed MPI's count limit of {}; split the collective",
            c_int::MAX
        )
    })
}

impl MpiComm {
    /// Initialises MPI (once per process, at `MPI_THREAD_SERIALIZED`) and returns this process's
    /// rank of `MPI_COMM_WORLD`, whose collectives each may take at most `collective_timeout_ms`
    /// before the watchdog ends the process with exit code [`WATCHDOG_EXIT_CODE`].
    pub fn init(collective_timeout_ms: u64) -> Result<MpiComm> {
        let op = "init";
        let (universe, threading) = ::mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| {
                backend_error(
                    op,
                    "MPI is already initialised in this process; create one MpiComm per process"
                        .to_string(),
                )
            })?;
        if threading < Threading::Serialized {
            return Err(backend_error(
                op,
                format!(
                    "the MPI library provides thread level {threading:?}, Lazarus needs \
                     Serialized; use an MPI build with thread support (Open MPI 4 has it)"
                ),
            ));
        }
        let mut comm = ffi::MPI_Comm(std::ptr::null_mut());
        let (mut rank, mut world): (c_int, c_int) = (0, 0);
        // SAFETY: MPI is initialised; the out-pointers are valid locals. Errors on the world
        // communicator return instead of aborting, and the duplicate inherits that handler.
        unsafe {
            check(
                op,
                ffi::MPI_Comm_set_errhandler(ffi::RSMPI_COMM_WORLD, ffi::RSMPI_ERRORS_RETURN),
            )?;
            check(op, ffi::MPI_Comm_dup(ffi::RSMPI_COMM_WORLD, &mut comm))?;
            check(
                op,
                ffi::MPI_Comm_set_errhandler(comm, ffi::RSMPI_ERRORS_RETURN),
            )?;
            check(op, ffi::MPI_Comm_rank(comm, &mut rank))?;
            check(op, ffi::MPI_Comm_size(comm, &mut world))?;
        }
        let rank = usize::try_from(rank).map_err(|_| backend_error(op, "negative rank".into()))?;
        let world = usize::try_from(world).map_err(|_| backend_error(op, "bad size".into()))?;
        let watchdog = Watchdog::start(rank, collective_timeout_ms)
            .map_err(|e| backend_error(op, format!("cannot start the watchdog thread: {e}")))?;
        Ok(MpiComm {
            comm: RawComm(comm),
            rank,
            world,
            timeout_ms: collective_timeout_ms,
            counts: RefCell::new(Counts::default()),
            scratch_f32: RefCell::new(Vec::new()),
            scratch_f64: RefCell::new(Vec::new()),
            watchdog,
            universe: Some(universe),
        })
    }

    /// All-reduces the header (max of each value and of its complement, which gives the min):
    /// returns `(min, max)` of `value` over ranks, or `BadArgument` on every rank when the ranks
    /// disagree on the operation, length or root, or any rank's own arguments are unusable.
    fn agree(&self, header: Header) -> Result<(u64, u64)> {
        let op = header.kind.name();
        let bad_rank = match header.local_error {
            Some(_) => self.rank as u64 + 1,
            None => 0,
        };
        let kind = header.kind as u64;
        let send = [
            kind,
            !kind,
            header.len,
            !header.len,
            header.root,
            !header.root,
            bad_rank,
            header.value,
            !header.value,
        ];
        let mut all = [0u64; 9];
        // SAFETY: both arrays hold 9 u64, matching the count and datatype.
        check(op, unsafe {
            ffi::MPI_Allreduce(
                send.as_ptr().cast(),
                all.as_mut_ptr().cast(),
                9,
                ffi::RSMPI_UINT64_T,
                ffi::RSMPI_MAX,
                self.comm.0,
            )
        })?;
        let detail = if let Some(own) = header.local_error {
            Some(own)
        } else if all[0] != !all[1] {
            Some(format!(
                "ranks called different collectives (this rank `{op}`); every rank must call \
                 the same collectives in the same order"
            ))
        } else if all[2] != !all[3] {
            Some(format!(
                "ranks passed buffers of {} to {} elements; every rank must pass the same length",
                !all[3], all[2]
            ))
        } else if all[4] != !all[5] {
            Some("ranks named different roots; every rank must name the same root".to_string())
        } else if all[6] != 0 {
            Some(format!(
                "rank {} passed unusable buffers (see its error)",
                all[6] - 1
            ))
        } else {
            None
        };
        match detail {
            Some(detail) => Err(CommError::BadArgument { op, detail }),
            None => Ok((!all[8], all[7])),
        }
    }

    fn all_reduce<T: MpiElem>(
        &self,
        kind: Kind,
        buf: &mut [T],
        scratch: &RefCell<Vec<T>>,
    ) -> Result<()> {
        let op = kind.name();
        let _armed = self.watchdog.arm(op);
        let mut header = Header::new(kind, buf.len());
        header.local_error = count(buf.len()).err();
        self.agree(header)?;
        if self.world == 1 {
            return Ok(());
        }
        let mine = chunk_range(buf.len(), self.world, self.rank).len();
        let mut counts = self.counts.borrow_mut();
        counts.fill(buf.len(), self.world, mine);
        let mut values = scratch.borrow_mut();
        values.resize((self.world + 1) * mine, T::default());
        let (regions, reduced) = values.split_at_mut(self.world * mine);
        // SAFETY: `buf` holds chunk q at send_displs[q] with send[q] elements; `regions` holds
        // world regions of `mine` at recv_displs. All ranks agreed on the length, so the counts
        // match pairwise, and they fit in c_int (checked).
        check(op, unsafe {
            ffi::MPI_Alltoallv(
                buf.as_ptr().cast(),
                counts.send.as_ptr(),
                counts.send_displs.as_ptr(),
                T::datatype(),
                regions.as_mut_ptr().cast(),
                counts.recv.as_ptr(),
                counts.recv_displs.as_ptr(),
                T::datatype(),
                self.comm.0,
            )
        })?;
        sum_regions(regions, self.world, reduced);
        // SAFETY: `reduced` holds `mine` elements; `buf` receives chunk q at send_displs[q].
        check(op, unsafe {
            ffi::MPI_Allgatherv(
                reduced.as_ptr().cast(),
                mine as c_int,
                T::datatype(),
                buf.as_mut_ptr().cast(),
                counts.send.as_ptr(),
                counts.send_displs.as_ptr(),
                T::datatype(),
                self.comm.0,
            )
        })
    }
}

impl Counts {
    /// Counts of an all-reduce of `len` elements split into one chunk per rank: this rank sends
    /// chunk q to rank q and receives its own chunk (`mine` elements) from every rank.
    fn fill(&mut self, len: usize, world: usize, mine: usize) {
        self.send.clear();
        self.send_displs.clear();
        self.recv.clear();
        self.recv_displs.clear();
        for q in 0..world {
            let theirs = chunk_range(len, world, q);
            // Casts cannot truncate: the agreement checked that `len` fits in c_int.
            self.send.push(theirs.len() as c_int);
            self.send_displs.push(theirs.start as c_int);
            self.recv.push(mine as c_int);
            self.recv_displs.push((q * mine) as c_int);
        }
    }
}

impl Communicator for MpiComm {
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
        self.all_reduce(Kind::AllReduceF32, buf, &self.scratch_f32)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(Kind::AllReduceF64, buf, &self.scratch_f64)
    }

    fn reduce_scatter_sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let kind = Kind::ReduceScatterF32;
        let op = kind.name();
        let _armed = self.watchdog.arm(op);
        let mut header = Header::new(kind, recv.len());
        header.local_error = check_parts(send.len(), recv.len(), self.world, "send", "recv");
        self.agree(header)?;
        let mut regions = self.scratch_f32.borrow_mut();
        regions.resize(send.len(), 0.0);
        // SAFETY: `send` and `regions` hold world x recv.len() elements; counts are equal on all
        // ranks (agreed) and fit in c_int (checked).
        check(op, unsafe {
            ffi::MPI_Alltoall(
                send.as_ptr().cast(),
                recv.len() as c_int,
                ffi::RSMPI_FLOAT,
                regions.as_mut_ptr().cast(),
                recv.len() as c_int,
                ffi::RSMPI_FLOAT,
                self.comm.0,
            )
        })?;
        sum_regions(&regions, self.world, recv);
        Ok(())
    }

    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let kind = Kind::AllGatherF32;
        let op = kind.name();
        let _armed = self.watchdog.arm(op);
        let mut header = Header::new(kind, send.len());
        header.local_error = check_parts(recv.len(), send.len(), self.world, "recv", "send");
        self.agree(header)?;
        // SAFETY: `send` holds send.len() elements, `recv` world times that; counts are equal
        // on all ranks (agreed) and fit in c_int (checked).
        check(op, unsafe {
            ffi::MPI_Allgather(
                send.as_ptr().cast(),
                send.len() as c_int,
                ffi::RSMPI_FLOAT,
                recv.as_mut_ptr().cast(),
                send.len() as c_int,
                ffi::RSMPI_FLOAT,
                self.comm.0,
            )
        })
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let kind = Kind::Broadcast;
        let op = kind.name();
        let _armed = self.watchdog.arm(op);
        let mut header = Header::new(kind, buf.len());
        header.root = root as u64;
        header.local_error = count(buf.len()).err();
        if root >= self.world {
            header.local_error = Some(format!("root {root} out of range for {} ranks", self.world));
        }
        self.agree(header)?;
        // SAFETY: `buf` holds buf.len() bytes on every rank (agreed), which fits in c_int.
        check(op, unsafe {
            ffi::MPI_Bcast(
                buf.as_mut_ptr().cast::<c_void>(),
                buf.len() as c_int,
                ffi::RSMPI_UINT8_T,
                root as c_int,
                self.comm.0,
            )
        })
    }

    fn barrier(&self) -> Result<()> {
        // The header all-reduce completes only once every rank has contributed: a barrier.
        let _armed = self.watchdog.arm(Kind::Barrier.name());
        self.agree(Header::new(Kind::Barrier, 0)).map(|_| ())
    }

    fn all_reduce_min_u64(&self, value: u64) -> Result<u64> {
        let _armed = self.watchdog.arm(Kind::MinU64.name());
        let mut header = Header::new(Kind::MinU64, 0);
        header.value = value;
        self.agree(header).map(|(min, _)| min)
    }

    fn all_reduce_max_u64(&self, value: u64) -> Result<u64> {
        let _armed = self.watchdog.arm(Kind::MaxU64.name());
        let mut header = Header::new(Kind::MaxU64, 0);
        header.value = value;
        self.agree(header).map(|(_, max)| max)
    }
}

/// Checks `full == world * part` and that both fit MPI's counts; returns the problem if not.
fn check_parts(
    full: usize,
    part: usize,
    world: usize,
    full_name: &str,
    part_name: &str,
) -> Option<String> {
    if Some(full) != part.checked_mul(world) {
        return Some(format!(
            "{full_name} has {full} elements, expected world size {world} x {part_name} length \
             {part} = {}; pad the buffer to a multiple of the world size",
            part.saturating_mul(world)
        ));
    }
    count(full).err()
}

/// MPI's environment once its `MpiComm` is gone, waiting for [`finalize`] or [`abort`].
static PARKED_UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

impl Drop for MpiComm {
    fn drop(&mut self) {
        // Neither the duplicated communicator nor MPI itself is released here: both are
        // collective, and a rank dropped on an error path (its peers still waiting in some
        // collective) would block. The process decides: `finalize()` after success, `abort()`
        // after an error, which tears the whole job down.
        let universe = self.universe.take();
        *PARKED_UNIVERSE.lock().unwrap_or_else(|p| p.into_inner()) = universe;
        self.watchdog.stop();
    }
}

/// Finalizes MPI after every rank succeeded (collective; call after the `MpiComm` is dropped).
pub fn finalize() {
    let universe = PARKED_UNIVERSE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    drop(universe);
}

/// Ends every process of the job with `code` (MPI_Abort on MPI_COMM_WORLD): the way out after
/// an error on one rank, whose peers may be blocked in a collective.
pub fn abort(code: i32) -> ! {
    // SAFETY: MPI_Abort takes the predefined world communicator and an error code; it does not
    // return (Open MPI kills the job's processes, this one included).
    unsafe {
        ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code);
    }
    std::process::exit(code)
}

/// The deadline of MPI collectives. A rank blocked inside an MPI collective cannot be woken by
/// any MPI call (Open MPI 4 has no cancellable collectives), so when a collective outlives its
/// deadline the only way to keep the job from hanging forever is to end this process: the
/// watchdog prints one line naming the operation and rank to stderr and calls `_exit(3)`.
/// `mpirun`, `srun --kill-on-bad-exit=1` or `lazarus launch` then tear down the other ranks and
/// the next start restores from the last committed checkpoint. This is the one place where the
/// library ends the process.
struct Watchdog {
    shared: Arc<WatchShared>,
    thread: Option<JoinHandle<()>>,
}

struct WatchShared {
    state: Mutex<WatchState>,
    changed: Condvar,
    rank: usize,
    timeout_ms: u64,
}

struct WatchState {
    /// The collective in progress and its deadline.
    in_flight: Option<(&'static str, Instant)>,
    shutdown: bool,
}

impl WatchShared {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Disarms the watchdog when the collective returns.
struct Armed<'a>(&'a Watchdog);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.shared.lock().in_flight = None;
    }
}

impl Watchdog {
    fn start(rank: usize, timeout_ms: u64) -> std::io::Result<Watchdog> {
        let shared = Arc::new(WatchShared {
            state: Mutex::new(WatchState {
                in_flight: None,
                shutdown: false,
            }),
            changed: Condvar::new(),
            rank,
            timeout_ms,
        });
        let watched = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("lazarus-comm-watchdog".into())
            .spawn(move || watch(&watched))?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    fn arm(&self, op: &'static str) -> Armed<'_> {
        let now = Instant::now();
        let deadline = now
            .checked_add(Duration::from_millis(self.shared.timeout_ms))
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
        self.shared.lock().in_flight = Some((op, deadline));
        self.shared.changed.notify_all();
        Armed(self)
    }

    fn stop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            // The thread returns as soon as it sees `shutdown`; it never blocks on anything else.
            let _ = thread.join();
        }
    }
}

/// The watchdog thread: sleeps while no collective is in flight (waking every
/// `WATCHDOG_IDLE_POLL_MS` to check for shutdown), and ends the process when the collective in
/// flight passes its deadline. It runs for the life of the communicator; each wait is bounded.
fn watch(shared: &WatchShared) {
    let mut state = shared.lock();
    while !state.shutdown {
        let wait = match state.in_flight {
            None => Duration::from_millis(WATCHDOG_IDLE_POLL_MS),
            Some((op, deadline)) => {
                let now = Instant::now();
                if now >= deadline {
                    eprintln!(
                        "lazarus-comm: MPI collective `{op}` on rank {} did not complete within \
                         {} ms (dead or hung peer); exiting with code {WATCHDOG_EXIT_CODE} so the \
                         job is torn down and restarted from the last committed checkpoint",
                        shared.rank, shared.timeout_ms
                    );
                    // SAFETY: `_exit` ends the process at once without running atexit handlers,
                    // which could block on the MPI state the stuck collective holds.
                    unsafe { libc::_exit(WATCHDOG_EXIT_CODE) };
                }
                deadline - now
            }
        };
        state = match shared.changed.wait_timeout(state, wait) {
            Ok((state, _)) => state,
            Err(poisoned) => poisoned.into_inner().0,
        };
    }
}
