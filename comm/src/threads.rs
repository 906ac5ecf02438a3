//! In-process backend: `world_size` ranks as threads of one process, exchanging buffers through
//! shared memory without copies into a staging area.
//!
//! Protocol of one collective (all ranks call the same collectives in the same order, so the
//! `n`-th call of every rank is generation `n`):
//! 1. Arrival: a rank publishes its slot (operation, lengths, buffer addresses) under the group
//!    mutex. The last rank to arrive checks that all slots agree and records the verdict; the
//!    others wait for it until the deadline. A rank whose deadline expires first marks the group
//!    broken, atomically with respect to arrivals, so a late rank can never start reading.
//! 2. Reading: only after a complete, valid arrival do ranks read each other's buffers. Each rank
//!    reduces or copies the part it owns, adding contributions in rank order.
//! 3. Departure: a rank returns only when every rank has finished reading (an `Exposure` guard
//!    waits for that in `Drop`, also while unwinding), so no peer touches a buffer whose owner
//!    has returned from the call.
//!
//! A timeout or a dropped handle breaks the group for good: every later call fails at once.

use std::cell::{Cell, RefCell};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::kind::Kind;
use crate::reduce::{chunk_range, sum_in_rank_order, Elem};
use crate::{CommError, Communicator, Result, COLLECTIVE_TIMEOUT_MS_DEFAULT};

/// Lower bound of the wait for peers to finish reading this rank's buffers. Once buffers are
/// exposed the peers run only this module's copy and sum loops, so that wait cannot depend on the
/// caller; the bound only guards against a bug.
const EXPOSED_WAIT_MS_MIN: u64 = 60_000;

/// What one rank published for one collective. Addresses are stored as integers; they are only
/// dereferenced between a valid arrival and the departure of the generation.
#[derive(Clone, Copy, Debug)]
struct Slot {
    generation: u64,
    kind: Kind,
    send_addr: usize,
    send_len: usize,
    recv_len: usize,
    root: usize,
    value: u64,
}

impl Slot {
    fn new(kind: Kind) -> Self {
        Slot {
            generation: 0,
            kind,
            send_addr: 0,
            send_len: 0,
            recv_len: 0,
            root: 0,
            value: 0,
        }
    }
}

/// Why the group can no longer be used.
#[derive(Clone, Debug)]
enum Broken {
    Timeout {
        missing: Vec<usize>,
        timeout_ms: u64,
    },
    Lost {
        peer: usize,
    },
}

impl Broken {
    fn to_error(&self, op: &'static str, rank: usize) -> CommError {
        match self {
            Broken::Timeout {
                missing,
                timeout_ms,
            } => CommError::Timeout {
                op,
                rank,
                timeout_ms: *timeout_ms,
                missing: missing.clone(),
            },
            Broken::Lost { peer } => CommError::PeerLost {
                op,
                rank,
                peer: *peer,
            },
        }
    }
}

#[derive(Debug)]
struct State {
    /// Slot of each rank; `slots[q].generation == g` means rank `q` arrived for generation `g`.
    slots: Vec<Slot>,
    /// Last generation whose arrival completed.
    completed: u64,
    /// Why generation `completed` is invalid (`BadArgument` detail), if it is.
    verdict: Option<String>,
    /// Result of generation `completed` when it is a min/max.
    value: u64,
    /// Last generation in which each rank finished its reduction phase (all-reduce only).
    reduced: Vec<u64>,
    /// Last generation in which each rank finished reading peers' buffers.
    read_done: Vec<u64>,
    broken: Option<Broken>,
}

#[derive(Debug)]
struct Group {
    world: usize,
    timeout_ms: u64,
    state: Mutex<State>,
    changed: Condvar,
}

impl Group {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; recover the state should that ever change.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits on the condition variable until `deadline` at the latest.
    fn wait_until<'a>(
        &self,
        state: MutexGuard<'a, State>,
        deadline: Instant,
    ) -> MutexGuard<'a, State> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.changed.wait_timeout(state, left) {
            Ok((state, _)) => state,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }
}

/// One rank of an in-process group; see [`ThreadsComm::group`]. Each handle is moved into the
/// thread that plays its rank. Dropping a handle (the thread ends or panics) makes the other
/// ranks' pending and later collectives fail with [`CommError::PeerLost`].
pub struct ThreadsComm {
    rank: usize,
    group: Arc<Group>,
    /// Number of collectives this rank has entered; the current one is the generation.
    generation: Cell<u64>,
    /// Send addresses of all ranks for the current generation, copied at arrival.
    peer_addrs: RefCell<Vec<usize>>,
}

impl std::fmt::Debug for ThreadsComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadsComm")
            .field("rank", &self.rank)
            .field("world_size", &self.group.world)
            .field("timeout_ms", &self.group.timeout_ms)
            .finish()
    }
}

impl ThreadsComm {
    /// Creates a group of `world_size` ranks whose collectives each wait at most
    /// `collective_timeout_ms` for the other ranks (use [`COLLECTIVE_TIMEOUT_MS_DEFAULT`] when in
    /// doubt). Element `r` of the result is rank `r`.
    ///
    /// # Panics
    /// If `world_size` is 0.
    pub fn group(world_size: usize, collective_timeout_ms: u64) -> Vec<ThreadsComm> {
        assert!(world_size > 0, "a group needs at least one rank");
        let group = Arc::new(Group {
            world: world_size,
            timeout_ms: collective_timeout_ms,
            state: Mutex::new(State {
                slots: vec![Slot::new(Kind::Barrier); world_size],
                completed: 0,
                verdict: None,
                value: 0,
                reduced: vec![0; world_size],
                read_done: vec![0; world_size],
                broken: None,
            }),
            changed: Condvar::new(),
        });
        (0..world_size)
            .map(|rank| ThreadsComm {
                rank,
                group: Arc::clone(&group),
                generation: Cell::new(0),
                peer_addrs: RefCell::new(vec![0; world_size]),
            })
            .collect()
    }

    /// A group with the default deadline, [`COLLECTIVE_TIMEOUT_MS_DEFAULT`].
    pub fn group_with_default_timeout(world_size: usize) -> Vec<ThreadsComm> {
        Self::group(world_size, COLLECTIVE_TIMEOUT_MS_DEFAULT)
    }

    /// Publishes `slot` as this rank's part of the next collective and waits, at most
    /// `timeout()`, until every rank has arrived. Returns the min/max result of the generation.
    /// For operations that expose buffers, the peers' addresses are left in `peer_addrs`.
    fn arrive(&self, mut slot: Slot) -> Result<u64> {
        let op = slot.kind.name();
        let generation = self.generation.get() + 1;
        self.generation.set(generation);
        slot.generation = generation;
        let deadline = deadline_after(self.timeout());
        let group = &*self.group;
        let mut state = group.lock();
        if let Some(broken) = &state.broken {
            return Err(broken.to_error(op, self.rank));
        }
        state.slots[self.rank] = slot;
        if state.slots.iter().all(|s| s.generation == generation) {
            complete_arrival(&mut state, group.world, generation);
            group.changed.notify_all();
        }
        // Bounded by `deadline`: every pass either returns or waits for the time left.
        while state.completed != generation {
            if let Some(broken) = &state.broken {
                return Err(broken.to_error(op, self.rank));
            }
            if Instant::now() >= deadline {
                let missing = (0..group.world)
                    .filter(|&q| state.slots[q].generation != generation)
                    .collect();
                let broken = Broken::Timeout {
                    missing,
                    timeout_ms: group.timeout_ms,
                };
                let err = broken.to_error(op, self.rank);
                state.broken = Some(broken);
                group.changed.notify_all();
                return Err(err);
            }
            state = group.wait_until(state, deadline);
        }
        if let Some(detail) = &state.verdict {
            return Err(CommError::BadArgument {
                op,
                detail: detail.clone(),
            });
        }
        if slot.kind.exposes_buffers() {
            // Peers cannot publish the next generation before this rank has left this one.
            let mut addrs = self.peer_addrs.borrow_mut();
            for (addr, peer) in addrs.iter_mut().zip(&state.slots) {
                *addr = peer.send_addr;
            }
        }
        Ok(state.value)
    }

    /// Marks this rank's reduction phase of the current generation done and waits until every
    /// rank's is (all-reduce: nobody copies a reduced chunk before its owner wrote it).
    fn wait_reduced(&self, op: &'static str) -> Result<()> {
        let generation = self.generation.get();
        let group = &*self.group;
        let deadline = deadline_after(self.exposed_wait_bound());
        let mut state = group.lock();
        state.reduced[self.rank] = generation;
        group.changed.notify_all();
        // Bounded by `deadline`.
        while state.reduced.iter().any(|&g| g != generation) {
            if let Some(broken) = &state.broken {
                return Err(broken.to_error(op, self.rank));
            }
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (0..group.world)
                    .filter(|&q| state.reduced[q] != generation)
                    .collect();
                let broken = Broken::Timeout {
                    missing,
                    timeout_ms: self.exposed_wait_bound().as_millis() as u64,
                };
                let err = broken.to_error(op, self.rank);
                state.broken = Some(broken);
                group.changed.notify_all();
                return Err(err);
            }
            state = group.wait_until(state, deadline);
        }
        Ok(())
    }

    fn exposed_wait_bound(&self) -> Duration {
        Duration::from_millis(self.group.timeout_ms.max(EXPOSED_WAIT_MS_MIN))
    }

    fn expose(&self, op: &'static str) -> Exposure<'_> {
        Exposure { comm: self, op }
    }

    fn all_reduce<T: Elem>(&self, kind: Kind, buf: &mut [T]) -> Result<()> {
        let world = self.group.world;
        let len = buf.len();
        // From here on the buffer is only accessed through `own` and the peers' copies of it.
        let own = buf.as_mut_ptr();
        let mut slot = Slot::new(kind);
        slot.send_addr = own as usize;
        slot.send_len = len;
        self.arrive(slot)?;
        let _exposure = self.expose(kind.name());
        if world == 1 {
            return Ok(());
        }
        let addrs = self.peer_addrs.borrow();
        let mine = chunk_range(len, world, self.rank);
        // SAFETY: all ranks validated equal lengths at arrival and stay in this call until every
        // rank has finished reading (`_exposure`). In this phase rank r reads chunk r of every
        // buffer and writes only chunk r of its own, so no range is written while another rank
        // reads it. `dst` is exactly this rank's source `self.rank`, which the kernel allows.
        unsafe {
            sum_in_rank_order(
                world,
                |q| (addrs[q] as *const T).add(mine.start),
                own.add(mine.start),
                mine.len(),
            );
        }
        self.wait_reduced(kind.name())?;
        for (q, &addr) in addrs.iter().enumerate().filter(|&(q, _)| q != self.rank) {
            let theirs = chunk_range(len, world, q);
            // SAFETY: every rank has finished reducing (`wait_reduced`), so chunk q of rank q is
            // final and no longer written; this rank writes chunk q of its own buffer, which no
            // peer reads in this phase (peers read only their own chunk of others' buffers).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (addr as *const T).add(theirs.start),
                    own.add(theirs.start),
                    theirs.len(),
                );
            }
        }
        Ok(())
    }
}

/// Marks the end of this rank's reads of peers' buffers and, on drop (also when unwinding),
/// waits until no peer reads this rank's buffers any more.
struct Exposure<'a> {
    comm: &'a ThreadsComm,
    op: &'static str,
}

impl Drop for Exposure<'_> {
    fn drop(&mut self) {
        let comm = self.comm;
        let group = &*comm.group;
        let generation = comm.generation.get();
        let deadline = deadline_after(comm.exposed_wait_bound());
        let mut state = group.lock();
        state.read_done[comm.rank] = generation;
        if std::thread::panicking() && state.broken.is_none() {
            state.broken = Some(Broken::Lost { peer: comm.rank });
        }
        group.changed.notify_all();
        // Bounded by `deadline`. Peers run only this module's loops here, never caller code.
        while state.read_done.iter().any(|&g| g != generation) {
            if Instant::now() >= deadline {
                // Returning (or unwinding) now could free a buffer a peer is still reading, and
                // a panic would do the same; aborting is the only memory-safe way out of this
                // broken invariant.
                eprintln!(
                    "lazarus-comm: threads `{}` on rank {}: peers still reading after {:?}; aborting",
                    self.op,
                    comm.rank,
                    comm.exposed_wait_bound()
                );
                std::process::abort();
            }
            state = group.wait_until(state, deadline);
        }
    }
}

/// The instant `wait` from now; a wait too long to represent is cut to a year.
fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Called by the last rank to arrive for `generation`: validates the slots and records the
/// verdict and the min/max value for all ranks.
fn complete_arrival(state: &mut State, world: usize, generation: u64) {
    state.verdict = validate(&state.slots, world);
    state.value = match state.slots[0].kind {
        Kind::MinU64 => state.slots.iter().map(|s| s.value).min().unwrap_or(0),
        Kind::MaxU64 => state.slots.iter().map(|s| s.value).max().unwrap_or(0),
        _ => 0,
    };
    state.completed = generation;
}

/// Checks that all ranks called the same collective with compatible buffers; returns what is
/// wrong, naming the rank.
fn validate(slots: &[Slot], world: usize) -> Option<String> {
    let first = slots[0];
    for (q, s) in slots.iter().enumerate() {
        if s.kind != first.kind {
            return Some(format!(
                "rank {q} called `{}` while rank 0 called `{}`; every rank must call the same \
                 collectives in the same order",
                s.kind.name(),
                first.kind.name()
            ));
        }
        let problem = match first.kind {
            Kind::AllReduceF32 | Kind::AllReduceF64 | Kind::Broadcast
                if s.send_len != first.send_len =>
            {
                Some(format!(
                    "rank {q} passed {} elements but rank 0 passed {}; every rank must pass a \
                     buffer of the same length",
                    s.send_len, first.send_len
                ))
            }
            Kind::Broadcast if s.root != first.root || s.root >= world => Some(format!(
                "rank {q} named root {} and rank 0 named root {} (world size {world}); every \
                 rank must name the same root, below the world size",
                s.root, first.root
            )),
            Kind::ReduceScatterF32 | Kind::AllGatherF32 => {
                validate_scatter_gather(s, first, world).map(|detail| format!("rank {q}: {detail}"))
            }
            _ => None,
        };
        if problem.is_some() {
            return problem;
        }
    }
    None
}

fn validate_scatter_gather(s: &Slot, first: Slot, world: usize) -> Option<String> {
    // Reduce-scatter sends `world` slices of `recv_len`; all-gather receives `world` of `send_len`.
    let (full, part, full_name, part_name) = match s.kind {
        Kind::ReduceScatterF32 => (s.send_len, s.recv_len, "send", "recv"),
        _ => (s.recv_len, s.send_len, "recv", "send"),
    };
    if Some(full) != part.checked_mul(world) {
        return Some(format!(
            "{full_name} has {full} elements, expected world size {world} x {part_name} length \
             {part} = {}; pad the buffer to a multiple of the world size",
            part.saturating_mul(world)
        ));
    }
    if s.send_len != first.send_len || s.recv_len != first.recv_len {
        return Some(format!(
            "buffers of {} / {} elements (send / recv) differ from rank 0's {} / {}; every rank \
             must pass buffers of the same lengths",
            s.send_len, s.recv_len, first.send_len, first.recv_len
        ));
    }
    None
}

impl Drop for ThreadsComm {
    fn drop(&mut self) {
        let mut state = self.group.lock();
        if state.broken.is_none() {
            state.broken = Some(Broken::Lost { peer: self.rank });
        }
        self.group.changed.notify_all();
    }
}

impl Communicator for ThreadsComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.group.timeout_ms)
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(Kind::AllReduceF32, buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(Kind::AllReduceF64, buf)
    }

    fn reduce_scatter_sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let kind = Kind::ReduceScatterF32;
        let mut slot = Slot::new(kind);
        slot.send_addr = send.as_ptr() as usize;
        slot.send_len = send.len();
        slot.recv_len = recv.len();
        self.arrive(slot)?;
        let _exposure = self.expose(kind.name());
        let addrs = self.peer_addrs.borrow();
        let start = self.rank * recv.len();
        // SAFETY: arrival validated `send.len() == world * recv.len()` on every rank, so slice
        // `rank` of each peer's `send` is in bounds. Send buffers are only read, and every rank
        // stays in this call until all reads are done (`_exposure`); `recv` is our own.
        unsafe {
            sum_in_rank_order(
                self.group.world,
                |q| (addrs[q] as *const f32).add(start),
                recv.as_mut_ptr(),
                recv.len(),
            );
        }
        Ok(())
    }

    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let kind = Kind::AllGatherF32;
        let mut slot = Slot::new(kind);
        slot.send_addr = send.as_ptr() as usize;
        slot.send_len = send.len();
        slot.recv_len = recv.len();
        self.arrive(slot)?;
        let _exposure = self.expose(kind.name());
        let addrs = self.peer_addrs.borrow();
        for (part, &addr) in recv.chunks_exact_mut(send.len().max(1)).zip(addrs.iter()) {
            // SAFETY: arrival validated that every `send` has `send.len()` elements and that
            // `recv` holds `world` of them. Send buffers are only read, and their owners stay
            // in this call until all reads are done (`_exposure`).
            let theirs = unsafe { std::slice::from_raw_parts(addr as *const f32, part.len()) };
            part.copy_from_slice(theirs);
        }
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let kind = Kind::Broadcast;
        let mut slot = Slot::new(kind);
        slot.send_addr = buf.as_ptr() as usize;
        slot.send_len = buf.len();
        slot.root = root;
        self.arrive(slot)?;
        let _exposure = self.expose(kind.name());
        if self.rank != root {
            let addr = self.peer_addrs.borrow()[root];
            // SAFETY: arrival validated equal lengths and a valid root. Only non-roots write,
            // each its own buffer; the root's buffer is only read, and the root stays in this
            // call until every rank has finished reading it (`_exposure`).
            let theirs = unsafe { std::slice::from_raw_parts(addr as *const u8, buf.len()) };
            buf.copy_from_slice(theirs);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.arrive(Slot::new(Kind::Barrier)).map(|_| ())
    }

    fn all_reduce_min_u64(&self, value: u64) -> Result<u64> {
        let mut slot = Slot::new(Kind::MinU64);
        slot.value = value;
        self.arrive(slot)
    }

    fn all_reduce_max_u64(&self, value: u64) -> Result<u64> {
        let mut slot = Slot::new(Kind::MaxU64);
        slot.value = value;
        self.arrive(slot)
    }
}
