//! Integration tests of lazarus-comm: the threads backend against sequential references, its
//! failure modes, and (with feature `mpi`) the MPI backend under `mpirun`.

mod threads;

#[cfg(feature = "mpi")]
mod mpi;
