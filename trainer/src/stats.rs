//! Live stats of a run: every `stats_interval_s` seconds rank 0 records the throughput since the
//! last record (tokens/s, samples/s, wall time per step), host memory, the model FLOP/s achieved
//! and MFU, and, where NVML can be opened, the GPU's memory and utilisation.

use crate::config::{ModelConfig, TrainConfig};
use crate::layout::Layout;
use crate::nvml::Nvml;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The `kind` of a stats record in metrics.jsonl (step records have no `kind`).
pub const STATS_KIND: &str = "stats";

/// One stats record: a log line and a line of metrics.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsRecord {
    /// Always [`STATS_KIND`].
    pub kind: String,
    /// The last step completed.
    pub step: u64,
    pub time_unix_ms: u64,
    /// Wall time the record covers.
    pub interval_s: f64,
    /// Steps completed in it.
    pub steps: u64,
    pub tokens_per_s: f64,
    pub samples_per_s: f64,
    /// Wall time per step (training, validation and checkpoint stalls included).
    pub step_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_rss_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_rss_peak_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mem_available_bytes: Option<u64>,
    /// Model FLOP/s achieved, in TFLOP/s (see [`flops_per_token`]).
    pub model_tflops: f64,
    /// Model FLOP/s over the device's peak; only when the peak is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_index: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mem_used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mem_total_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_util_pct: Option<u32>,
}

/// Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's
/// 12 * L * C * T (PaLM's appendix B; nanoGPT and llm.c count the same way).
pub fn flops_per_token(model: &ModelConfig, seq: usize) -> f64 {
    let n = Layout::gpt2(model).total as f64;
    6.0 * n + 12.0 * (model.layers * model.channels * seq) as f64
}

/// Dense bf16 tensor-core peak of known GPUs, in TFLOP/s, from the vendor's data sheets.
pub fn peak_tflops_of(gpu_name: &str) -> Option<f64> {
    let n = gpu_name.to_ascii_uppercase();
    let table: [(&str, f64); 8] = [
        ("H100 PCIE", 756.0),
        ("H100", 989.4),
        ("H200", 989.4),
        ("A100", 312.0),
        ("L40S", 362.1),
        ("L4", 121.0),
        ("A10", 125.0),
        ("V100", 125.0),
    ];
    table
        .iter()
        .find(|(k, _)| n.contains(k))
        .map(|&(_, tflops)| tflops)
}

/// Counts steps and tokens between records and makes a record when the interval has passed.
pub struct StatsMeter {
    interval: Duration,
    last: Instant,
    steps: u64,
    samples: u64,
    seq: u64,
    flops_per_token: f64,
    peak_tflops: Option<f64>,
    nvml: Option<Nvml>,
}

impl StatsMeter {
    /// A meter for `cfg` (none when `stats_interval_s` is 0). `trains_on_gpu` says whether the
    /// NVML device is the one training, so that its peak is the MFU's denominator.
    pub fn new(cfg: &TrainConfig, model: &ModelConfig, trains_on_gpu: bool) -> Option<Self> {
        if cfg.stats_interval_s == 0 {
            return None;
        }
        let nvml = Nvml::open(crate::nvml::local_gpu_index());
        let gpu_peak = nvml
            .as_ref()
            .filter(|_| trains_on_gpu)
            .and_then(|n| peak_tflops_of(&n.name));
        Some(StatsMeter {
            interval: Duration::from_secs(cfg.stats_interval_s),
            last: Instant::now(),
            steps: 0,
            samples: 0,
            seq: cfg.seq as u64,
            flops_per_token: flops_per_token(model, cfg.seq),
            peak_tflops: cfg.peak_tflops.or(gpu_peak),
            nvml,
        })
    }

    /// The GPU whose fields the records carry, for the log.
    pub fn gpu_description(&self) -> Option<String> {
        self.nvml
            .as_ref()
            .map(|n| format!("GPU {} ({})", n.index, n.name))
    }

    /// Counts a finished step that consumed `samples` global samples; returns a record when
    /// `stats_interval_s` has passed since the last one.
    pub fn step(&mut self, step: u64, samples: u64) -> Option<StatsRecord> {
        self.steps += 1;
        self.samples += samples;
        let secs = self.last.elapsed();
        if secs < self.interval {
            return None;
        }
        let secs = secs.as_secs_f64();
        let tokens_per_s = (self.samples * self.seq) as f64 / secs;
        let model_tflops = tokens_per_s * self.flops_per_token / 1e12;
        let rss = crate::host::process_rss();
        let gpu = self.nvml.as_ref().and_then(|n| Some((n, n.sample()?)));
        let rec = StatsRecord {
            kind: STATS_KIND.into(),
            step,
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            interval_s: secs,
            steps: self.steps,
            tokens_per_s,
            samples_per_s: self.samples as f64 / secs,
            step_ms: secs * 1e3 / self.steps as f64,
            host_rss_bytes: rss.map(|r| r.0),
            host_rss_peak_bytes: rss.map(|r| r.1),
            host_mem_available_bytes: crate::host::mem_available_bytes(),
            model_tflops,
            mfu: self.peak_tflops.map(|p| model_tflops / p),
            gpu_index: gpu.map(|(n, _)| n.index),
            gpu_name: gpu.map(|(n, _)| n.name.clone()),
            gpu_mem_used_bytes: gpu.map(|(_, s)| s.mem_used_bytes),
            gpu_mem_total_bytes: gpu.map(|(_, s)| s.mem_total_bytes),
            gpu_util_pct: gpu.map(|(_, s)| s.util_pct),
        };
        self.last = Instant::now();
        self.steps = 0;
        self.samples = 0;
        Some(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_per_token_of_gpt2_124m() {
        let cfg = TrainConfig {
            model: "d12".into(),
            seq: 1024,
            ..Default::default()
        };
        let m = cfg.model_config(crate::config::GPT2_VOCAB).unwrap();
        // 6 N + 12 L C T with N = 124.48M (padded vocabulary): about 0.8 GFLOP per token.
        let f = flops_per_token(&m, 1024);
        let want = 6.0 * m.num_params() as f64 + 12.0 * 12.0 * 768.0 * 1024.0;
        assert_eq!(f, want);
        assert!((f / 1e9 - 0.86).abs() < 0.01, "{f}");
    }

    #[test]
    fn known_gpus_have_a_peak() {
        assert_eq!(peak_tflops_of("NVIDIA H100 80GB HBM3"), Some(989.4));
        assert_eq!(peak_tflops_of("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(peak_tflops_of("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(peak_tflops_of("Some Card"), None);
    }

    #[test]
    fn a_record_comes_after_the_interval_with_consistent_rates() {
        let cfg = TrainConfig {
            model: "d2".into(),
            stats_interval_s: 1,
            peak_tflops: Some(1.0),
            seq: 16,
            ..Default::default()
        };
        let m = cfg.model_config(256).unwrap();
        let mut meter = StatsMeter::new(&cfg, &m, false).unwrap();
        assert!(meter.step(1, 8).is_none(), "not before the interval");
        std::thread::sleep(Duration::from_millis(1010));
        let r = meter.step(2, 8).expect("a record after the interval");
        assert_eq!((r.kind.as_str(), r.step, r.steps), ("stats", 2, 2));
        assert!(r.interval_s >= 1.0);
        assert!((r.tokens_per_s - r.samples_per_s * 16.0).abs() < 1e-6 * r.tokens_per_s);
        assert!((r.step_ms - r.interval_s * 500.0).abs() < 1e-9);
        assert_eq!(r.mfu, Some(r.model_tflops));
        assert!(r.host_rss_bytes.is_some_and(|b| b > 0));
        let line = serde_json::to_string(&r).unwrap();
        let back: StatsRecord = serde_json::from_str(&line).unwrap();
        assert_eq!((back.step, back.host_rss_bytes), (r.step, r.host_rss_bytes));
        // The counters restart after a record.
        assert!(meter.step(3, 8).is_none());
    }
}
