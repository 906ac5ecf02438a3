//! The GPT-2 trainer: model over one flat parameter buffer, data loader, AdamW, schedule, loop.

pub mod clock;
pub mod config;
pub mod corpus;
#[cfg(feature = "cuda")]
pub mod cuda_model;
#[cfg(feature = "cuda")]
pub mod cuda_shard;
pub mod data;
pub mod device;
pub mod error;
pub mod estimate;
pub mod eval;
pub mod export;
pub mod host;
pub mod layout;
pub mod model;
pub mod nvml;
pub mod optim;
pub mod rng;
pub mod run;
pub mod sample;
pub mod snapshot;
pub mod stages;
pub mod state;
pub mod stats;
pub mod train;

pub use config::{ModelConfig, TrainConfig};
pub use error::{Result, TrainError};
pub use lazarus_checkpoint as checkpoint;
