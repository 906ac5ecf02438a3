//! The `gpu` suite: Lazarus training on one NVIDIA GPU. It drives the real `lazarus` binary
//! (built with `--features cuda`):
//! - the loss curve of a short d2 run on `--device cpu` and on `--device cuda` (f32 both), the
//!   largest relative difference of the per-step losses against a stated tolerance; the CUDA
//!   run goes first and doubles as the probe, so a binary without CUDA support or a GPU that
//!   CUDA cannot use is a skip, not a failure;
//! - GPT-2 124M (d12) at T=1024 on random GPT-2 tokens: tokens/s and MFU of the steps after a
//!   warm-up, then the same with a checkpoint at every step: the stall per step and the
//!   slowdown; then the same without saves in bf16 mixed precision (`--precision bf16`);
//! - the PyTorch peer (`bench/peers/torch_gpt2_peer.py`, torch.compile and bf16 autocast) on
//!   the same shape, and the ratio of each of our precisions' throughput to its.
//!
//! Without a GPU (`nvidia-smi` absent, failing or listing none) the suite prints
//! "gpu suite skipped: REASON", records that in its JSON and exits 0.

use crate::machine::Machine;
use crate::torch_peer;
use anyhow::{bail, ensure, Context, Result};
use lazarus_trainer::config::GPT2_VOCAB;
use lazarus_trainer::layout::Layout;
use lazarus_trainer::rng::Rng;
use lazarus_trainer::stats::{self, StatsRecord, STATS_KIND};
use lazarus_trainer::train::StepReport;
use lazarus_trainer::{corpus, TrainConfig};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// The peer script, written into the scratch directory before it runs, so the binary works
/// from any directory.
const SCRIPT: &str = include_str!("../peers/torch_gpt2_peer.py");
const SCRIPT_NAME: &str = "torch_gpt2_peer.py";
/// Longest wait for `nvidia-smi`: a wedged driver can make it hang.
const NVIDIA_SMI_WAIT: Duration = Duration::from_secs(60);
/// Longest wait for one `lazarus train` run or one run of the peer (torch.compile of d12
/// takes about a minute; a d12 run saving 1.5 GB at every step is bounded by the disk).
const RUN_WAIT: Duration = Duration::from_secs(1800);
/// Output lines kept of one process; later ones are counted but dropped.
const LINES_KEPT_MAX: usize = 100_000;
/// Lines of output shown when a run fails.
const TAIL_LINES: usize = 20;
/// Random GPT-2 tokens written for the d12 runs (2000 windows of 1024).
const GPT2_TOKENS: usize = 2_048_000;
/// Bytes of the synthetic corpus of the loss-curve runs.
const CURVE_CORPUS_BYTES: usize = 1_000_000;
/// Seconds between the trainer's live stats records in the throughput runs.
const STATS_INTERVAL_S: u64 = 1;
/// Committed checkpoints kept by the run that saves at every step (bounds its disk use).
const CKPT_KEEP_LAST: u64 = 2;
/// What `lazarus train` prints when it refuses `--device cuda`: a build without the `cuda`
/// feature, or no usable driver or device (`KernelError`'s messages).
const REFUSALS: [&str; 2] = ["has no CUDA support", "CUDA is not usable here"];
/// How the loss curves are compared, as recorded in the JSON.
const TOLERANCE_NOTE: &str = "f32 on both devices; every step's CUDA loss is compared with the \
    CPU reference's as |cuda - cpu| / |cpu|, the last step included. Not bit equality: the GPU \
    kernels reduce in another order than the CPU's fixed-chunk sums and AdamW carries each \
    step's rounding into the next weights";

/// Options of the gpu suite.
#[derive(Debug, Clone, clap::Args)]
pub struct GpuArgs {
    /// Global batch of the d12 runs and of the PyTorch peer (sequences of --seq tokens).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Sequence length of the d12 runs and of the peer.
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// Measured steps of the d12 throughput run and of the peer (after --warmup).
    #[arg(long, default_value_t = 20)]
    pub steps: u64,
    /// Steps at the start of every d12 run and of the peer that are not measured (device
    /// set-up, kernel compilation, torch.compile).
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Measured steps of the d12 run that saves a checkpoint at every step (after --warmup).
    #[arg(long, default_value_t = 10)]
    pub ckpt_steps: u64,
    /// Model of the CPU-vs-CUDA loss-curve comparison.
    #[arg(long, default_value = "d2")]
    pub curve_model: String,
    #[arg(long, default_value_t = 20)]
    pub curve_steps: u64,
    #[arg(long, default_value_t = 8)]
    pub curve_batch: usize,
    #[arg(long, default_value_t = 128)]
    pub curve_seq: usize,
    /// Largest relative difference of any step's loss, CUDA against CPU, accepted by the
    /// loss-curve comparison (a larger one fails the suite after the results are written).
    #[arg(long, default_value_t = 1e-3)]
    pub loss_rtol: f64,
    /// Peak of the GPU in TFLOP/s for MFU [default: the dense bf16 peak of a known GPU].
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Python with torch for the PyTorch peer [default: $LAZARUS_BENCH_PYTHON, else python3].
    /// Without torch the peer is skipped and the results say why.
    #[arg(long)]
    pub torch_python: Option<PathBuf>,
    /// Do not run the PyTorch peer.
    #[arg(long)]
    pub no_peer: bool,
    /// The lazarus binary, built with `--features cuda` (default: the one next to this
    /// benchmark's binary).
    #[arg(long)]
    pub lazarus: Option<PathBuf>,
    /// Directory for the runs; a temporary directory is made inside and removed after.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

/// One GPU as `nvidia-smi` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub driver: String,
    pub memory_mib: Option<u64>,
}

/// The machine description of the other suites plus the GPUs (`machine.gpu` is the one the
/// runs use, GPU 0).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuMachine {
    #[serde(flatten)]
    pub machine: Machine,
    #[serde(default)]
    pub gpu: Option<String>,
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
}

/// One measured throughput: a Lazarus run or the PyTorch peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// `lazarus`, `lazarus, save every step` or `pytorch`.
    pub run: String,
    pub model: String,
    pub params: u64,
    /// `f32`, or the peer's `bf16 autocast, torch.compile`.
    pub dtype: String,
    pub batch: usize,
    pub seq: usize,
    pub warmup: u64,
    /// Measured steps.
    pub steps: u64,
    /// Median of the measured steps' time (Lazarus: the step's `ms`, which excludes the
    /// checkpoint stall).
    pub ms_per_step_median: f64,
    /// batch * seq / the median step time.
    pub tokens_per_s: f64,
    /// tokens/s * FLOPs per token over the peak; none when the peak is unknown.
    pub mfu: Option<f64>,
    /// The trainer's live stats over the measured steps (wall time, stalls included).
    pub stats_tokens_per_s: Option<f64>,
    pub stats_mfu: Option<f64>,
    /// Checkpoint stall of the measured steps (the copy into staging memory plus any wait for
    /// the previous save, as at most one is in flight).
    pub ckpt_stall_ms_median: Option<f64>,
    pub ckpt_stall_ms_max: Option<f64>,
    /// Median of step time plus stall: what the loop took per step while saving.
    pub step_with_stall_ms_median: Option<f64>,
    /// step_with_stall_ms_median over the run without saves' ms_per_step_median.
    pub slowdown_vs_no_saves: Option<f64>,
    /// This row's tokens/s over the PyTorch peer's.
    pub vs_pytorch: Option<f64>,
}

/// The CPU-vs-CUDA loss-curve comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Curve {
    pub model: String,
    pub batch: usize,
    pub seq: usize,
    pub steps: u64,
    pub cpu_losses: Vec<f64>,
    pub cuda_losses: Vec<f64>,
    pub max_rel_diff: f64,
    pub max_rel_diff_step: u64,
    pub last_rel_diff: f64,
    pub rtol: f64,
    pub within_tolerance: bool,
    pub tolerance: String,
}

/// What the peer script prints (its per-step times are kept too).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerOutput {
    pub torch_version: String,
    pub device: String,
    pub device_name: String,
    pub dtype: String,
    pub compile: bool,
    pub fused_adamw: bool,
    pub layers: usize,
    pub heads: usize,
    pub channels: usize,
    pub batch: usize,
    pub seq: usize,
    pub steps: u64,
    pub warmup: u64,
    pub params: u64,
    pub flops_per_token: f64,
    pub ms_per_step_median: f64,
    pub tokens_per_s: f64,
    pub mfu: Option<f64>,
    pub peak_tflops: Option<f64>,
    pub peak_source: String,
    pub loss_first: f64,
    pub loss_last: f64,
    pub max_memory_allocated_bytes: Option<u64>,
    pub step_ms: Vec<f64>,
    pub runtime_s: f64,
}

/// Whether the PyTorch peer ran, and what it measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// `measured`, `skipped` or `failed`, with the reason for the last two.
    pub status: String,
    pub reason: Option<String>,
    pub python: Option<String>,
    pub torch_version: Option<String>,
    pub output: Option<PeerOutput>,
}

/// The suite's result file, `gpu-<date>.json`; `report` reads it with this type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuReport {
    pub suite: String,
    pub machine: GpuMachine,
    /// `measured` or `skipped`.
    pub status: String,
    pub skip_reason: Option<String>,
    pub lazarus: Option<String>,
    pub runtime_s: f64,
    pub flops_per_token: Option<f64>,
    pub peak_tflops: Option<f64>,
    pub peak_source: Option<String>,
    pub rows: Vec<Row>,
    pub curve: Option<Curve>,
    pub peer: Option<PeerStatus>,
}

/// A line a child printed, and whether it came from stderr.
struct Line {
    err: bool,
    text: String,
}

/// What a finished child left.
struct Finished {
    status: ExitStatus,
    lines: Vec<Line>,
}

impl Finished {
    fn stdout(&self) -> impl DoubleEndedIterator<Item = &str> {
        self.lines
            .iter()
            .filter(|l| !l.err)
            .map(|l| l.text.as_str())
    }
}

/// Forwards a pipe's lines (lossily decoded, so odd bytes never stop the draining and block
/// the child) until it closes.
fn pump(pipe: Option<impl Read + Send + 'static>, err: bool, tx: Sender<Line>) {
    let Some(pipe) = pipe else { return };
    std::thread::spawn(move || {
        let mut r = BufReader::new(pipe);
        let mut buf = Vec::new();
        while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let text = String::from_utf8_lossy(&buf).trim_end().to_string();
            buf.clear();
            if tx.send(Line { err, text }).is_err() {
                break;
            }
        }
    });
}

fn kill_group(pid: u32) {
    // SAFETY: kill(2) with the negated pid of the process group made for this child
    // (`process_group(0)`); it touches no memory of this process.
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
}

/// Runs `cmd` to its end, at most `limit` in all; `on_line` sees each line as it arrives.
fn run_bounded(
    mut cmd: Command,
    what: &str,
    limit: Duration,
    on_line: &mut dyn FnMut(&Line),
) -> Result<Finished> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let (tx, rx) = channel();
    pump(child.stdout.take(), false, tx.clone());
    pump(child.stderr.take(), true, tx);
    let t0 = Instant::now();
    let mut lines = Vec::new();
    let timed_out = loop {
        match rx.recv_timeout(limit.saturating_sub(t0.elapsed())) {
            Ok(l) => {
                on_line(&l);
                if lines.len() < LINES_KEPT_MAX {
                    lines.push(l);
                }
            }
            Err(RecvTimeoutError::Disconnected) => break false,
            Err(RecvTimeoutError::Timeout) => break true,
        }
    };
    // Both pipes are closed, so the child has normally exited; one that closed them and
    // lives on still gets only the time that is left.
    if !timed_out {
        loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for {what}"))?
            {
                return Ok(Finished { status, lines });
            }
            if t0.elapsed() > limit {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    kill_group(child.id());
    let _ = child.wait();
    bail!(
        "{what} did not finish within {} s and was killed; last output:\n{}",
        limit.as_secs(),
        tail(&lines)
    )
}

fn tail(lines: &[Line]) -> String {
    let from = lines.len().saturating_sub(TAIL_LINES);
    let shown: Vec<&str> = lines[from..].iter().map(|l| l.text.as_str()).collect();
    shown.join("\n")
}

/// Parses `nvidia-smi --query-gpu=index,name,driver_version,memory.total
/// --format=csv,noheader,nounits`.
pub fn parse_gpu_list(text: &str) -> Vec<GpuInfo> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            let n = f.len();
            // The name sits between the index and the last two fields, commas and all.
            (n >= 4).then_some(())?;
            Some(GpuInfo {
                index: f[0].parse().ok()?,
                name: f[1..n - 2].join(", "),
                driver: f[n - 2].to_string(),
                memory_mib: f[n - 1].parse().ok(),
            })
        })
        .collect()
}

/// The GPUs of this machine, or why there are none usable for the suite.
fn detect_gpus() -> std::result::Result<Vec<GpuInfo>, String> {
    let mut cmd = Command::new("nvidia-smi");
    cmd.args([
        "--query-gpu=index,name,driver_version,memory.total",
        "--format=csv,noheader,nounits",
    ]);
    let f = run_bounded(cmd, "nvidia-smi", NVIDIA_SMI_WAIT, &mut |_| {}).map_err(|e| {
        let missing = e
            .root_cause()
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound);
        if missing {
            "nvidia-smi not found (no NVIDIA driver on this machine)".to_string()
        } else {
            format!("{e:#}")
        }
    })?;
    let text: Vec<&str> = f.stdout().collect();
    if !f.status.success() {
        let why = f.lines.iter().rev().find(|l| !l.text.trim().is_empty());
        return Err(format!(
            "nvidia-smi failed ({}): {}",
            f.status,
            why.map_or("no message", |l| l.text.trim())
        ));
    }
    let gpus = parse_gpu_list(&text.join("\n"));
    if gpus.is_empty() {
        return Err("nvidia-smi lists no GPU".into());
    }
    Ok(gpus)
}

/// A log line `step     5/25 | loss 5.1234 | lr 1.00e-4 | norm 1.234 | 12.3 ms | 45678 tok/s`
/// with optional `| val X` and `| ckpt stall X ms`, as `lazarus train` prints it.
pub fn parse_step_line(line: &str) -> Option<StepReport> {
    let mut parts = line.split(" | ");
    let head = parts.next()?.strip_prefix("step")?.trim();
    let step: u64 = head.split('/').next()?.trim().parse().ok()?;
    let (mut loss, mut lr, mut norm, mut ms, mut tps) = (None, None, None, None, None);
    let (mut val, mut stall) = (None, None);
    for p in parts.map(str::trim) {
        if let Some(v) = p.strip_prefix("ckpt stall ") {
            stall = v.strip_suffix(" ms")?.parse().ok();
        } else if let Some(v) = p.strip_prefix("loss ") {
            loss = v.parse().ok();
        } else if let Some(v) = p.strip_prefix("lr ") {
            lr = v.parse().ok();
        } else if let Some(v) = p.strip_prefix("norm ") {
            norm = v.parse().ok();
        } else if let Some(v) = p.strip_prefix("val ") {
            val = v.parse().ok();
        } else if let Some(v) = p.strip_suffix(" tok/s") {
            tps = v.parse().ok();
        } else if let Some(v) = p.strip_suffix(" ms") {
            ms = v.parse().ok();
        }
    }
    Some(StepReport {
        step,
        loss: loss?,
        lr: lr?,
        grad_norm: norm?,
        ms: ms?,
        tokens_per_s: tps?,
        val_loss: val,
        ckpt_stall_ms: stall,
    })
}

/// The step records and live stats records of a run's metrics.jsonl; records of other kinds
/// (none today) are passed over.
pub fn parse_metrics(text: &str) -> Result<(Vec<StepReport>, Vec<StatsRecord>)> {
    let (mut steps, mut stats) = (Vec::new(), Vec::new());
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("metrics.jsonl line {}", i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(at)?;
        match v.get("kind").and_then(|k| k.as_str()) {
            None => steps.push(serde_json::from_value(v).with_context(at)?),
            Some(STATS_KIND) => stats.push(serde_json::from_value(v).with_context(at)?),
            Some(_) => {}
        }
    }
    Ok((steps, stats))
}

/// The line of a failed run that says it refused `--device cuda`, if one does.
fn refusal(lines: &[Line]) -> Option<String> {
    lines
        .iter()
        .find(|l| REFUSALS.iter().any(|r| l.text.contains(r)))
        .map(|l| l.text.trim().trim_start_matches("error: ").to_string())
}

/// One `lazarus train` invocation of the suite.
#[derive(Debug, Clone)]
struct TrainSpec {
    model: String,
    device: &'static str,
    batch: usize,
    seq: usize,
    steps: u64,
    save_every: u64,
    peak_tflops: Option<f64>,
    /// `--precision`: `f32` or `bf16`.
    precision: &'static str,
}

/// The command line of a run: every step logged and in metrics.jsonl, no validation until
/// the end, live stats every second.
fn train_args(s: &TrainSpec, data: &Path, run_dir: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = [
        "train",
        "--model",
        &s.model,
        "--device",
        s.device,
        "--precision",
        s.precision,
    ]
    .map(OsString::from)
    .to_vec();
    for (flag, v) in [
        ("--batch", s.batch.to_string()),
        ("--seq", s.seq.to_string()),
        ("--steps", s.steps.to_string()),
        ("--save-every", s.save_every.to_string()),
        ("--keep-last", CKPT_KEEP_LAST.to_string()),
        ("--log-every", "1".into()),
        ("--val-every", "0".into()),
        ("--stats-interval-s", STATS_INTERVAL_S.to_string()),
    ] {
        a.extend([flag.into(), v.into()]);
    }
    if let Some(p) = s.peak_tflops {
        a.extend(["--peak-tflops".into(), p.to_string().into()]);
    }
    a.extend(["--data".into(), data.into(), "--run-dir".into()]);
    a.extend([run_dir.into(), "--no-progress".into()]);
    a
}

/// A finished run's records.
struct TrainRun {
    steps: Vec<StepReport>,
    stats: Vec<StatsRecord>,
}

enum Outcome {
    Ran(TrainRun),
    /// `lazarus` refused `--device cuda`; its message.
    Refused(String),
}

/// Runs `lazarus train` into `work/name`, echoing its output, and reads its metrics. A run
/// that exits 0 without reaching its last step (stopped by a signal) is an error.
fn train(bin: &Path, s: &TrainSpec, data: &Path, work: &Path, name: &str) -> Result<Outcome> {
    let run_dir = work.join(name);
    let args = train_args(s, data, &run_dir);
    let shown: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
    println!("gpu: {name}: lazarus {}", shown.join(" "));
    let mut cmd = Command::new(bin);
    cmd.args(&args);
    let what = format!("lazarus train ({name})");
    let f = run_bounded(cmd, &what, RUN_WAIT, &mut |l| println!("    {}", l.text))?;
    if !f.status.success() {
        if let Some(r) = refusal(&f.lines) {
            return Ok(Outcome::Refused(r));
        }
        bail!(
            "{what} failed ({}); last output:\n{}",
            f.status,
            tail(&f.lines)
        );
    }
    let last = f.stdout().rev().find_map(parse_step_line).map(|r| r.step);
    ensure!(
        last == Some(s.steps),
        "{what} exited 0 but its last step line is {last:?}, not step {}",
        s.steps
    );
    let path = run_dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let (steps, stats) = parse_metrics(&text).with_context(|| format!("in {}", path.display()))?;
    let numbers: Vec<u64> = steps.iter().map(|r| r.step).collect();
    ensure!(
        numbers.iter().copied().eq(1..=s.steps),
        "{} has step records {numbers:?}, not 1..={}",
        path.display(),
        s.steps
    );
    Ok(Outcome::Ran(TrainRun { steps, stats }))
}

fn median(xs: &mut [f64]) -> f64 {
    assert!(!xs.is_empty(), "median of nothing");
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The CUDA losses against the CPU's: the largest relative difference, its step, and the
/// last step's. A non-finite loss counts as an infinite difference.
pub fn compare_losses(cpu: &[StepReport], cuda: &[StepReport]) -> Result<(f64, u64, f64)> {
    ensure!(
        !cpu.is_empty() && cpu.len() == cuda.len(),
        "the CPU run has {} step records and the CUDA run {}",
        cpu.len(),
        cuda.len()
    );
    let mut worst = (0.0f64, 0u64);
    let mut last = 0.0;
    for (a, b) in cpu.iter().zip(cuda) {
        ensure!(a.step == b.step, "step {} against step {}", a.step, b.step);
        let (a_loss, b_loss) = (f64::from(a.loss), f64::from(b.loss));
        let d = (b_loss - a_loss).abs() / a_loss.abs();
        let d = if d.is_finite() { d } else { f64::INFINITY };
        if d > worst.0 || worst.1 == 0 {
            worst = (d, a.step);
        }
        last = d;
    }
    Ok((worst.0, worst.1, last))
}

/// Runs the d2 curve on CUDA (the probe: a refusal ends the suite as skipped) and on the CPU.
fn curve(args: &GpuArgs, bin: &Path, data: &Path, work: &Path) -> Result<Result<Curve, String>> {
    let spec = |device| TrainSpec {
        model: args.curve_model.clone(),
        device,
        batch: args.curve_batch,
        seq: args.curve_seq,
        steps: args.curve_steps,
        save_every: 0,
        peak_tflops: None,
        precision: "f32",
    };
    let cuda = match train(bin, &spec("cuda"), data, work, "curve-cuda")? {
        Outcome::Ran(r) => r,
        Outcome::Refused(why) => return Ok(Err(why)),
    };
    let cpu = match train(bin, &spec("cpu"), data, work, "curve-cpu")? {
        Outcome::Ran(r) => r,
        Outcome::Refused(why) => bail!("lazarus refused the CPU run: {why}"),
    };
    let (max, at, last) = compare_losses(&cpu.steps, &cuda.steps)?;
    let losses = |r: &TrainRun| r.steps.iter().map(|s| f64::from(s.loss)).collect();
    Ok(Ok(Curve {
        model: args.curve_model.clone(),
        batch: args.curve_batch,
        seq: args.curve_seq,
        steps: args.curve_steps,
        cpu_losses: losses(&cpu),
        cuda_losses: losses(&cuda),
        max_rel_diff: max,
        max_rel_diff_step: at,
        last_rel_diff: last,
        rtol: args.loss_rtol,
        within_tolerance: max <= args.loss_rtol,
        tolerance: TOLERANCE_NOTE.into(),
    }))
}

/// The model's size and cost per token, as the trainer counts them.
#[derive(Debug, Clone, Copy)]
struct Cost {
    params: u64,
    flops_per_token: f64,
    peak_tflops: Option<f64>,
}

impl Cost {
    fn mfu(&self, tokens_per_s: f64) -> Option<f64> {
        self.peak_tflops
            .map(|p| tokens_per_s * self.flops_per_token / (p * 1e12))
    }
}

/// A row from a run's records: the steps after `warmup` and the stats records that cover only
/// such steps.
fn lazarus_row(name: &str, s: &TrainSpec, r: &TrainRun, warmup: u64, cost: Cost) -> Result<Row> {
    let measured: Vec<&StepReport> = r.steps.iter().filter(|x| x.step > warmup).collect();
    ensure!(
        !measured.is_empty(),
        "{name}: no step after the {warmup} warm-up steps"
    );
    let ms = median(&mut measured.iter().map(|x| x.ms).collect::<Vec<_>>());
    let tokens_per_s = (s.batch * s.seq) as f64 / (ms / 1e3);
    let stats: Vec<&StatsRecord> = r
        .stats
        .iter()
        // The record of the last step also covers the end-of-run validation and save.
        .filter(|x| {
            x.steps > 0 && (x.step + 1).saturating_sub(x.steps) > warmup && x.step < s.steps
        })
        .collect();
    let secs: f64 = stats.iter().map(|x| x.interval_s).sum();
    let weighted = |f: &dyn Fn(&StatsRecord) -> Option<f64>| -> Option<f64> {
        let parts: Option<Vec<f64>> = stats.iter().map(|x| Some(f(x)? * x.interval_s)).collect();
        parts
            .filter(|p| !p.is_empty() && secs > 0.0)
            .map(|p| p.iter().sum::<f64>() / secs)
    };
    let stalls: Vec<f64> = measured.iter().filter_map(|x| x.ckpt_stall_ms).collect();
    let saving = s.save_every > 0 && !stalls.is_empty();
    let with_stall: Vec<f64> = measured
        .iter()
        .map(|x| x.ms + x.ckpt_stall_ms.unwrap_or(0.0))
        .collect();
    Ok(Row {
        run: name.into(),
        model: s.model.clone(),
        params: cost.params,
        dtype: s.precision.into(),
        batch: s.batch,
        seq: s.seq,
        warmup,
        steps: measured.len() as u64,
        ms_per_step_median: ms,
        tokens_per_s,
        mfu: cost.mfu(tokens_per_s),
        stats_tokens_per_s: weighted(&|x| Some(x.tokens_per_s)),
        stats_mfu: weighted(&|x| x.mfu),
        ckpt_stall_ms_median: saving.then(|| median(&mut stalls.clone())),
        ckpt_stall_ms_max: saving.then(|| stalls.iter().copied().fold(0.0, f64::max)),
        step_with_stall_ms_median: saving.then(|| median(&mut with_stall.clone())),
        slowdown_vs_no_saves: None,
        vs_pytorch: None,
    })
}

/// Model size, FLOPs per token (the trainer's count) and the peak used for MFU.
fn d12_cost(args: &GpuArgs, gpu: &GpuInfo) -> Result<(Cost, String)> {
    let cfg = TrainConfig {
        model: "d12".into(),
        seq: args.seq,
        ..Default::default()
    };
    let m = cfg.model_config(GPT2_VOCAB)?;
    let (peak, source) = match args.peak_tflops {
        Some(p) => (Some(p), format!("--peak-tflops {p}")),
        None => match stats::peak_tflops_of(&gpu.name) {
            Some(p) => (
                Some(p),
                format!(
                    "dense bf16 peak of {} (the trainer's table): {p} TFLOP/s",
                    gpu.name
                ),
            ),
            None => (
                None,
                format!("no known peak for {}; pass --peak-tflops", gpu.name),
            ),
        },
    };
    let cost = Cost {
        params: Layout::gpt2(&m).total as u64,
        flops_per_token: stats::flops_per_token(&m, args.seq),
        peak_tflops: peak,
    };
    Ok((cost, source))
}

/// The shape and options of one run of the peer.
#[derive(Debug, Clone)]
pub struct PeerShape {
    pub device: &'static str,
    pub dtype: &'static str,
    pub compile: bool,
    pub batch: usize,
    pub seq: usize,
    pub steps: u64,
    pub warmup: u64,
    pub layers: usize,
    pub heads: usize,
    pub channels: usize,
    pub peak_tflops: Option<f64>,
}

/// Parses the peer's stdout: its last non-empty line is the JSON object.
pub fn parse_peer_output<'a>(
    mut stdout: impl DoubleEndedIterator<Item = &'a str>,
) -> Result<PeerOutput> {
    let line = stdout
        .rfind(|l| !l.trim().is_empty())
        .context("the PyTorch peer printed nothing on stdout")?;
    serde_json::from_str(line).with_context(|| {
        format!("the PyTorch peer's last line is not the expected JSON object: {line:.200}")
    })
}

/// Writes the peer script into `dir` and runs it with `python`; its stderr is echoed.
pub fn run_peer(python: &Path, p: &PeerShape, dir: &Path) -> Result<PeerOutput> {
    let script = dir.join(SCRIPT_NAME);
    std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .args(["--device", p.device, "--dtype", p.dtype]);
    for (flag, v) in [
        ("--batch", p.batch.to_string()),
        ("--seq", p.seq.to_string()),
        ("--steps", p.steps.to_string()),
        ("--warmup", p.warmup.to_string()),
        ("--layers", p.layers.to_string()),
        ("--heads", p.heads.to_string()),
        ("--channels", p.channels.to_string()),
    ] {
        cmd.args([flag, &v]);
    }
    if p.compile {
        cmd.arg("--compile");
    }
    if let Some(t) = p.peak_tflops {
        cmd.args(["--peak-tflops", &t.to_string()]);
    }
    let what = format!("the PyTorch GPT-2 peer ({})", python.display());
    let f = run_bounded(cmd, &what, RUN_WAIT, &mut |l| {
        if l.err {
            eprintln!("    {}", l.text);
        }
    })?;
    ensure!(
        f.status.success(),
        "{what} failed ({}); last output:\n{}",
        f.status,
        tail(&f.lines)
    );
    let out = parse_peer_output(f.stdout())?;
    ensure!(
        (out.batch, out.seq, out.layers, out.channels) == (p.batch, p.seq, p.layers, p.channels),
        "{what} measured batch {} x {} of {} layers x {} channels, not what was asked",
        out.batch,
        out.seq,
        out.layers,
        out.channels
    );
    Ok(out)
}

/// Runs the peer on the d12 shape with torch.compile and bf16 autocast, or says why not.
fn peer(args: &GpuArgs, cost: Cost, work: &Path) -> PeerStatus {
    let mut st = PeerStatus {
        status: "skipped".into(),
        reason: None,
        python: None,
        torch_version: None,
        output: None,
    };
    if args.no_peer {
        st.reason = Some("--no-peer".into());
        return st;
    }
    let python = torch_peer::resolve_python(args.torch_python.as_deref());
    st.python = Some(python.display().to_string());
    let found = match torch_peer::probe(&python) {
        Ok(found) => found,
        Err(why) => {
            println!("skipped the PyTorch peer: {why}");
            st.reason = Some(why);
            return st;
        }
    };
    st.torch_version = Some(found.torch_version.clone());
    println!(
        "gpu: PyTorch peer: torch {} from {}",
        found.torch_version,
        python.display()
    );
    let shape = PeerShape {
        device: "cuda",
        dtype: "bf16",
        compile: true,
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        warmup: args.warmup,
        layers: 12,
        heads: 12,
        channels: 768,
        peak_tflops: cost.peak_tflops,
    };
    match run_peer(&python, &shape, work) {
        Ok(out) => {
            st.status = "measured".into();
            st.output = Some(out);
        }
        Err(e) => {
            st.status = "failed".into();
            st.reason = Some(format!("{e:#}"));
        }
    }
    st
}

fn peer_row(out: &PeerOutput, cost: Cost) -> Row {
    let peer_cost = Cost {
        flops_per_token: out.flops_per_token,
        ..cost
    };
    Row {
        run: "pytorch".into(),
        model: "d12".into(),
        params: out.params,
        dtype: format!(
            "{}{}",
            if out.dtype == "bf16" {
                "bf16 autocast"
            } else {
                "f32"
            },
            if out.compile { ", torch.compile" } else { "" }
        ),
        batch: out.batch,
        seq: out.seq,
        warmup: out.warmup,
        steps: out.steps,
        ms_per_step_median: out.ms_per_step_median,
        tokens_per_s: out.tokens_per_s,
        mfu: peer_cost.mfu(out.tokens_per_s),
        stats_tokens_per_s: None,
        stats_mfu: None,
        ckpt_stall_ms_median: None,
        ckpt_stall_ms_max: None,
        step_with_stall_ms_median: None,
        slowdown_vs_no_saves: None,
        vs_pytorch: None,
    }
}

/// Random GPT-2 tokens for the d12 runs (the peer draws its own the same way).
fn write_gpt2_tokens(dir: &Path) -> Result<()> {
    let mut rng = Rng::new(1);
    let tokens: Vec<u16> = (0..GPT2_TOKENS)
        .map(|_| rng.below(GPT2_VOCAB as u64) as u16)
        .collect();
    corpus::write_split(dir, "random_gpt2", &tokens, GPT2_VOCAB, 0.05)?;
    Ok(())
}

/// The two d12 runs: without saves, then saving at every step.
fn d12_rows(args: &GpuArgs, bin: &Path, data: &Path, work: &Path, cost: Cost) -> Result<Vec<Row>> {
    let spec = |steps, save_every, precision| TrainSpec {
        model: "d12".into(),
        device: "cuda",
        batch: args.batch,
        seq: args.seq,
        steps: args.warmup + steps,
        save_every,
        peak_tflops: cost.peak_tflops,
        precision,
    };
    let mut rows = Vec::new();
    for (name, dir_name, s) in [
        ("lazarus", "d12", spec(args.steps, 0, "f32")),
        (
            "lazarus, save every step",
            "d12-save-every-1",
            spec(args.ckpt_steps, 1, "f32"),
        ),
        ("lazarus", "d12-bf16", spec(args.steps, 0, "bf16")),
    ] {
        let run = match train(bin, &s, data, work, dir_name)? {
            Outcome::Ran(r) => r,
            Outcome::Refused(why) => {
                bail!("lazarus refused the d12 run after the probe ran: {why}")
            }
        };
        rows.push(lazarus_row(name, &s, &run, args.warmup, cost)?);
    }
    let base = rows[0].ms_per_step_median;
    rows[1].slowdown_vs_no_saves = rows[1].step_with_stall_ms_median.map(|m| m / base);
    Ok(rows)
}

fn check_args(args: &GpuArgs) -> Result<()> {
    ensure!(
        args.batch > 0 && args.seq > 0,
        "--batch and --seq must be positive"
    );
    ensure!(
        args.steps > 0 && args.ckpt_steps > 0,
        "--steps and --ckpt-steps must be positive"
    );
    ensure!(
        args.curve_steps > 0 && args.curve_batch > 0 && args.curve_seq > 0,
        "--curve-steps, --curve-batch and --curve-seq must be positive"
    );
    ensure!(args.loss_rtol > 0.0, "--loss-rtol must be positive");
    ensure!(
        args.peak_tflops.is_none_or(|p| p > 0.0),
        "--peak-tflops must be positive"
    );
    Ok(())
}

fn lazarus_binary(args: &GpuArgs) -> Result<PathBuf> {
    let p = match &args.lazarus {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("finding this binary")?
            .with_file_name("lazarus"),
    };
    ensure!(
        p.is_file(),
        "the lazarus binary {} does not exist: build it with \
         `cargo build --release -p lazarus --features cuda` or pass --lazarus PATH",
        p.display()
    );
    Ok(p)
}

/// An empty result: what the skip path writes, and what a measurement fills in.
fn empty_report(gpus: Vec<GpuInfo>) -> GpuReport {
    GpuReport {
        suite: "gpu".into(),
        machine: GpuMachine {
            machine: Machine::current(),
            gpu: gpus.first().map(|g| g.name.clone()),
            gpus,
        },
        status: "skipped".into(),
        skip_reason: None,
        lazarus: None,
        runtime_s: 0.0,
        flops_per_token: None,
        peak_tflops: None,
        peak_source: None,
        rows: Vec::new(),
        curve: None,
        peer: None,
    }
}

fn write_report(report: &GpuReport, out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join(format!(
        "gpu-{}.json",
        &report.machine.machine.date_utc[..10]
    ));
    std::fs::write(&path, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn skip(mut report: GpuReport, reason: String, out: &Path) -> Result<()> {
    println!("gpu suite skipped: {reason}");
    report.skip_reason = Some(reason);
    let path = write_report(&report, out)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

/// The Markdown table, one line per run.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| run | dtype | params | batch x seq | ms/step (median) | tokens/s | MFU | ckpt stall ms (median / max) | step + stall ms | vs no saves | vs PyTorch |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let stall = match (r.ckpt_stall_ms_median, r.ckpt_stall_ms_max) {
            (Some(a), Some(b)) => format!("{a:.1} / {b:.1}"),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {:.2}M | {}x{} | {:.1} | {:.0} | {} | {stall} | {} | {} | {} |\n",
            r.run,
            r.dtype,
            r.params as f64 / 1e6,
            r.batch,
            r.seq,
            r.ms_per_step_median,
            r.tokens_per_s,
            fmt_opt(r.mfu, |m| format!("{:.1}%", m * 100.0)),
            fmt_opt(r.step_with_stall_ms_median, |m| format!("{m:.1}")),
            fmt_opt(r.slowdown_vs_no_saves, |x| format!("{x:.2}x")),
            fmt_opt(r.vs_pytorch, |x| format!("{x:.2}")),
        ));
    }
    s
}

/// One line on the loss-curve comparison.
pub fn curve_line(c: &Curve) -> String {
    format!(
        "{} loss curve, CPU vs CUDA (f32), {} steps of {}x{}: largest relative difference \
         {:.2e} at step {} (last step {:.2e}); tolerance {:.0e}: {}",
        c.model,
        c.steps,
        c.batch,
        c.seq,
        c.max_rel_diff,
        c.max_rel_diff_step,
        c.last_rel_diff,
        c.rtol,
        if c.within_tolerance {
            "within"
        } else {
            "EXCEEDED"
        }
    )
}

/// One line on the peer when it did not measure (a failure's output lines joined by `; `, so
/// the line also reads as one Markdown paragraph).
pub fn peer_line(p: &PeerStatus) -> Option<String> {
    (p.status != "measured").then(|| {
        let reason = p.reason.as_deref().unwrap_or("no reason recorded");
        let lines: Vec<&str> = reason
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let mut joined = String::new();
        for l in lines {
            if !joined.is_empty() {
                joined.push_str(if joined.ends_with(':') { " " } else { "; " });
            }
            joined.push_str(l);
        }
        format!("PyTorch peer {}: {joined}", p.status)
    })
}

fn print_summary(r: &GpuReport, path: &Path) {
    for row in &r.rows {
        println!(
            "{}: live stats over the measured steps: {} tokens/s, MFU {}",
            row.run,
            fmt_opt(row.stats_tokens_per_s, |t| format!("{t:.0}")),
            fmt_opt(row.stats_mfu, |m| format!("{:.1}%", m * 100.0))
        );
    }
    if let Some(src) = &r.peak_source {
        println!("MFU peak: {src}");
    }
    if let Some(line) = r.peer.as_ref().and_then(peer_line) {
        println!("{line}");
    }
    if let Some(c) = &r.curve {
        println!("{}", curve_line(c));
    }
    print!("{}", table(&r.rows));
    println!("wrote {}", path.display());
}

/// Runs the suite, prints the table, writes `gpu-<date>.json`.
pub fn run(args: &GpuArgs, out: &Path) -> Result<()> {
    check_args(args)?;
    run_with(args, out, detect_gpus())
}

/// The suite given what GPU detection found (a test passes the skip in).
fn run_with(
    args: &GpuArgs,
    out: &Path,
    gpus: std::result::Result<Vec<GpuInfo>, String>,
) -> Result<()> {
    let t0 = Instant::now();
    let gpus = match gpus {
        Ok(g) => g,
        Err(reason) => return skip(empty_report(Vec::new()), reason, out),
    };
    let mut report = empty_report(gpus.clone());
    println!(
        "gpu: {} ({} MiB, driver {})",
        gpus[0].name,
        fmt_opt(gpus[0].memory_mib.map(|m| m as f64), |m| format!("{m:.0}")),
        gpus[0].driver
    );
    let bin = lazarus_binary(args)?;
    report.lazarus = Some(bin.display().to_string());
    let work = tempfile::Builder::new()
        .prefix("bench-tmp-gpu-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("making a directory in {}", args.dir.display()))?;
    let (bytes, gpt2) = (
        work.path().join("data-bytes"),
        work.path().join("data-gpt2"),
    );
    corpus::synth(&bytes, 1, CURVE_CORPUS_BYTES)?;
    let curve = match curve(args, &bin, &bytes, work.path())? {
        Ok(c) => c,
        Err(reason) => return skip(report, format!("lazarus: {reason}"), out),
    };
    write_gpt2_tokens(&gpt2)?;
    let (cost, peak_source) = d12_cost(args, &gpus[0])?;
    let mut rows = d12_rows(args, &bin, &gpt2, work.path(), cost)?;
    let peer = peer(args, cost, work.path());
    if let Some(out) = &peer.output {
        // Each precision of ours against the peer (which runs bf16 autocast).
        for r in rows.iter_mut().filter(|r| r.run == "lazarus") {
            r.vs_pytorch = Some(r.tokens_per_s / out.tokens_per_s);
        }
        rows.push(peer_row(out, cost));
    }
    work.close()
        .context("removing the suite's temporary directory")?;
    report.status = "measured".into();
    report.runtime_s = t0.elapsed().as_secs_f64();
    report.flops_per_token = Some(cost.flops_per_token);
    report.peak_tflops = cost.peak_tflops;
    report.peak_source = Some(peak_source);
    report.rows = rows;
    report.curve = Some(curve.clone());
    report.peer = Some(peer);
    let path = write_report(&report, out)?;
    print_summary(&report, &path);
    ensure!(
        curve.within_tolerance,
        "the {} losses on CUDA differ from the CPU's by {:.3e} (step {}), more than --loss-rtol {:e}",
        curve.model,
        curve.max_rel_diff,
        curve.max_rel_diff_step,
        curve.rtol
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Python with torch for the peer test.
    const TEST_PYTHON_ENV: &str = "LAZARUS_TORCH_PYTHON";

    fn step(step: u64, loss: f32, ms: f64, stall: Option<f64>) -> StepReport {
        StepReport {
            step,
            loss,
            lr: 1e-3,
            grad_norm: 1.0,
            ms,
            tokens_per_s: 8192.0 / (ms / 1e3),
            val_loss: None,
            ckpt_stall_ms: stall,
        }
    }

    fn args(words: &[&str]) -> GpuArgs {
        #[derive(clap::Parser)]
        struct W {
            #[command(flatten)]
            a: GpuArgs,
        }
        let all = std::iter::once("x").chain(words.iter().copied());
        <W as clap::Parser>::try_parse_from(all).unwrap().a
    }

    #[test]
    fn log_lines_are_parsed() {
        let r = parse_step_line(
            "step    10/100 | loss 5.1234 | lr 6.00e-4 | norm 1.250 | 12.3 ms | 45678 tok/s",
        )
        .unwrap();
        assert_eq!(
            (r.step, r.loss, r.lr, r.grad_norm),
            (10, 5.1234, 6e-4, 1.25)
        );
        assert_eq!((r.ms, r.tokens_per_s), (12.3, 45678.0));
        assert_eq!((r.val_loss, r.ckpt_stall_ms), (None, None));
        let r = parse_step_line(
            "step     6/6 | loss 4.7301 | lr 6.00e-4 | norm 2.721 | 41.5 ms | 6164 tok/s | val 4.6204 | ckpt stall 0.7 ms",
        )
        .unwrap();
        assert_eq!((r.val_loss, r.ckpt_stall_ms), (Some(4.6204), Some(0.7)));
        assert_eq!(r.ms, 41.5);
        for not_a_step in [
            "stopped after step 5",
            "step 3/9 | loss 4.2",
            "step x/9 | loss 4.2 | lr 1e-3 | norm 1 | 1.0 ms | 5 tok/s",
            "checkpoint of step 2 committed",
        ] {
            assert!(parse_step_line(not_a_step).is_none(), "{not_a_step}");
        }
    }

    #[test]
    fn metrics_records_are_parsed() {
        let text = r#"{"step":1,"loss":5.5273876,"lr":0.0001,"grad_norm":5.3,"ms":65.2,"tokens_per_s":3923.7,"ckpt_stall_ms":0.54}
{"kind":"stats","step":1,"time_unix_ms":5,"interval_s":1.5,"steps":1,"tokens_per_s":3000.0,"samples_per_s":4.0,"step_ms":1500.0,"model_tflops":0.2,"mfu":0.25,"gpu_name":"NVIDIA H100 80GB HBM3"}

{"step":2,"loss":5.4,"lr":0.0002,"grad_norm":5.2,"ms":54.7,"tokens_per_s":4673.8,"val_loss":4.6}
{"kind":"something-later","x":1}
"#;
        let (steps, stats) = parse_metrics(text).unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].loss, 5.5273876);
        assert_eq!(steps[0].ckpt_stall_ms, Some(0.54));
        assert_eq!(
            (steps[1].ckpt_stall_ms, steps[1].val_loss),
            (None, Some(4.6))
        );
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].mfu, Some(0.25));
        assert_eq!(stats[0].gpu_name.as_deref(), Some("NVIDIA H100 80GB HBM3"));
        let e = parse_metrics("{\"step\":1}\nnot json\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
        let e = parse_metrics("{\"step\":1,\"loss\":1,\"lr\":1,\"grad_norm\":1,\"ms\":1,\"tokens_per_s\":1}\nnot json\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
    }

    #[test]
    fn nvidia_smi_lists_are_parsed() {
        let text = "0, NVIDIA H100 80GB HBM3, 550.54.15, 81559\n1, NVIDIA H200, 560.1, [N/A]\nNo devices were found\n";
        let g = parse_gpu_list(text);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!((g[0].index, g[0].memory_mib), (0, Some(81559)));
        assert_eq!((g[1].driver.as_str(), g[1].memory_mib), ("560.1", None));
        assert!(parse_gpu_list("").is_empty());
    }

    #[test]
    fn a_refusal_is_recognised() {
        let line = |text: &str| Line {
            err: true,
            text: text.into(),
        };
        let lines = [
            line("data: x"),
            line("error: this build of Lazarus has no CUDA support: rebuild with `cargo build --release --features cuda`, or use --device cpu"),
        ];
        assert!(refusal(&lines)
            .unwrap()
            .starts_with("this build of Lazarus has no CUDA support"));
        let lines = [line(
            "error: CUDA is not usable here: no libcuda.so.1; use --device cpu",
        )];
        assert!(refusal(&lines)
            .unwrap()
            .starts_with("CUDA is not usable here"));
        assert!(refusal(&[line("error: out of memory")]).is_none());
    }

    #[test]
    fn without_a_gpu_the_suite_is_skipped_and_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        // No lazarus binary is needed for the skip: it must work on any CPU machine.
        let a = args(&["--lazarus", "/nonexistent/lazarus"]);
        run_with(&a, tmp.path(), Err("nvidia-smi not found (test)".into())).unwrap();
        let files: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("gpu-") && name.ends_with(".json"),
            "{name}"
        );
        let r: GpuReport = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
        assert_eq!((r.suite.as_str(), r.status.as_str()), ("gpu", "skipped"));
        assert_eq!(
            r.skip_reason.as_deref(),
            Some("nvidia-smi not found (test)")
        );
        assert!(r.rows.is_empty() && r.curve.is_none() && r.machine.gpu.is_none());
        assert!(!r.machine.machine.git_commit.is_empty());
    }

    #[test]
    fn a_gpu_without_the_binary_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let a = args(&["--lazarus", "/nonexistent/lazarus"]);
        let gpu = parse_gpu_list("0, NVIDIA H100 80GB HBM3, 550.54.15, 81559");
        let e = run_with(&a, tmp.path(), Ok(gpu)).unwrap_err();
        assert!(format!("{e:#}").contains("--features cuda"), "{e:#}");
    }

    #[test]
    fn loss_curves_are_compared_step_by_step() {
        let cpu = [
            step(1, 5.0, 1.0, None),
            step(2, 4.0, 1.0, None),
            step(3, 3.0, 1.0, None),
        ];
        let cuda = [
            step(1, 5.0, 1.0, None),
            step(2, 4.004, 1.0, None),
            step(3, 3.0015, 1.0, None),
        ];
        let (max, at, last) = compare_losses(&cpu, &cuda).unwrap();
        assert!((max - 1e-3).abs() < 1e-6 && at == 2, "{max} {at}");
        assert!((last - 5e-4).abs() < 1e-6, "{last}");
        let nan = [
            step(1, 5.0, 1.0, None),
            step(2, f32::NAN, 1.0, None),
            step(3, 3.0, 1.0, None),
        ];
        assert_eq!(compare_losses(&cpu, &nan).unwrap().0, f64::INFINITY);
        assert!(compare_losses(&cpu, &cuda[..2]).is_err());
        assert!(compare_losses(&[], &[]).is_err());
    }

    fn spec(save_every: u64) -> TrainSpec {
        TrainSpec {
            model: "d12".into(),
            device: "cuda",
            batch: 8,
            seq: 1024,
            steps: 7,
            save_every,
            peak_tflops: Some(989.4),
            precision: "f32",
        }
    }

    #[test]
    fn rows_leave_out_the_warm_up() {
        let cost = Cost {
            params: 124_475_904,
            flops_per_token: 1e9,
            peak_tflops: Some(100.0),
        };
        // A slow first step (compilation) and a final step with the end-of-run save's stall.
        let steps: Vec<StepReport> = (1..=7)
            .map(|i| {
                let ms = if i == 1 { 5000.0 } else { 100.0 + i as f64 };
                step(i, 5.0, ms, (i == 7).then_some(300.0))
            })
            .collect();
        let stat = |step: u64, n: u64, tps: f64| StatsRecord {
            kind: STATS_KIND.into(),
            step,
            time_unix_ms: 0,
            interval_s: 1.0,
            steps: n,
            tokens_per_s: tps,
            samples_per_s: 1.0,
            step_ms: 1.0,
            host_rss_bytes: None,
            host_rss_peak_bytes: None,
            host_mem_available_bytes: None,
            model_tflops: tps * 1e9 / 1e12,
            mfu: Some(tps * 1e9 / 1e14),
            gpu_index: None,
            gpu_name: None,
            gpu_mem_used_bytes: None,
            gpu_mem_total_bytes: None,
            gpu_util_pct: None,
        };
        let run = TrainRun {
            steps: steps.clone(),
            stats: vec![
                stat(3, 3, 1000.0),
                stat(5, 2, 70_000.0),
                stat(6, 1, 50_000.0),
                stat(7, 1, 10.0),
            ],
        };
        let r = lazarus_row("lazarus", &spec(0), &run, 2, cost).unwrap();
        // Steps 3..=7: 103, 104, 105, 106, 107 ms.
        assert_eq!((r.steps, r.ms_per_step_median), (5, 105.0));
        assert!((r.tokens_per_s - 8192.0 / 0.105).abs() < 1e-6);
        assert!((r.mfu.unwrap() - r.tokens_per_s * 1e9 / 1e14).abs() < 1e-12);
        // The first stats record covers warm-up steps and the last the end-of-run validation
        // and save: both are left out.
        assert_eq!(r.stats_tokens_per_s, Some(60_000.0));
        assert!((r.stats_mfu.unwrap() - 0.6).abs() < 1e-12);
        assert!(
            r.ckpt_stall_ms_median.is_none(),
            "a run without saves has no stall column"
        );

        let saving: Vec<StepReport> = (1..=7)
            .map(|i| step(i, 5.0, 100.0, Some(10.0 * i as f64)))
            .collect();
        let run = TrainRun {
            steps: saving,
            stats: Vec::new(),
        };
        let s = lazarus_row("lazarus, save every step", &spec(1), &run, 2, cost).unwrap();
        assert_eq!(s.ckpt_stall_ms_median, Some(50.0));
        assert_eq!(s.ckpt_stall_ms_max, Some(70.0));
        assert_eq!(s.step_with_stall_ms_median, Some(150.0));
        assert_eq!((s.stats_tokens_per_s, s.stats_mfu), (None, None));
        let e = lazarus_row("x", &spec(0), &run, 7, cost).unwrap_err();
        assert!(e.to_string().contains("no step after"), "{e}");
    }

    #[test]
    fn the_train_command_line_says_what_the_suite_measures() {
        let a = train_args(&spec(1), Path::new("/d"), Path::new("/r"));
        let a: Vec<String> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        let joined = a.join(" ");
        for want in [
            "train --model d12 --device cuda --precision f32",
            "--batch 8 --seq 1024 --steps 7 --save-every 1",
            "--log-every 1 --val-every 0 --stats-interval-s 1",
            "--peak-tflops 989.4",
            "--data /d --run-dir /r --no-progress",
        ] {
            assert!(joined.contains(want), "{joined} lacks {want}");
        }
    }

    #[test]
    fn the_table_has_a_line_per_run_and_matching_columns() {
        let row = |run: &str| Row {
            run: run.into(),
            model: "d12".into(),
            params: 124_475_904,
            dtype: "f32".into(),
            batch: 8,
            seq: 1024,
            warmup: 5,
            steps: 20,
            ms_per_step_median: 250.0,
            tokens_per_s: 32768.0,
            mfu: Some(0.2857),
            stats_tokens_per_s: None,
            stats_mfu: None,
            ckpt_stall_ms_median: Some(12.5),
            ckpt_stall_ms_max: Some(40.0),
            step_with_stall_ms_median: Some(262.5),
            slowdown_vs_no_saves: Some(1.05),
            vs_pytorch: None,
        };
        let t = table(&[row("lazarus"), row("pytorch")]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        let cols = |l: &str| l.matches('|').count();
        assert!(lines.iter().all(|l| cols(l) == cols(lines[0])), "{t}");
        assert!(
            lines[2].contains(
                "| 124.48M | 8x1024 | 250.0 | 32768 | 28.6% | 12.5 / 40.0 | 262.5 | 1.05x | - |"
            ),
            "{t}"
        );
    }

    #[test]
    fn a_peer_failure_reads_as_one_line() {
        let mut p = PeerStatus {
            status: "failed".into(),
            reason: Some("the peer failed (exit status: 2); last output:\nno CUDA\n\nbye\n".into()),
            python: None,
            torch_version: None,
            output: None,
        };
        assert_eq!(
            peer_line(&p).unwrap(),
            "PyTorch peer failed: the peer failed (exit status: 2); last output: no CUDA; bye"
        );
        p.status = "measured".into();
        assert!(peer_line(&p).is_none());
    }

    #[test]
    fn the_embedded_script_is_the_gpt2_peer() {
        assert!(SCRIPT.starts_with("#!/usr/bin/env python3\n\"\"\""));
        assert!(SCRIPT.contains("scaled_dot_product_attention") && SCRIPT.contains("def main"));
    }

    /// Runs the peer tiny on the CPU with the Python named by `LAZARUS_TORCH_PYTHON`; without
    /// it (CI has no torch) the test says so and passes.
    #[test]
    fn the_peer_runs_tiny_on_the_cpu() {
        let Some(python) = std::env::var_os(TEST_PYTHON_ENV).map(PathBuf::from) else {
            println!("skipped: set {TEST_PYTHON_ENV} to a Python with torch to run the peer");
            return;
        };
        if let Err(why) = torch_peer::probe(&python) {
            println!("skipped: {why}");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let shape = PeerShape {
            device: "cpu",
            dtype: "f32",
            compile: false,
            batch: 2,
            seq: 16,
            steps: 2,
            warmup: 1,
            layers: 2,
            heads: 2,
            channels: 32,
            peak_tflops: None,
        };
        let out = run_peer(&python, &shape, tmp.path()).unwrap();
        // The peer counts parameters as the trainer's layout does (the same FLOPs per token).
        let cfg = TrainConfig {
            model: "d2".into(),
            layers: Some(2),
            heads: Some(2),
            channels: Some(32),
            seq: 16,
            ..Default::default()
        };
        let m = cfg.model_config(GPT2_VOCAB).unwrap();
        assert_eq!(out.params, Layout::gpt2(&m).total as u64);
        assert_eq!(out.flops_per_token, stats::flops_per_token(&m, 16));
        assert_eq!(
            (out.device.as_str(), out.steps, out.step_ms.len()),
            ("cpu", 2, 2)
        );
        assert!(out.tokens_per_s > 0.0 && out.ms_per_step_median > 0.0);
        assert!(out.mfu.is_none(), "no MFU without a GPU peak");
        assert!(out.loss_first.is_finite() && (out.loss_first - (50304f64).ln()).abs() < 1.0);
    }
}
