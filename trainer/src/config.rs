//! Model and training configuration: presets, TOML files, defaults and validation.

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The shape of a GPT-2 model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// L: number of transformer blocks.
    pub layers: usize,
    /// NH: attention heads.
    pub heads: usize,
    /// C: channels (embedding width).
    pub channels: usize,
    /// V: the real vocabulary size (targets are below it).
    pub vocab: usize,
    /// Vp: vocabulary padded to a multiple of 128 (rows of `wte`, columns of the logits).
    pub padded_vocab: usize,
    /// maxT: rows of the position embedding; the longest sequence the model takes.
    pub block_size: usize,
}

/// GPT-2's BPE vocabulary size.
pub const GPT2_VOCAB: usize = 50257;

/// Rounds a vocabulary size up to the padded width used for `wte` and the logits.
pub fn pad_vocab(vocab: usize) -> usize {
    vocab.div_ceil(128) * 128
}

/// The preset names, for error messages and `--help`.
pub const PRESETS: &[&str] = &["d2", "d6", "d12", "d24", "d48"];

/// (layers, heads, channels) of a named preset: d12 is GPT-2 124M, d24 350M, d48 1.5B.
pub fn preset(name: &str) -> Result<(usize, usize, usize)> {
    match name {
        "d2" => Ok((2, 4, 128)),
        "d6" => Ok((6, 6, 384)),
        "d12" => Ok((12, 12, 768)),
        "d24" => Ok((24, 16, 1024)),
        "d48" => Ok((48, 25, 1600)),
        other => Err(TrainError::Config(format!(
            "unknown model preset `{other}`: choose one of {}",
            PRESETS.join(", ")
        ))),
    }
}

impl ModelConfig {
    /// Checks the shape for consistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.layers == 0 || self.heads == 0 || self.channels == 0 {
            return bad("layers, heads and channels must all be positive".into());
        }
        if !self.channels.is_multiple_of(self.heads) {
            return bad(format!(
                "channels ({}) must be a multiple of heads ({})",
                self.channels, self.heads
            ));
        }
        if self.vocab == 0 || self.vocab > u16::MAX as usize + 1 {
            return bad(format!(
                "vocab {} out of range: token files hold u16 tokens, so 1..=65536",
                self.vocab
            ));
        }
        if self.padded_vocab < self.vocab || self.block_size == 0 {
            return bad("padded vocab below vocab, or zero block size".into());
        }
        Ok(())
    }

    /// Number of parameters (with the padded vocabulary).
    pub fn num_params(&self) -> usize {
        crate::layout::Layout::gpt2(self).total
    }
}

/// Everything a training run is configured by. Field defaults are the embedded default run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Preset name (d2, d6, d12, d24, d48).
    pub model: String,
    /// Overrides of the preset's shape.
    pub layers: Option<usize>,
    pub heads: Option<usize>,
    pub channels: Option<usize>,
    /// Vocabulary size; by default taken from the data file header.
    pub vocab: Option<usize>,
    /// T: sequence length of a training sample.
    pub seq: usize,
    /// Global micro-batch: sequences per micro-step summed over all ranks.
    pub batch: usize,
    /// Micro-steps accumulated per optimizer step.
    pub accum: usize,
    /// Optimizer steps in the run; the schedule spans them.
    pub steps: u64,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// Peak learning rate.
    pub lr: f32,
    /// The cosine schedule decays to `lr * min_lr_frac`.
    pub min_lr_frac: f32,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global gradient norm clip (0 disables).
    pub grad_clip: f32,
    /// Token file or directory of token files.
    pub data: PathBuf,
    /// Validation every N steps (0: only at the end).
    pub val_every: u64,
    /// Micro-batches in one validation pass.
    pub val_batches: usize,
    /// Log (and record in metrics.jsonl) every N steps.
    pub log_every: u64,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Save a checkpoint every N steps (0: only at the end and when stopped).
    pub save_every: u64,
    /// Committed checkpoints kept; the newest is never removed.
    pub keep_last: usize,
    /// Checkpoint compression: "none" or "zstd".
    pub ckpt_compress: String,
    /// Stop training when a checkpoint cannot be saved (default: log it and go on).
    pub ckpt_fail_fast: bool,
    /// maxT: rows of the position embedding. By default the sequence length, or with stages
    /// the longest stage's, so that every stage trains the same parameter layout.
    pub block_size: Option<usize>,
    /// Seconds between live stats records (a log line and a metrics.jsonl record); 0: none.
    pub stats_interval_s: u64,
    /// Peak of the training device in TFLOP/s, for MFU; by default known GPUs' bf16 dense peak.
    pub peak_tflops: Option<f64>,
    /// Where the model's compute runs: `cpu` (the reference) or `cuda` (builds with the `cuda`
    /// feature; each rank uses the GPU of its local rank). Checkpoints do not depend on it.
    pub device: ComputeDevice,
    /// What the GPU stores parameters, gradients and activations in: `f32`, or `bf16` (mixed
    /// precision: f32 master weights and AdamW state, f32 math and accumulation in every
    /// kernel). The CPU reference is f32 only. Checkpoints hold f32 either way.
    pub precision: Precision,
    /// Curriculum stages, run in order; empty for a run of one stage.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageConfig>,
}

/// The device a run computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDevice {
    /// The rayon reference backend.
    #[default]
    Cpu,
    /// One NVIDIA GPU per rank through the CUDA backend.
    Cuda,
}

/// The element type of a GPU run's parameters, gradients and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// Bytes of one stored value.
    pub fn bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }
}

/// What a stage after the first takes from the previous stage's final checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitFrom {
    /// The weights; AdamW's moments start at zero.
    Weights,
    /// The weights and AdamW's moments (and its step count, for bias correction).
    #[default]
    WeightsAndOptimizer,
}

/// One curriculum stage: its own length, shape, schedule and data. Keys left out take the
/// top-level value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// The stage's name: letters, digits, `-` and `_`; also its directory under `stages/`.
    pub name: String,
    /// Optimizer steps of the stage; its schedule spans them.
    pub steps: u64,
    pub seq: Option<usize>,
    pub batch: Option<usize>,
    pub accum: Option<usize>,
    pub lr: Option<f32>,
    pub min_lr_frac: Option<f32>,
    pub warmup_steps: Option<u64>,
    pub weight_decay: Option<f32>,
    pub data: Option<PathBuf>,
    /// What the stage takes from the previous stage's final checkpoint (not for the first).
    pub init_from: Option<InitFrom>,
}

/// Longest stage name (it names a directory).
pub const STAGE_NAME_LEN_MAX: usize = 64;

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "d6".into(),
            layers: None,
            heads: None,
            channels: None,
            vocab: None,
            seq: 64,
            batch: 8,
            accum: 1,
            steps: 100,
            seed: 1337,
            lr: 1e-3,
            min_lr_frac: 0.1,
            warmup_steps: 10,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            data: PathBuf::from("data/synth"),
            val_every: 50,
            val_batches: 4,
            log_every: 10,
            run_dir: PathBuf::from("runs/default"),
            save_every: 50,
            keep_last: 3,
            ckpt_compress: "none".into(),
            ckpt_fail_fast: false,
            block_size: None,
            stats_interval_s: 30,
            peak_tflops: None,
            device: ComputeDevice::Cpu,
            precision: Precision::F32,
            stages: Vec::new(),
        }
    }
}

impl TrainConfig {
    /// Reads a TOML config file; unknown keys are errors so typos do not pass silently.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| TrainError::io("reading config", path, e))?;
        toml::from_str(&text).map_err(|e| {
            // One line: the file, the line and column, and what is wrong there.
            let at = e.span().map_or(String::new(), |r| {
                let before = &text[..r.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{col}")
            });
            TrainError::Config(format!("{}{at}: {}", path.display(), e.message().trim()))
        })
    }

    /// The resolved config as TOML, for `config.toml` in the run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a TrainConfig always serialises")
    }

    /// The model shape: preset, then explicit overrides, with the data's vocabulary.
    pub fn model_config(&self, data_vocab: usize) -> Result<ModelConfig> {
        let (l, h, c) = preset(&self.model)?;
        let vocab = self.vocab.unwrap_or(data_vocab);
        let m = ModelConfig {
            layers: self.layers.unwrap_or(l),
            heads: self.heads.unwrap_or(h),
            channels: self.channels.unwrap_or(c),
            vocab,
            padded_vocab: pad_vocab(vocab),
            block_size: self.block_size.unwrap_or(self.seq),
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks the training hyper-parameters.
    pub fn validate(&self, world_size: usize) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        preset(&self.model)?;
        if self.steps == 0 {
            return bad("steps must be positive".into());
        }
        if self.seq == 0 || self.batch == 0 || self.accum == 0 {
            return bad("seq, batch and accum must be positive".into());
        }
        if self.precision == Precision::Bf16 && self.device != ComputeDevice::Cuda {
            return bad(
                "precision bf16 needs device cuda: the CPU reference computes in f32 (use --device cuda, or --precision f32)"
                    .into(),
            );
        }
        if !self.batch.is_multiple_of(world_size) {
            return bad(format!(
                "batch ({}) is the global micro-batch and must be a multiple of the number of ranks ({world_size})",
                self.batch
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr must be a positive number, got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_frac) {
            return bad("min_lr_frac must lie in [0, 1]".into());
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("beta1 and beta2 must lie in [0, 1)".into());
        }
        if !matches!(self.ckpt_compress.as_str(), "none" | "zstd") {
            return bad(format!(
                "ckpt_compress must be `none` or `zstd`, got `{}`",
                self.ckpt_compress
            ));
        }
        if self.log_every == 0 {
            return bad("log_every must be positive".into());
        }
        if let Some(bs) = self.block_size.filter(|&bs| bs < self.seq) {
            return bad(format!(
                "seq ({}) is longer than block_size ({bs}), the model's longest sequence",
                self.seq
            ));
        }
        if self
            .peak_tflops
            .is_some_and(|p| !(p.is_finite() && p > 0.0))
        {
            return bad("peak_tflops must be a positive number".into());
        }
        if !self.stages.is_empty() {
            self.validate_stages(world_size)?;
        }
        Ok(())
    }

    /// Index of the stage called `name`, or an error listing the stages.
    pub fn stage_index(&self, name: &str) -> Result<usize> {
        if self.stages.is_empty() {
            return Err(TrainError::Config(format!(
                "stage `{name}` asked for, but the config has no [[stages]]"
            )));
        }
        self.stages
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
                TrainError::Config(format!(
                    "unknown stage `{name}`: the config has stages {}",
                    names.join(", ")
                ))
            })
    }

    /// The block size every stage's model is built with: `block_size`, else the longest
    /// stage's sequence.
    pub fn stages_block_size(&self) -> usize {
        self.block_size.unwrap_or_else(|| {
            self.stages
                .iter()
                .map(|s| s.seq.unwrap_or(self.seq))
                .max()
                .unwrap_or(self.seq)
        })
    }

    /// The configuration of stage `i` as a run of its own: the top-level keys with the stage's
    /// on top, the shared block size, and the run directory `run_dir/stages/<name>`.
    pub fn stage_config(&self, i: usize) -> TrainConfig {
        let s = &self.stages[i];
        let mut c = self.clone();
        c.stages = Vec::new();
        c.steps = s.steps;
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = s.$f.clone() { c.$f = v; } )* };
        }
        take!(
            seq,
            batch,
            accum,
            lr,
            min_lr_frac,
            warmup_steps,
            weight_decay,
            data
        );
        c.block_size = Some(self.stages_block_size());
        c.run_dir = self.run_dir.join(STAGES_DIR).join(&s.name);
        c
    }

    /// Total optimizer steps over all stages.
    pub fn stages_total_steps(&self) -> u64 {
        self.stages.iter().map(|s| s.steps).sum()
    }

    fn validate_stages(&self, world_size: usize) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        for (i, s) in self.stages.iter().enumerate() {
            let n = &s.name;
            let ok_chars = n
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_');
            if n.is_empty() || n.len() > STAGE_NAME_LEN_MAX || !ok_chars {
                return bad(format!(
                    "stage {} has the name `{n}`: use 1 to {STAGE_NAME_LEN_MAX} letters, digits, `-` or `_`",
                    i + 1
                ));
            }
            if self.stages[..i].iter().any(|o| &o.name == n) {
                return bad(format!("two stages are named `{n}`"));
            }
            if i == 0 && s.init_from.is_some() {
                return bad(format!(
                    "stage `{n}` is the first stage, so it has no previous stage to init_from"
                ));
            }
            if s.steps == 0 {
                return bad(format!("stage `{n}`: steps must be positive"));
            }
            self.stage_config(i)
                .validate(world_size)
                .map_err(|e| match e {
                    TrainError::Config(m) => TrainError::Config(format!("stage `{n}`: {m}")),
                    other => other,
                })?;
        }
        Ok(())
    }
}

/// Sub-directory of a staged run's directory that holds one run directory per stage.
pub const STAGES_DIR: &str = "stages";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_resolve_and_unknown_is_rejected() {
        let cfg = TrainConfig {
            model: "d12".into(),
            seq: 1024,
            ..Default::default()
        };
        let m = cfg.model_config(GPT2_VOCAB).unwrap();
        assert_eq!(
            (m.layers, m.heads, m.channels, m.padded_vocab),
            (12, 12, 768, 50304)
        );
        // GPT-2 124M has 124,439,808 parameters with the unpadded vocabulary.
        let unpadded = m.num_params() - (m.padded_vocab - m.vocab) * m.channels;
        assert_eq!(unpadded, 124_439_808);
        let err = TrainConfig {
            model: "d7".into(),
            ..Default::default()
        }
        .model_config(256)
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown model preset `d7`"),
            "{err}"
        );
    }

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let cfg = TrainConfig::default();
        let back: TrainConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
        assert!(toml::from_str::<TrainConfig>("stepz = 3").is_err());
    }

    #[test]
    fn stages_resolve_over_the_top_level_and_share_a_block_size() {
        let text = r#"
            model = "d2"
            seq = 32
            batch = 8
            lr = 1e-3
            run_dir = "r"
            [[stages]]
            name = "a"
            steps = 10
            [[stages]]
            name = "b"
            steps = 5
            seq = 128
            batch = 2
            lr = 3e-4
            init_from = "weights"
        "#;
        let cfg: TrainConfig = toml::from_str(text).unwrap();
        cfg.validate(1).unwrap();
        assert_eq!(cfg.stages_block_size(), 128);
        assert_eq!(cfg.stages_total_steps(), 15);
        let (a, b) = (cfg.stage_config(0), cfg.stage_config(1));
        assert_eq!((a.steps, a.seq, a.batch, a.lr), (10, 32, 8, 1e-3));
        assert_eq!((b.steps, b.seq, b.batch, b.lr), (5, 128, 2, 3e-4));
        assert!(a.stages.is_empty() && b.stages.is_empty());
        assert_eq!(a.run_dir, PathBuf::from("r/stages/a"));
        // Both stages build the same layout.
        assert_eq!(a.model_config(256).unwrap(), b.model_config(256).unwrap());
        assert_eq!(a.model_config(256).unwrap().block_size, 128);
        assert_eq!(cfg.stages[1].init_from, Some(InitFrom::Weights));
        assert_eq!(cfg.stage_index("b").unwrap(), 1);
        let e = cfg.stage_index("c").unwrap_err().to_string();
        assert!(
            e.contains("unknown stage `c`: the config has stages a, b"),
            "{e}"
        );
        // The resolved config, with its stages, round-trips through TOML.
        let back: TrainConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
        // A run without stages keeps its block size at its sequence length.
        let plain = TrainConfig::default();
        assert_eq!(plain.model_config(256).unwrap().block_size, plain.seq);
        let bad = |f: &dyn Fn(&mut TrainConfig)| {
            let mut c = cfg.clone();
            f(&mut c);
            c.validate(1).unwrap_err().to_string()
        };
        assert!(bad(&|c| c.stages[1].name = "a".into()).contains("two stages are named `a`"));
        assert!(bad(&|c| c.stages[0].steps = 0).contains("stage `a`: steps must be positive"));
        assert!(bad(&|c| c.stages[1].accum = Some(0)).contains("stage `b`: seq, batch and accum"));
        assert!(bad(&|c| c.block_size = Some(64)).contains("stage `b`: seq (128)"));
        let e = bad(&|c| c.stages[0].init_from = Some(InitFrom::Weights));
        assert!(e.contains("first stage"), "{e}");
        let mut odd = cfg.clone();
        odd.stages[1].batch = Some(3);
        let e = odd.validate(2).unwrap_err().to_string();
        assert!(e.contains("stage `b`: batch (3)"), "{e}");
    }

    #[test]
    fn a_toml_error_is_one_line_with_its_place() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, "steps = 3\n[[stages]]\nname = \"a\"\nstepz = 2\n").unwrap();
        let e = TrainConfig::from_toml_file(&p).unwrap_err().to_string();
        assert!(!e.contains('\n') && e.contains("c.toml:"), "{e}");
        assert!(e.contains("unknown field `stepz`"), "{e}");
    }

    #[test]
    fn validation_catches_bad_values() {
        let ok = TrainConfig::default();
        assert!(ok.validate(1).is_ok());
        assert!(TrainConfig {
            steps: 0,
            ..ok.clone()
        }
        .validate(1)
        .is_err());
        assert!(TrainConfig {
            batch: 6,
            ..ok.clone()
        }
        .validate(4)
        .is_err());
        assert!(TrainConfig {
            lr: f32::NAN,
            ..ok.clone()
        }
        .validate(1)
        .is_err());
        let m = ModelConfig {
            layers: 2,
            heads: 3,
            channels: 128,
            vocab: 256,
            padded_vocab: 256,
            block_size: 8,
        };
        assert!(m.validate().is_err());
    }
}
