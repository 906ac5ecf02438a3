//! What a checkpoint holds for the trainer: the names of the flat arrays saved as ZeRO-1
//! slices, and the JSON training state stored in `COMMITTED`.

use crate::config::{ModelConfig, TrainConfig};
use crate::train::StepReport;
use serde::{Deserialize, Serialize};

/// Flat array of the f32 master parameters (unpadded length: the layout's total).
pub const PARAMS: &str = "params";
/// Flat array of AdamW's first moment.
pub const ADAM_M: &str = "adam_m";
/// Flat array of AdamW's second moment.
pub const ADAM_V: &str = "adam_v";

/// Metrics kept in the checkpoint so a resumed run's history is complete.
pub const METRICS_HISTORY_MAX: usize = 64;

/// The training state at a checkpointed step, written by rank 0 into `COMMITTED`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainingState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Steps of the whole run (the schedule spans them).
    pub total_steps: u64,
    /// AdamW updates since the moments were last reset.
    pub optimizer_steps: u64,
    /// Global samples consumed (the data cursor).
    pub samples: u64,
    /// Tokens consumed so far.
    pub tokens: u64,
    /// Data cursor of the next sample.
    pub epoch: u64,
    pub position: u64,
    /// Learning rate of the last step.
    pub lr: f32,
    /// The model shape; a resume with another shape is refused.
    pub model: ModelConfig,
    /// Layout hash of the flat arrays.
    pub layout_hash: String,
    /// World size that wrote the checkpoint.
    pub world_size: usize,
    /// The resolved configuration of the run that wrote it.
    pub config: TrainConfig,
    /// The most recent logged steps (at most `METRICS_HISTORY_MAX`).
    pub metrics: Vec<StepReport>,
    /// Number of times the run has been restarted from a checkpoint.
    pub restarts: u64,
    /// The curriculum stage that wrote it; absent in a run without stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<StageTag>,
}

/// Which curriculum stage a checkpoint or progress record belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StageTag {
    /// 0-based position in the config's `[[stages]]`.
    pub index: usize,
    /// Number of stages.
    pub count: usize,
    pub name: String,
}
