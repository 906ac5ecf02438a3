//! The collectives by name: which one a rank is in, so that ranks can check they agree.

/// Which collective a call is; all ranks must be in the same one. The discriminants travel in
/// the MPI backend's agreement header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    AllReduceF32 = 1,
    AllReduceF64,
    ReduceScatterF32,
    AllGatherF32,
    Broadcast,
    Barrier,
    MinU64,
    MaxU64,
}

impl Kind {
    /// The `Communicator` method's name, for errors.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::AllReduceF32 => "all_reduce_sum_f32",
            Kind::AllReduceF64 => "all_reduce_sum_f64",
            Kind::ReduceScatterF32 => "reduce_scatter_sum_f32",
            Kind::AllGatherF32 => "all_gather_f32",
            Kind::Broadcast => "broadcast_bytes",
            Kind::Barrier => "barrier",
            Kind::MinU64 => "all_reduce_min_u64",
            Kind::MaxU64 => "all_reduce_max_u64",
        }
    }

    /// Whether peers read this rank's buffers (and so must finish before it returns).
    pub(crate) fn exposes_buffers(self) -> bool {
        !matches!(self, Kind::Barrier | Kind::MinU64 | Kind::MaxU64)
    }
}
