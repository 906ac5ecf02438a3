//! A whole run: the run directory and its lock, resuming, the step loop with asynchronous
//! checkpoints committed across ranks, stopping early as a preemption would, and the files of a
//! finished run.

use crate::config::{ModelConfig, TrainConfig};
use crate::error::{Result, TrainError};
use crate::snapshot::{self, RestoreParts};
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
}

/// What the scheduler says about this job (SLURM), recorded in `training_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct JobInfo {
    pub job_id: String,
    /// How often the scheduler has requeued the job (SLURM_RESTART_COUNT).
    pub restart_count: u64,
}

fn write_progress(
    tr: &Trainer,
    job: &Option<JobInfo>,
    last_commit: Option<u64>,
    complete: bool,
) -> Result<()> {
    let c = tr.cursor();
    let p = ProgressFile {
        step: tr.step,
        total_steps: tr.cfg.steps,
        epoch: c.epoch,
        position: c.position,
        tokens: tr.samples * tr.cfg.seq as u64,
        restarts: tr.restarts,
        last_commit,
        complete,
        job: job.clone(),
    };
    let json = serde_json::to_vec_pretty(&p).expect("progress serialises");
    write_atomic(&tr.cfg.run_dir.join(TRAINING_STATE_FILE), &json)
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

/// Keeps only the metrics records up to `step` (a resumed run logs the later steps again).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<StepReport>(l).is_ok_and(|r| r.step <= step))
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
            on_event(Event::Info("starting fresh (--resume never)".into()));
            return Ok(());
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
                    on_event(Event::Info(format!(
                        "no usable committed checkpoint in {}: starting fresh",
                        root.display()
                    )));
                    return Ok(());
                }
            }
        }
        Resume::Path(p) => resume_from_path(tr, opts, p, root)?,
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

fn resume_from_path(
    tr: &mut Trainer,
    opts: &RunOptions,
    p: &Path,
    root: &Path,
) -> Result<(crate::state::TrainingState, PathBuf)> {
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
    let state = snapshot::restore(tr, &ck, opts.parts)?;
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
    job: &Option<JobInfo>,
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
            write_progress(tr, job, Some(step), false)?;
        }
        on_event(Event::Info(format!("checkpoint of step {step} committed")));
    }
    Ok(())
}

/// Runs training from wherever the run directory stands to `cfg.steps`, or to `opts.stop_at`.
pub fn run(
    cfg: TrainConfig,
    opts: RunOptions,
    comm: Box<dyn Communicator>,
    on_event: &mut dyn FnMut(Event),
) -> Result<RunOutcome> {
    let started = Instant::now();
    let mut tr = Trainer::new(cfg, comm)?;
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
    describe(&tr, on_event);
    resume(&mut tr, &opts, &root, on_event)?;
    let (rank, world) = (tr.comm().rank(), tr.comm().world_size());
    let mut mgr = CheckpointManager::new(
        &root,
        rank,
        world,
        tr.layout_hash(),
        snapshot::tensor_specs(&tr),
        compression(&tr.cfg),
        tr.cfg.keep_last,
    )?;
    let final_timeout = Duration::from_millis(opts.final_save_timeout_ms.max(1));
    let mut last_commit = None;
    let stop_at = opts.stop_at.filter(|&s| s < tr.cfg.steps);
    let mut last_report: Option<StepReport> = tr.history.back().cloned();
    let mut last_val = f32::NAN;
    let first_sample = tr.samples;
    while tr.step < tr.cfg.steps {
        let mut report = tr.train_step()?;
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
            let state =
                serde_json::to_value(snapshot::training_state(&tr)).expect("state serialises");
            let stats = mgr.save(tr.step, state, |st| snapshot::fill(&tr, st))?;
            report.ckpt_stall_ms = Some(stats.stall.as_secs_f64() * 1e3);
        }
        let b = if at_end || stopping {
            mgr.finish(tr.comm(), final_timeout)?
        } else {
            mgr.step_boundary(tr.comm())?
        };
        handle_boundary(&tr, &opts.job, b, &mut last_commit, on_event)?;
        if lead && logged {
            append_jsonl(&run_dir.join(files::METRICS), &report)?;
        }
        if lead {
            // The supervisor's liveness signal: a run whose heartbeat stops is hung.
            let hb = run_dir.join(HEARTBEAT_FILE);
            std::fs::write(&hb, format!("{}\n", tr.step))
                .map_err(|e| TrainError::io("writing", hb, e))?;
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
        &tr,
        &opts.job,
        last_report,
        last_val,
        last_commit,
        trained_tokens,
        started,
    )
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
    job: &Option<JobInfo>,
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
        write_progress(tr, job, last_commit, true)?;
        write_atomic(
            &dir.join(files::COMPLETE),
            format!("step {}\n", tr.step).as_bytes(),
        )?;
    }
    Ok(RunOutcome::Complete(fm))
}
