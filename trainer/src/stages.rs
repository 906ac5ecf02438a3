//! Curriculum stages: the `[[stages]]` of a config run in order in one run directory.
//!
//! Stage `name` is a run directory of its own, `RUN_DIR/stages/<name>/` (config, metrics,
//! checkpoints, final files), trained by the same loop as a run without stages. A stage after
//! the first starts from the previous stage's final checkpoint: the weights, or the weights and
//! AdamW's moments (`init_from`). The whole run's directory holds the lock, the heartbeat,
//! `training_state.json` naming the stage in progress and, once the last stage is done, the
//! final files.
//!
//! Resuming needs nothing but the files: a stage with `training_complete.marker` is done; the
//! first one without it resumes from its own newest committed checkpoint or, having none,
//! starts again from its previous stage's final checkpoint. Each of these is deterministic, so
//! a staged run interrupted anywhere ends bit-identical to an uninterrupted one.

use crate::config::{InitFrom, TrainConfig, STAGES_DIR};
use crate::error::{Result, TrainError};
use crate::run::{
    run_single, write_progress_file, InitSource, ProgressFile, Resume, RunOptions, RunOutcome,
    StageContext, CHECKPOINTS_DIR, TRAINING_STATE_FILE,
};
use crate::state::StageTag;
use crate::train::{files, write_atomic, Event, FinalMetrics};
use lazarus_checkpoint::{discover_committed, RunLock};
use lazarus_comm::Communicator;
use std::path::{Path, PathBuf};

/// The run directory of stage `i`: `RUN_DIR/stages/<name>`.
pub fn stage_dir(cfg: &TrainConfig, i: usize) -> PathBuf {
    cfg.run_dir.join(STAGES_DIR).join(&cfg.stages[i].name)
}

/// Whether stage `i` has trained to its end.
pub fn stage_complete(cfg: &TrainConfig, i: usize) -> bool {
    stage_dir(cfg, i).join(files::COMPLETE).exists()
}

/// Tokens one optimizer step of `c` consumes.
pub fn tokens_per_step(c: &TrainConfig) -> u64 {
    (c.batch * c.accum * c.seq) as u64
}

/// Where stage `i` stands, for `--list-stages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageState {
    Complete,
    /// Started; the newest committed checkpoint's step, if any.
    Started(Option<u64>),
    NotStarted,
}

/// The state of stage `i`, from its files.
pub fn stage_state(cfg: &TrainConfig, i: usize) -> StageState {
    let dir = stage_dir(cfg, i);
    if dir.join(files::COMPLETE).exists() {
        StageState::Complete
    } else if dir.exists() {
        let newest = discover_committed(&dir.join(CHECKPOINTS_DIR))
            .ok()
            .and_then(|c| c.first().map(|(_, m)| m.step));
        StageState::Started(newest)
    } else {
        StageState::NotStarted
    }
}

/// The checkpoint stage `i` (> 0) starts from: the committed checkpoint of the previous stage's
/// last step.
fn init_source(cfg: &TrainConfig, i: usize) -> InitSource {
    let prev = &cfg.stages[i - 1];
    let what = format!(
        "the final checkpoint of stage `{}` (step {})",
        prev.name, prev.steps
    );
    let root = stage_dir(cfg, i - 1).join(CHECKPOINTS_DIR);
    let found = discover_committed(&root)
        .map_err(|e| e.to_string())
        .and_then(|list| {
            list.into_iter()
                .find(|(_, m)| m.step == prev.steps)
                .map(|(dir, _)| dir)
                .ok_or_else(|| {
                    format!(
                        "stage `{}` starts from {what}, but {} holds no committed checkpoint of that step: run stage `{}` to its end first (lazarus train --stage {})",
                        cfg.stages[i].name,
                        root.display(),
                        prev.name,
                        prev.name
                    )
                })
        });
    InitSource {
        checkpoint: found,
        what,
        with_optimizer: cfg.stages[i].init_from.unwrap_or_default()
            == InitFrom::WeightsAndOptimizer,
    }
}

/// Whether `value` holds on every rank.
fn agree(comm: &dyn Communicator, value: bool) -> Result<bool> {
    Ok(comm.all_reduce_min_u64(u64::from(value))? == 1)
}

/// Rank 0: the whole run's directory, its lock and its `config.toml` (with the stages).
fn prepare_top(cfg: &TrainConfig, on_event: &mut dyn FnMut(Event)) -> Result<RunLock> {
    let dir = &cfg.run_dir;
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io("creating run directory", dir, e))?;
    let (lock, note) = RunLock::acquire(dir)?;
    if let Some(n) = note {
        on_event(Event::Warn(n));
    }
    write_atomic(&dir.join(files::CONFIG), cfg.to_toml().as_bytes())?;
    Ok(lock)
}

/// Refuses `--resume never` when a stage to run holds committed checkpoints.
fn check_resume_never(cfg: &TrainConfig, only: Option<usize>) -> Result<()> {
    for i in (0..cfg.stages.len()).filter(|&i| only.is_none_or(|o| o == i)) {
        let root = stage_dir(cfg, i).join(CHECKPOINTS_DIR);
        if let Some((dir, m)) = discover_committed(&root)?.first() {
            return Err(TrainError::Resume(format!(
                "--resume never, but stage `{}` holds committed checkpoints (newest: step {} in {}); use a new --run-dir or remove them",
                cfg.stages[i].name,
                m.step,
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Runs the stages of `cfg` (all, or `opts.only_stage`) from wherever the run directory
/// stands. `opts.stop_at` counts the steps of all stages.
pub fn run_staged(
    cfg: TrainConfig,
    opts: RunOptions,
    comm: Box<dyn Communicator>,
    on_event: &mut dyn FnMut(Event),
) -> Result<RunOutcome> {
    cfg.validate(comm.world_size())?;
    if matches!(opts.resume, Resume::Path(_)) {
        return Err(TrainError::Config(
            "--resume PATH is for runs without stages: a stage resumes from its own checkpoints, or starts from the previous stage's final one".into(),
        ));
    }
    let only = opts
        .only_stage
        .as_deref()
        .map(|n| cfg.stage_index(n))
        .transpose()?;
    if opts.resume == Resume::Never {
        check_resume_never(&cfg, only)?;
    }
    if let Some(i) = only.filter(|&i| i > 0 && stage_state(&cfg, i) == StageState::NotStarted) {
        // Fail before anything is written when the stage has nothing to start from.
        init_source(&cfg, i)
            .checkpoint
            .map_err(TrainError::Resume)?;
    }
    let lead = comm.rank() == 0;
    let _lock = if lead {
        Some(prepare_top(&cfg, on_event)?)
    } else {
        None
    };
    comm.barrier()?;
    let mut comm = comm;
    let (count, total) = (cfg.stages.len(), cfg.stages_total_steps());
    let (mut steps_before, mut tokens_before) = (0u64, 0u64);
    let mut last = None;
    for i in 0..count {
        let sc = cfg.stage_config(i);
        let (steps, tokens) = (sc.steps, sc.steps * tokens_per_step(&sc));
        let name = cfg.stages[i].name.clone();
        if only.is_none_or(|o| o == i) {
            if agree(comm.as_ref(), stage_complete(&cfg, i))? {
                on_event(Event::Info(format!(
                    "stage {} of {count} `{name}` is complete",
                    i + 1
                )));
            } else {
                on_event(Event::Info(format!(
                    "stage {} of {count} `{name}`: {steps} steps (run steps {} to {}) of batch {} x seq {} x accum {}, lr {:.2e}, warm-up {}, data {}",
                    i + 1,
                    steps_before + 1,
                    steps_before + steps,
                    sc.batch,
                    sc.seq,
                    sc.accum,
                    sc.lr,
                    sc.warmup_steps,
                    sc.data.display()
                )));
                let stage_opts = RunOptions {
                    stop_at: opts.stop_at.and_then(|s| s.checked_sub(steps_before)),
                    only_stage: None,
                    stage: Some(StageContext {
                        tag: StageTag {
                            index: i,
                            count,
                            name: name.clone(),
                        },
                        parent: cfg.run_dir.clone(),
                        steps_before,
                        tokens_before,
                        steps_total: total,
                    }),
                    init_from: (i > 0).then(|| init_source(&cfg, i)),
                    ..opts.clone()
                };
                let (outcome, c) = run_single(sc, &stage_opts, comm, on_event)?;
                comm = c;
                match outcome {
                    RunOutcome::Stopped {
                        step,
                        committed,
                        preempted,
                    } => {
                        return Ok(RunOutcome::Stopped {
                            step: steps_before + step,
                            committed: committed.map(|c| steps_before + c),
                            preempted,
                        })
                    }
                    RunOutcome::Complete(fm) => last = Some(fm),
                }
                let stop_here = opts.stop_at == Some(steps_before + steps);
                if stop_here && only.is_none() && i + 1 < count {
                    // `--stop-at` at a stage's last step stops before the next stage.
                    return Ok(RunOutcome::Stopped {
                        step: steps_before + steps,
                        committed: Some(steps_before + steps),
                        preempted: false,
                    });
                }
            }
        }
        steps_before += steps;
        tokens_before += tokens;
    }
    // Rank 0 writes a stage's final files after the last collective of the stage: wait for it
    // before reading them.
    comm.barrier()?;
    let all_done = (0..count).all(|i| stage_complete(&cfg, i));
    if !agree(comm.as_ref(), all_done)? {
        // `--stage NAME` ran one stage; the run as a whole goes on later.
        let Some(i) = only else {
            return Err(TrainError::Resume(format!(
                "every stage ran to its end, but not every stage directory under {} holds {}; was one removed during the run?",
                cfg.run_dir.join(STAGES_DIR).display(),
                files::COMPLETE
            )));
        };
        let fm = match last {
            Some(fm) => fm,
            None => read_final_metrics(&stage_dir(&cfg, i))?,
        };
        return Ok(RunOutcome::Complete(fm));
    }
    if lead {
        finish_whole(&cfg, &opts, on_event)?;
    }
    comm.barrier()?;
    read_final_metrics(&cfg.run_dir).map(RunOutcome::Complete)
}

fn read_final_metrics(dir: &Path) -> Result<FinalMetrics> {
    let path = dir.join(files::FINAL_METRICS);
    let bytes = std::fs::read(&path).map_err(|e| TrainError::io("reading", &path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| TrainError::Resume(format!("{}: {e}", path.display())))
}

fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).map_err(|e| TrainError::io("reading", from, e))?;
    write_atomic(to, &bytes)
}

/// Rank 0, once every stage is complete: the whole run's final files (the last stage's weights
/// and model, metrics over all stages), its progress, and `training_complete.marker` last.
fn finish_whole(
    cfg: &TrainConfig,
    opts: &RunOptions,
    on_event: &mut dyn FnMut(Event),
) -> Result<()> {
    let count = cfg.stages.len();
    let last_dir = stage_dir(cfg, count - 1);
    let fms = (0..count)
        .map(|i| read_final_metrics(&stage_dir(cfg, i)))
        .collect::<Result<Vec<_>>>()?;
    let last = fms.last().expect("a staged config has stages");
    let top = &cfg.run_dir;
    copy_atomic(
        &last_dir.join(files::FINAL_PARAMS),
        &top.join(files::FINAL_PARAMS),
    )?;
    copy_atomic(&last_dir.join(files::MODEL), &top.join(files::MODEL))?;
    let total = cfg.stages_total_steps();
    let tokens: u64 = fms.iter().map(|f| f.tokens).sum();
    let fm = FinalMetrics {
        step: total,
        tokens,
        elapsed_s: fms.iter().map(|f| f.elapsed_s).sum(),
        ..last.clone()
    };
    let json = serde_json::to_vec_pretty(&fm).expect("metrics serialise");
    write_atomic(&top.join(files::FINAL_METRICS), &json)?;
    let path = last_dir.join(TRAINING_STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|e| TrainError::io("reading", &path, e))?;
    let stage: ProgressFile = serde_json::from_slice(&bytes)
        .map_err(|e| TrainError::Resume(format!("{}: {e}", path.display())))?;
    let whole = ProgressFile {
        step: total,
        total_steps: total,
        tokens,
        complete: true,
        job: opts.job.clone(),
        ..stage
    };
    write_progress_file(top, &whole)?;
    write_atomic(
        &top.join(files::COMPLETE),
        format!("step {total}\n").as_bytes(),
    )?;
    on_event(Event::Info(format!(
        "all {count} stages complete ({total} steps, {tokens} tokens)"
    )));
    Ok(())
}
