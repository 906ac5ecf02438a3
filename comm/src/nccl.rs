//! NCCL backend (feature `cuda`): one rank per GPU, collectives on device buffers through
//! `cudarc::nccl`, plus the host-slice `Communicator` methods on top of them.
//!
//! - Setup: [`NcclComm::init`] checks that the CUDA driver and NCCL can be opened (cudarc panics
//!   on a missing library, so this comes before any CUDA call), exchanges NCCL's unique id
//!   through a file in the run directory ([`rendezvous`]), and creates the communicator.
//!   [`NcclComm::init_through`] exchanges the id over another `Communicator` (MPI) instead.
//! - Rendezvous key: the id file is `<run dir>/nccl-id-<key>`. The key must be the same on every
//!   rank of one launch attempt and differ between attempts, so that a file left by an earlier
//!   attempt is never read: under `srun` use [`rendezvous::rendezvous_key_from_env`] (SLURM job,
//!   step and restart count); a local supervisor sets [`rendezvous::RENDEZVOUS_KEY_ENV`] to a
//!   fresh nonce per attempt. Several nodes need the run directory on a shared filesystem.
//! - Threads: cudarc's NCCL handle is neither `Send` nor `Sync`, and NCCL wants one thread at a
//!   time on a communicator. A dedicated owner thread per rank creates the communicator, holds
//!   it for its whole life and makes every NCCL call; `NcclComm` sends it requests over a channel
//!   and waits for the reply, at most the deadline plus a grace period, so even a CUDA or NCCL
//!   call that never returns cannot hang the caller.
//! - Deadline: the communicator is non-blocking (`ncclCommInitRankConfig` with `blocking = 0`),
//!   so no NCCL call blocks; the owner thread polls `ncclCommGetAsyncError` and the stream until
//!   the operation completes or `timeout()` passes. On expiry or on any NCCL error it calls
//!   `ncclCommAbort` once, which also stops NCCL kernels still running on the GPU, and the call
//!   returns [`CommError::Timeout`](crate::CommError::Timeout) or
//!   [`CommError::Backend`](crate::CommError::Backend); every later call fails at once.
//! - Determinism: NCCL's sums are not in rank order (ring, tree or NVLS order, chosen by NCCL
//!   from the topology, the world size and the message size), so results are not bit-equal to
//!   `ThreadsComm` or `MpiComm`. They are repeatable from run to run when the NCCL version, the
//!   world size, the topology and the `NCCL_*` environment stay the same. Lengths are not
//!   cross-checked between ranks (that would cost a collective per call): ranks that pass
//!   different lengths hang until the deadline aborts the communicator.

pub mod rendezvous;
mod watchdog;

#[cfg(feature = "cuda")]
mod comm;
#[cfg(feature = "cuda")]
mod libs;
#[cfg(feature = "cuda")]
mod owner;

#[cfg(feature = "cuda")]
pub use comm::NcclComm;
#[cfg(feature = "cuda")]
pub use libs::libraries_available;
pub use rendezvous::NcclId;
