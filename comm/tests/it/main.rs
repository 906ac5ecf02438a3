//! Integration tests of lazarus-comm: the threads backend against sequential references, its
//! failure modes, (with feature `mpi`) the MPI backend under `mpirun`, and (with feature `cuda`)
//! the NCCL backend against stand-in libraries and, where there is one, a real GPU.

mod threads;

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "cuda")]
mod nccl;
