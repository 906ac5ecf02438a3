//! A whole run: the run directory and its lock, resuming, the step loop with asynchronous
//! checkpoints committed across ranks, stopping early as a preemption would, and the files of a
//! finished run.

use crate::config::{ModelConfig, TrainConfig};
use crate::error::{Result, TrainError};
use crate::snapshot::{self, RestoreParts};
use crate::state::{StageTag, TrainingState};
use crate::stats::StatsMeter;
use crate::train::{append_jsonl, files, write_atomic, Event, FinalMetrics, StepReport, Trainer};
use lazarus_checkpoint::{
    discard_newer_than, discover_committed, open_verified, restore_agreed, BoundaryReport,
    CheckpointManager, Compression, Manifest, RunLock, COMMITTED_FILE,
};
use lazarus_comm::Communicator;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sub-directory of the run directory holding checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Rewritten by rank 0 after every step; `lazarus launch` watches its age.
pub const HEARTBEAT_FILE: &str = "heartbeat";
/// File with the run's progress for `lazarus status` and people.
pub const TRAINING_STATE_FILE: &str = "training_state.json";

/// Where a run starts from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Resume {
    /// The newest usable committed checkpoint of the run directory, or a fresh start.
    #[default]
    Auto,
    /// A fresh start; refused when the run directory holds committed checkpoints.
    Never,
    /// This checkpoint directory, or an error.
    Path(PathBuf),
}

/// How this invocation runs, as opposed to what the run is (`TrainConfig`).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub resume: Resume,
    /// End this invocation after this step as a preemption would: save, commit, exit.
    pub stop_at: Option<u64>,
    /// Set by a signal handler (SIGTERM, SIGUSR1, SIGINT): the ranks agree at the next step
    /// boundary, save, commit and stop, as for `stop_at`.
    pub stop_signal: Option<Arc<AtomicBool>>,
    pub parts: RestoreParts,
    /// The scheduler's job, recorded in `training_state.json`.
    pub job: Option<JobInfo>,
    /// Longest wait for the last save to become durable when stopping or finishing.
    pub final_save_timeout_ms: u64,
    /// Run only this stage of a staged config (`--stage NAME`).
    pub only_stage: Option<String>,
    /// Set by the staged runner for each stage: which stage, and the whole run.
    pub stage: Option<StageContext>,
    /// Where a start without a usable checkpoint of its own takes its state from (a stage after
    /// the first: the previous stage's final checkpoint); `None`: a fresh initialisation.
    pub init_from: Option<InitSource>,
}

/// Which stage of a staged run an invocation of [`run`] trains.
#[derive(Debug, Clone)]
pub struct StageContext {
    pub tag: StageTag,
    /// The directory of the whole run: its heartbeat and overall progress live there.
    pub parent: PathBuf,
    /// Steps and tokens of the stages before this one.
    pub steps_before: u64,
    pub tokens_before: u64,
    /// Steps of all stages together.
    pub steps_total: u64,
}

/// The checkpoint a stage starts from when it has none of its own.
#[derive(Debug, Clone)]
pub struct InitSource {
    /// The committed checkpoint directory, or why there is none.
    pub checkpoint: std::result::Result<PathBuf, String>,
    /// What it is, for the log: "the final checkpoint of stage `a` (step 100)".
    pub what: String,
    /// AdamW's moments too, or the weights only.
    pub with_optimizer: bool,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// Trained to `steps`; the final files are written.
    Complete(FinalMetrics),
    /// Stopped early at `step` (by a signal when `preempted`); `committed` is the newest
    /// committed checkpoint.
    Stopped {
        step: u64,
        committed: Option<u64>,
        preempted: bool,
    },
}

/// Contents of `training_state.json`, rewritten by rank 0 at every commit and at the end.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgressFile {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub position: u64,
    pub tokens: u64,
    pub restarts: u64,
    pub last_commit: Option<u64>,
    pub complete: bool,
    /// The scheduler's job, when launched by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobInfo>,
    /// The stage in progress, in a run with stages; `step` and `total_steps` then count the
    /// steps of all stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<StageProgress>,
}

/// Where a run with stages stands within its current stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StageProgress {
    /// 0-based position in the config's `[[stages]]`.
    pub index: usize,
    pub count: usize,
    pub name: String,
    /// Steps done in this stage, and its length.
    pub step: u64,
    pub steps: u64,
}

/// What the scheduler says about this job (SLURM), recorded in `training_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct JobInfo {
    pub job_id: String,
    /// How often the scheduler has requeued the job (SLURM_RESTART_COUNT).
    pub restart_count: u64,
}

/// Writes `training_state.json` into `dir` atomically.
pub fn write_progress_file(dir: &Path, p: &ProgressFile) -> Result<()> {
    let json = serde_json::to_vec_pretty(p).expect("progress serialises");
    write_atomic(&dir.join(TRAINING_STATE_FILE), &json)
}

/// Rank 0: the run directory's `training_state.json`, and in a stage also the whole run's.
fn write_progress(
    tr: &Trainer,
    opts: &RunOptions,
    last_commit: Option<u64>,
    complete: bool,
) -> Result<()> {
    let c = tr.cursor();
    let stage = opts.stage.as_ref().map(|s| StageProgress {
        index: s.tag.index,
        count: s.tag.count,
        name: s.tag.name.clone(),
        step: tr.step,
        steps: tr.cfg.steps,
    });
    let p = ProgressFile {
        step: tr.step,
        total_steps: tr.cfg.steps,
        epoch: c.epoch,
        position: c.position,
        tokens: tr.samples * tr.cfg.seq as u64,
        restarts: tr.restarts,
        last_commit,
        complete,
        job: opts.job.clone(),
        stage,
    };
    write_progress_file(&tr.cfg.run_dir, &p)?;
    if let Some(s) = &opts.stage {
        let whole = ProgressFile {
            step: s.steps_before + p.step,
            total_steps: s.steps_total,
            tokens: s.tokens_before + p.tokens,
            complete: false,
            ..p
        };
        write_progress_file(&s.parent, &whole)?;
    }
    Ok(())
}

/// Creates the run directory, checks that it is writable, and writes the resolved config and
/// model shape.
pub fn prepare_run_dir(dir: &Path, cfg: &TrainConfig, model: &ModelConfig) -> Result<()> {
    let ckpt = dir.join(CHECKPOINTS_DIR);
    std::fs::create_dir_all(&ckpt).map_err(|e| TrainError::io("creating run directory", dir, e))?;
    write_atomic(&dir.join(files::CONFIG), cfg.to_toml().as_bytes())?;
    let model_json = serde_json::to_vec_pretty(model).expect("model config serialises");
    write_atomic(&dir.join(files::MODEL), &model_json)
}

/// Keeps only the metrics records (steps and stats) up to `step`: a resumed run logs the later
/// steps again, and a fresh start all of them.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let step_of = |l: &str| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64();
    let kept: String = text
        .lines()
        .filter(|l| step_of(l).is_some_and(|s| s <= step))
        .flat_map(|l| [l, "\n"])
        .collect();
    write_atomic(path, kept.as_bytes())
}

/// Applies `opts.resume`; collective.
fn resume(
    tr: &mut Trainer,
    opts: &RunOptions,
    root: &Path,
    on_event: &mut dyn FnMut(Event),
) -> Result<()> {
    let lead = tr.comm().rank() == 0;
    let restored = match &opts.resume {
        Resume::Never => {
            if let Some((dir, m)) = discover_committed(root)?.first() {
                return Err(TrainError::Resume(format!(
                    "--resume never, but {} holds committed checkpoints (newest: step {} in {}); use a new --run-dir or remove them",
                    root.display(), m.step, dir.display()
                )));
            }
            if lead {
                discard_newer_than(root, None)?;
            }
            tr.comm().barrier()?;
            return init_or_fresh(tr, opts, "--resume never", on_event);
        }
        Resume::Auto => {
            let out = restore_agreed(root, tr.comm(), &|m: &Manifest| {
                snapshot::shards_needed(tr, m)
            })?;
            for r in &out.rejected {
                on_event(Event::Warn(format!(
                    "checkpoint {} rejected: {}; falling back to an older one",
                    r.dir.display(),
                    r.reason
                )));
            }
            match out.checkpoint {
                Some(ck) => {
                    snapshot::restore(tr, &ck, opts.parts).map(|s| (s, ck.dir().to_path_buf()))?
                }
                None => {
                    let why = format!("no usable committed checkpoint in {}", root.display());
                    return init_or_fresh(tr, opts, &why, on_event);
                }
            }
        }
        Resume::Path(p) => resume_from_path(tr, opts.parts, p, root)?,
    };
    let (state, dir) = restored;
    if lead {
        truncate_metrics(&tr.cfg.run_dir.join(files::METRICS), tr.step)?;
    }
    on_event(Event::Info(format!(
        "resumed from {} (step {} of {}, written by {} rank(s)); restart {}",
        dir.display(),
        state.step,
        state.total_steps,
        state.world_size,
        tr.restarts
    )));
    Ok(())
}

/// A start without a checkpoint of the run's own: from `opts.init_from` (a stage's previous
/// stage), or fresh. Either way the run starts at step 0, so earlier metrics records go.
fn init_or_fresh(
    tr: &mut Trainer,
    opts: &RunOptions,
    why: &str,
    on_event: &mut dyn FnMut(Event),
) -> Result<()> {
    if tr.comm().rank() == 0 {
        truncate_metrics(&tr.cfg.run_dir.join(files::METRICS), 0)?;
    }
    let Some(init) = &opts.init_from else {
        on_event(Event::Info(format!("{why}: starting fresh")));
        return Ok(());
    };
    let path = init.checkpoint.clone().map_err(TrainError::Resume)?;
    let parts = RestoreParts {
        skip_optimizer: !init.with_optimizer,
        reset_schedule: true,
    };
    let (state, _) = resume_from_path(tr, parts, &path, &tr.cfg.run_dir.join(CHECKPOINTS_DIR))?;
    // Starting the next stage is not a restart.
    tr.restarts = state.restarts;
    on_event(Event::Info(format!(
        "{why}: starting from {} ({}): the weights{}",
        init.what,
        path.display(),
        if init.with_optimizer {
            " and AdamW's moments"
        } else {
            "; AdamW's moments start at zero"
        }
    )));
    Ok(())
}

fn resume_from_path(
    tr: &mut Trainer,
    parts: RestoreParts,
    p: &Path,
    root: &Path,
) -> Result<(TrainingState, PathBuf)> {
    let verdict = Manifest::read(&p.join(COMMITTED_FILE))
        .and_then(|m| open_verified(p, &m, &snapshot::shards_needed(tr, &m)));
    let all_ok = tr.comm().all_reduce_min_u64(u64::from(verdict.is_ok()))? == 1;
    let ck = match verdict {
        Ok(ck) if all_ok => ck,
        Ok(_) => {
            return Err(TrainError::Resume(format!(
                "{}: another rank could not verify it",
                p.display()
            )))
        }
        Err(e) => return Err(TrainError::Resume(format!("{}: {e}", p.display()))),
    };
    let state = snapshot::restore(tr, &ck, parts)?;
    if tr.comm().rank() == 0 && p.parent() == Some(root) {
        // Resuming from an older checkpoint of this run abandons the newer ones.
        discard_newer_than(root, Some(state.step))?;
    }
    tr.comm().barrier()?;
    Ok((state, p.to_path_buf()))
}

fn compression(cfg: &TrainConfig) -> Compression {
    match cfg.ckpt_compress.as_str() {
        "zstd" => Compression::Zstd { level: 1 },
        _ => Compression::None,
    }
}

/// Reports what a step boundary did; errors out on a failed save when the user asked for that.
fn handle_boundary(
    tr: &Trainer,
    opts: &RunOptions,
    b: BoundaryReport,
    last_commit: &mut Option<u64>,
    on_event: &mut dyn FnMut(Event),
) -> Result<()> {
    let lead = tr.comm().rank() == 0;
    for (step, e) in b.failed_saves {
        let msg = format!(
            "checkpoint of step {step} failed on rank {}: {e}; older checkpoints are intact",
            tr.comm().rank()
        );
        if tr.cfg.ckpt_fail_fast {
            return Err(TrainError::Resume(format!(
                "{msg} (stopping: ckpt_fail_fast is set)"
            )));
        }
        on_event(Event::Warn(format!("{msg}; training goes on")));
    }
    if let Some((step, e)) = b.failed_commit {
        on_event(Event::Warn(format!(
            "checkpoint of step {step} was not committed: {e}"
        )));
    }
    if let Some(e) = b.retention_error {
        on_event(Event::Warn(format!("removing old checkpoints failed: {e}")));
    }
    if let Some(step) = b.committed {
        *last_commit = Some(step);
        if lead {
            write_progress(tr, opts, Some(step), false)?;
        }
        on_event(Event::Info(format!("checkpoint of step {step} committed")));
    }
    Ok(())
}

/// Runs training from wherever the run directory stands to `cfg.steps`, or to `opts.stop_at`.
/// A config with `[[stages]]` runs its stages in order (see [`crate::stages`]).
pub fn run(
    cfg: TrainConfig,
    opts: RunOptions,
    comm: Box<dyn Communicator>,
    on_event: &mut dyn FnMut(Event),
) -> Result<RunOutcome> {
    if !cfg.stages.is_empty() {
        return crate::stages::run_staged(cfg, opts, comm, on_event);
    }
    if let Some(name) = &opts.only_stage {
        return Err(TrainError::Config(format!(
            "--stage {name} needs a config with [[stages]]"
        )));
    }
    run_single(cfg, &opts, comm, on_event).map(|(outcome, _)| outcome)
}

/// Runs one stage (or a run without stages) and hands the communicator back for the next.
pub(crate) fn run_single(
    cfg: TrainConfig,
    opts: &RunOptions,
    comm: Box<dyn Communicator>,
    on_event: &mut dyn FnMut(Event),
) -> Result<(RunOutcome, Box<dyn Communicator>)> {
    let started = Instant::now();
    let mut tr = Trainer::new(cfg, comm)?;
    tr.stage = opts.stage.as_ref().map(|s| s.tag.clone());
    let outcome = train_loop(&mut tr, opts, started, on_event)?;
    Ok((outcome, tr.into_comm()))
}

/// Rank 0's per-step output: the metrics record, the live stats, the heartbeat.
struct StepOutput {
    metrics: PathBuf,
    heartbeat: PathBuf,
    /// Added to the step written into the heartbeat (the steps of earlier stages).
    heartbeat_offset: u64,
    meter: Option<StatsMeter>,
}

impl StepOutput {
    fn new(tr: &Trainer, opts: &RunOptions, on_event: &mut dyn FnMut(Event)) -> Self {
        // On the CPU backend a GPU that NVML sees is not the training device: no MFU from it.
        let meter = StatsMeter::new(&tr.cfg, &tr.model, tr.on_gpu());
        if let Some(g) = meter.as_ref().and_then(StatsMeter::gpu_description) {
            on_event(Event::Info(format!("live stats include {g} through NVML")));
        }
        let (hb_dir, offset) = match &opts.stage {
            Some(s) => (s.parent.clone(), s.steps_before),
            None => (tr.cfg.run_dir.clone(), 0),
        };
        StepOutput {
            metrics: tr.cfg.run_dir.join(files::METRICS),
            heartbeat: hb_dir.join(HEARTBEAT_FILE),
            heartbeat_offset: offset,
            meter,
        }
    }

    fn write(
        &mut self,
        tr: &Trainer,
        report: &StepReport,
        logged: bool,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<()> {
        if logged {
            append_jsonl(&self.metrics, report)?;
        }
        let samples = (tr.cfg.accum * tr.cfg.batch) as u64;
        if let Some(rec) = self.meter.as_mut().and_then(|m| m.step(tr.step, samples)) {
            append_jsonl(&self.metrics, &rec)?;
            on_event(Event::Stats(rec));
        }
        // The supervisor's liveness signal: a run whose heartbeat stops is hung.
        std::fs::write(
            &self.heartbeat,
            format!("{}\n", self.heartbeat_offset + tr.step),
        )
        .map_err(|e| TrainError::io("writing", &self.heartbeat, e))
    }
}

/// The run of one trainer: lock, run directory, resume, the step loop, the final files.
fn train_loop(
    tr: &mut Trainer,
    opts: &RunOptions,
    started: Instant,
    on_event: &mut dyn FnMut(Event),
) -> Result<RunOutcome> {
    let lead = tr.comm().rank() == 0;
    let run_dir = tr.cfg.run_dir.clone();
    let root = run_dir.join(CHECKPOINTS_DIR);
    let _lock = if lead {
        prepare_lock(&run_dir, &mut *on_event)?
    } else {
        None
    };
    if lead {
        prepare_run_dir(&run_dir, &tr.cfg, &tr.model)?;
    }
    tr.comm().barrier()?;
    describe(tr, on_event);
    resume(tr, opts, &root, on_event)?;
    if lead && opts.stage.is_some() {
        // The whole run's progress names the stage from its first step on.
        write_progress(tr, opts, None, false)?;
    }
    let (rank, world) = (tr.comm().rank(), tr.comm().world_size());
    let mut mgr = CheckpointManager::new(
        &root,
        rank,
        world,
        tr.layout_hash(),
        snapshot::tensor_specs(tr),
        compression(&tr.cfg),
        tr.cfg.keep_last,
    )?;
    let final_timeout = Duration::from_millis(opts.final_save_timeout_ms.max(1));
    let mut last_commit = None;
    let stop_at = opts.stop_at.filter(|&s| s < tr.cfg.steps);
    let mut last_report: Option<StepReport> = tr.history.back().cloned();
    let mut last_val = f32::NAN;
    let first_sample = tr.samples;
    let mut out = lead.then(|| StepOutput::new(tr, opts, on_event));
    // A save whose snapshot is still being copied off the GPU: handed to the writer in the next
    // step, between its forward/backward and its update.
    let mut pending: Option<PendingSave> = None;
    while tr.step < tr.cfg.steps {
        let acc = tr.accumulate()?;
        let mut stall_ms = None;
        if let Some(p) = pending.take() {
            stall_ms = Some(save_snapshot(&mut mgr, tr, p)?);
        }
        let mut report = match tr.update(acc) {
            Ok(r) => r,
            Err(e @ TrainError::Diverged { .. }) if stall_ms.is_some() => {
                // Every rank diverges at the same step (the norm and loss are all-reduced), so
                // the last good step, saved just now, can still be committed together.
                let b = mgr.finish(tr.comm(), final_timeout)?;
                handle_boundary(tr, opts, b, &mut last_commit, on_event)?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let at_end = tr.step == tr.cfg.steps;
        // Every rank takes part in this vote at every step, so all stop at the same step.
        let signalled = opts
            .stop_signal
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst));
        let preempted = tr.comm().all_reduce_max_u64(u64::from(signalled))? == 1 && !at_end;
        let stopping = preempted || stop_at == Some(tr.step);
        if at_end || (tr.cfg.val_every > 0 && tr.step.is_multiple_of(tr.cfg.val_every)) {
            last_val = tr.validate()?;
            report.val_loss = Some(last_val);
        }
        let logged = tr.step == 1
            || at_end
            || stopping
            || tr.step.is_multiple_of(tr.cfg.log_every)
            || report.val_loss.is_some();
        if logged {
            tr.remember(&report);
        }
        let save_due = at_end
            || stopping
            || (tr.cfg.save_every > 0 && tr.step.is_multiple_of(tr.cfg.save_every));
        if save_due {
            let save = PendingSave {
                step: tr.step,
                state: serde_json::to_value(snapshot::training_state(tr))
                    .expect("state serialises"),
            };
            let t0 = Instant::now();
            tr.begin_snapshot()?;
            let mut held = t0.elapsed().as_secs_f64() * 1e3;
            if tr.snapshot_is_async() && !(at_end || stopping) {
                pending = Some(save);
            } else {
                held += save_snapshot(&mut mgr, tr, save)?;
            }
            stall_ms = Some(stall_ms.unwrap_or(0.0) + held);
        }
        report.ckpt_stall_ms = stall_ms;
        let b = if at_end || stopping {
            mgr.finish(tr.comm(), final_timeout)?
        } else {
            mgr.step_boundary(tr.comm())?
        };
        handle_boundary(tr, opts, b, &mut last_commit, on_event)?;
        if let Some(out) = out.as_mut() {
            out.write(tr, &report, logged, on_event)?;
        }
        last_report = Some(report.clone());
        on_event(Event::Step {
            report,
            logged,
            total: tr.cfg.steps,
        });
        if stopping {
            on_event(Event::Info(format!(
                "{} at step {}, checkpoint committed at step {}",
                if preempted { "preempted" } else { "stopped" },
                tr.step,
                last_commit.map_or("none".into(), |s| s.to_string())
            )));
            return Ok(RunOutcome::Stopped {
                step: tr.step,
                committed: last_commit,
                preempted,
            });
        }
    }
    let trained_tokens = (tr.samples - first_sample) * tr.cfg.seq as u64;
    finish_run(
        tr,
        opts,
        last_report,
        last_val,
        last_commit,
        trained_tokens,
        started,
    )
}

/// A checkpoint whose snapshot has been started but not yet handed to the writer.
struct PendingSave {
    step: u64,
    state: serde_json::Value,
}

/// Waits for the snapshot started for `save` and hands it to the writer. Returns the
/// milliseconds the loop was held (waiting for the copy, for the writer's slot, and copying
/// into the staging buffer).
fn save_snapshot(mgr: &mut CheckpointManager, tr: &mut Trainer, save: PendingSave) -> Result<f64> {
    let t0 = Instant::now();
    let state = tr.snapshot()?;
    mgr.save(save.step, save.state, |st| snapshot::fill(st, state))?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

fn prepare_lock(run_dir: &Path, on_event: &mut dyn FnMut(Event)) -> Result<Option<RunLock>> {
    std::fs::create_dir_all(run_dir)
        .map_err(|e| TrainError::io("creating run directory", run_dir, e))?;
    let (lock, note) = RunLock::acquire(run_dir)?;
    if let Some(n) = note {
        on_event(Event::Warn(n));
    }
    Ok(Some(lock))
}

fn describe(tr: &Trainer, on_event: &mut dyn FnMut(Event)) {
    on_event(Event::Info(format!("data: {}", tr.data_description())));
    on_event(Event::Info(format!("compute: {}", tr.device_description())));
    let m = tr.model;
    on_event(Event::Info(format!(
        "model: {} layers, {} heads, {} channels, vocab {} (padded {}), {:.2}M parameters; {} rank(s), global batch {}x{}x{} tokens",
        m.layers, m.heads, m.channels, m.vocab, m.padded_vocab, tr.num_params() as f64 / 1e6,
        tr.comm().world_size(), tr.cfg.batch, tr.cfg.seq, tr.cfg.accum
    )));
}

/// Writes the files of a finished run (rank 0) and returns the final metrics.
#[allow(clippy::too_many_arguments)]
fn finish_run(
    tr: &Trainer,
    opts: &RunOptions,
    last: Option<StepReport>,
    mut last_val: f32,
    last_commit: Option<u64>,
    trained_tokens: u64,
    started: Instant,
) -> Result<RunOutcome> {
    let last = last.ok_or_else(|| TrainError::Config("the run has no steps".into()))?;
    if last_val.is_nan() {
        last_val = last.val_loss.unwrap_or(f32::NAN);
    }
    let tokens = tr.samples * tr.cfg.seq as u64;
    let elapsed_s = started.elapsed().as_secs_f64();
    let fm = FinalMetrics {
        step: tr.step,
        final_loss: last.loss,
        val_loss: last_val,
        tokens,
        params_sha256: tr.params_sha256(),
        num_params: tr.num_params(),
        elapsed_s,
        tokens_per_s: trained_tokens as f64 / elapsed_s,
    };
    if tr.comm().rank() == 0 {
        let dir = &tr.cfg.run_dir;
        let bytes: Vec<u8> = tr.params[..tr.num_params()]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        write_atomic(&dir.join(files::FINAL_PARAMS), &bytes)?;
        let json = serde_json::to_vec_pretty(&fm).expect("metrics serialise");
        write_atomic(&dir.join(files::FINAL_METRICS), &json)?;
        write_progress(tr, opts, last_commit, true)?;
        write_atomic(
            &dir.join(files::COMPLETE),
            format!("step {}\n", tr.step).as_bytes(),
        )?;
    }
    Ok(RunOutcome::Complete(fm))
}
