//! Collectives between Lazarus ranks: the `Communicator` trait, its error type, and the
//! one-rank backend. Multi-rank backends implement the same trait: `ThreadsComm` (ranks as
//! threads of one process), `MpiComm` (feature `mpi`, one rank per process) and `NcclComm`
//! (feature `cuda`, one rank per GPU). `ThreadsComm` and `MpiComm` add the ranks' contributions
//! in rank order, so their results are bit-identical to each other; NCCL picks its own order
//! (see the `nccl` module).

use std::time::Duration;

mod kind;
#[cfg(feature = "mpi")]
pub mod mpi;
// The NCCL id exchange and the watchdog's timing logic need no GPU: test builds compile them
// without the feature too, so the default `cargo test` covers them.
#[cfg(any(feature = "cuda", test))]
pub mod nccl;
mod reduce;
pub mod threads;

#[cfg(feature = "mpi")]
pub use crate::mpi::MpiComm;
#[cfg(feature = "cuda")]
pub use crate::nccl::NcclComm;
pub use crate::threads::ThreadsComm;

/// Default deadline of a blocking collective: ten minutes.
pub const COLLECTIVE_TIMEOUT_MS_DEFAULT: u64 = 10 * 60 * 1000;

/// Everything that can go wrong in a collective.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A collective did not complete before its deadline; the listed ranks never arrived
    /// (empty when the backend cannot tell which, as with NCCL).
    #[error(
        "collective `{op}` timed out after {timeout_ms} ms on rank {rank}: {} (dead or hung \
         peer); the run must be restarted from the last committed checkpoint",
        describe_missing(.missing)
    )]
    Timeout {
        op: &'static str,
        rank: usize,
        timeout_ms: u64,
        missing: Vec<usize>,
    },
    /// Buffers passed to a collective do not have the sizes the operation needs.
    #[error("collective `{op}`: {detail}")]
    BadArgument { op: &'static str, detail: String },
    /// A peer went away (its channel closed or its process exited).
    #[error("collective `{op}` on rank {rank}: peer rank {peer} is gone")]
    PeerLost {
        op: &'static str,
        rank: usize,
        peer: usize,
    },
    /// An error reported by the transport library (MPI, NCCL).
    #[error("{backend} error in `{op}`: {detail}")]
    Backend {
        backend: &'static str,
        op: &'static str,
        detail: String,
    },
    /// The communicator could not be set up: a library or device is missing, or the ranks could
    /// not exchange what they need to connect (NCCL's unique id).
    #[error("{backend} setup on rank {rank}: {detail}")]
    Setup {
        backend: &'static str,
        rank: usize,
        detail: String,
    },
}

/// The part of a timeout message that names the ranks that never arrived.
fn describe_missing(missing: &[usize]) -> String {
    if missing.is_empty() {
        "some rank did not arrive (the backend cannot tell which)".to_string()
    } else {
        format!("rank(s) {missing:?} did not arrive")
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, CommError>;

/// The collectives a data-parallel rank needs. All calls are blocking and bounded by
/// `timeout()`; all ranks must call them in the same order.
pub trait Communicator: Send {
    /// This rank's index, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// The deadline applied to each blocking call.
    fn timeout(&self) -> Duration;
    /// Element-wise sum of `buf` over all ranks, in place. The reduction order is fixed
    /// (rank 0, 1, ...), so results are bit-identical between runs.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Element-wise sum of `buf` over all ranks, in place, in f64 (norms, loss sums).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Sums `send` (length `world_size * recv.len()`) over ranks and leaves slice `rank()` of
    /// the sum in `recv`.
    fn reduce_scatter_sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Gathers every rank's `send` into `recv` (length `world_size * send.len()`), in rank order.
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Copies `buf` of rank `root` to every rank; all ranks pass buffers of the same length.
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Minimum of `value` over all ranks.
    fn all_reduce_min_u64(&self, value: u64) -> Result<u64>;
    /// Maximum of `value` over all ranks.
    fn all_reduce_max_u64(&self, value: u64) -> Result<u64>;
}

/// The trivial communicator of a run with one rank: every collective is a copy or a no-op.
#[derive(Debug, Clone)]
pub struct SingleRank {
    timeout: Duration,
}

impl SingleRank {
    /// A one-rank communicator.
    pub fn new() -> Self {
        SingleRank {
            timeout: Duration::from_millis(COLLECTIVE_TIMEOUT_MS_DEFAULT),
        }
    }
}

impl Default for SingleRank {
    fn default() -> Self {
        Self::new()
    }
}

fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(CommError::BadArgument {
            op,
            detail: format!("{what} has {got} elements, expected {want}"),
        })
    }
}

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_len("reduce_scatter", "send", send.len(), recv.len())?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_len("all_gather", "recv", recv.len(), send.len())?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut [u8], root: usize) -> Result<()> {
        if root != 0 {
            return Err(CommError::BadArgument {
                op: "broadcast",
                detail: format!("root {root} out of range for 1 rank"),
            });
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn all_reduce_min_u64(&self, value: u64) -> Result<u64> {
        Ok(value)
    }
    fn all_reduce_max_u64(&self, value: u64) -> Result<u64> {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_rank_collectives_are_identities() {
        let c = SingleRank::new();
        let send = [1.0f32, 2.0, 3.0];
        let mut recv = [0.0f32; 3];
        c.reduce_scatter_sum_f32(&send, &mut recv).unwrap();
        assert_eq!(recv, send);
        let mut recv = [0.0f32; 3];
        c.all_gather_f32(&send, &mut recv).unwrap();
        assert_eq!(recv, send);
        assert_eq!(c.all_reduce_min_u64(7).unwrap(), 7);
        assert_eq!(c.all_reduce_max_u64(9).unwrap(), 9);
    }

    #[test]
    fn single_rank_rejects_mismatched_buffers() {
        let c = SingleRank::new();
        let mut recv = [0.0f32; 2];
        let err = c.all_gather_f32(&[1.0; 3], &mut recv).unwrap_err();
        assert!(err.to_string().contains("expected 3"), "{err}");
        assert!(c.broadcast_bytes(&mut [0u8; 4], 1).is_err());
    }
}
