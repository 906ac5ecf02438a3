//! `lazarus status RUN_DIR`: where a run stands, read from its files alone (it works while the
//! run is going, after it stopped, and on another node of a shared filesystem).

use anyhow::{bail, Context, Result};
use lazarus_trainer::checkpoint::{list_checkpoints, lock_holder};
use lazarus_trainer::config::STAGES_DIR;
use lazarus_trainer::run::{ProgressFile, StageProgress, CHECKPOINTS_DIR, TRAINING_STATE_FILE};
use lazarus_trainer::train::{files, StepReport};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// File where `lazarus train` records the error that ended it.
pub const LAST_ERROR_FILE: &str = "last_error.txt";

/// Flags of `lazarus status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    /// Refresh until the run is complete or failed.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, default_value_t = 5)]
    pub interval_s: u64,
    /// Longest time --watch keeps refreshing, in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub watch_max_s: u64,
}

/// The state of a run, which is also the exit code of `lazarus status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Trained to the end (exit 0).
    Complete,
    /// Ended by an error (exit 1).
    Failed,
    /// A live process holds the run directory (exit 3).
    Running,
    /// Not running and not complete: preempted, stopped, or not started (exit 4).
    Stopped,
}

impl RunState {
    /// The exit code that reports this state.
    pub fn exit_code(self) -> u8 {
        match self {
            RunState::Complete => 0,
            RunState::Failed => 1,
            RunState::Running => 3,
            RunState::Stopped => 4,
        }
    }
}

/// Everything `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    pub run_dir: PathBuf,
    pub state: RunState,
    /// Steps done and the length of the run (of all stages together in a run with stages).
    pub step: u64,
    pub total_steps: u64,
    /// The stage in progress, in a run with stages.
    pub stage: Option<StageProgress>,
    pub tokens: u64,
    pub restarts: u64,
    pub newest_commit: Option<u64>,
    pub newest_commit_age_s: Option<u64>,
    pub loss: Option<f32>,
    /// "falling", "flat" or "rising", from the recent logged losses.
    pub loss_trend: Option<&'static str>,
    pub val_loss: Option<f32>,
    pub tokens_per_s: Option<f64>,
    pub eta_s: Option<u64>,
    pub holder: Option<String>,
    pub last_error: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn recent_metrics(dir: &Path) -> Vec<StepReport> {
    let text = std::fs::read_to_string(dir.join(files::METRICS)).unwrap_or_default();
    let all: Vec<StepReport> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    all[all.len().saturating_sub(20)..].to_vec()
}

fn trend(m: &[StepReport]) -> Option<&'static str> {
    if m.len() < 4 {
        return None;
    }
    let half = m.len() / 2;
    let mean = |s: &[StepReport]| s.iter().map(|r| r.loss as f64).sum::<f64>() / s.len() as f64;
    let (old, new) = (mean(&m[..half]), mean(&m[half..]));
    Some(if new < old * 0.98 {
        "falling"
    } else if new > old * 1.02 {
        "rising"
    } else {
        "flat"
    })
}

/// Reads the status of the run in `dir`.
pub fn read_status(dir: &Path) -> Result<Status> {
    if !dir.join(files::CONFIG).exists() {
        bail!(
            "{} is not a run directory (no {}): give the --run-dir of a `lazarus train`",
            dir.display(),
            files::CONFIG
        );
    }
    let progress: Option<ProgressFile> = std::fs::read(dir.join(TRAINING_STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let stage = progress.as_ref().and_then(|p| p.stage.clone());
    // A run with stages keeps metrics and checkpoints in the directory of the current stage,
    // numbering its steps from 1; `offset` turns them into steps of the whole run.
    let (work_dir, offset) = match (&stage, &progress) {
        (Some(s), Some(p)) => (
            dir.join(STAGES_DIR).join(&s.name),
            p.step.saturating_sub(s.step),
        ),
        _ => (dir.to_path_buf(), 0),
    };
    let metrics = recent_metrics(&work_dir);
    let last = metrics.last();
    let commits: Vec<_> = list_checkpoints(&work_dir.join(CHECKPOINTS_DIR))?
        .into_iter()
        .filter_map(|e| e.manifest().cloned())
        .collect();
    let newest = commits.iter().max_by_key(|m| m.step);
    let holder = lock_holder(dir)?;
    let running = holder
        .as_ref()
        .is_some_and(|(_, alive)| alive.unwrap_or(true));
    let error_path = dir.join(LAST_ERROR_FILE);
    let last_error = std::fs::read_to_string(&error_path)
        .ok()
        .map(|s| s.trim().to_string());
    let error_is_newest = match (mtime(&error_path), mtime(&dir.join(TRAINING_STATE_FILE))) {
        (Some(e), Some(p)) => e >= p,
        (Some(_), None) => true,
        _ => false,
    };
    let state = if dir.join(files::COMPLETE).exists() {
        RunState::Complete
    } else if running {
        RunState::Running
    } else if last_error.is_some() && error_is_newest {
        RunState::Failed
    } else {
        RunState::Stopped
    };
    let step = last
        .map_or(0, |r| offset + r.step)
        .max(progress.as_ref().map_or(0, |p| p.step));
    let stage = stage.map(|s| StageProgress {
        step: step - offset,
        ..s
    });
    let total_steps = progress.as_ref().map_or(0, |p| p.total_steps);
    let mut ms: Vec<f64> = metrics.iter().map(|r| r.ms).collect();
    ms.sort_by(f64::total_cmp);
    let eta_s = (state == RunState::Running && !ms.is_empty())
        .then(|| (total_steps.saturating_sub(step) as f64 * ms[ms.len() / 2] / 1e3) as u64);
    Ok(Status {
        run_dir: dir.to_path_buf(),
        state,
        step,
        total_steps,
        stage,
        tokens: progress.as_ref().map_or(0, |p| p.tokens),
        restarts: progress.as_ref().map_or(0, |p| p.restarts),
        newest_commit: newest.map(|m| m.step),
        newest_commit_age_s: newest.map(|m| now_ms().saturating_sub(m.created_unix_ms) / 1000),
        loss: last.map(|r| r.loss),
        loss_trend: trend(&metrics),
        val_loss: metrics.iter().rev().find_map(|r| r.val_loss),
        tokens_per_s: last.map(|r| r.tokens_per_s),
        eta_s,
        holder: holder.map(|(h, alive)| {
            format!(
                "pid {} on {}{}",
                h.pid,
                h.host,
                if alive == Some(false) {
                    " (dead: stale lock)"
                } else {
                    ""
                }
            )
        }),
        last_error,
    })
}

fn human_s(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{:.1}h", s as f64 / 3600.0),
    }
}

fn print_text(s: &Status) {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    println!("run        {}", s.run_dir.display());
    println!("state      {:?}", s.state);
    println!("step       {} of {}", s.step, s.total_steps);
    if let Some(st) = &s.stage {
        println!(
            "stage      {} of {} `{}`, step {} of {}",
            st.index + 1,
            st.count,
            st.name,
            st.step,
            st.steps
        );
    }
    println!("tokens     {}", s.tokens);
    println!(
        "checkpoint {}",
        opt(s.newest_commit.map(|c| format!(
            "step {c}, committed {} ago",
            human_s(s.newest_commit_age_s.unwrap_or(0))
        )))
    );
    println!(
        "loss       {} ({})",
        opt(s.loss.map(|l| format!("{l:.4}"))),
        s.loss_trend.unwrap_or("trend unknown")
    );
    println!("val loss   {}", opt(s.val_loss.map(|l| format!("{l:.4}"))));
    println!(
        "speed      {}",
        opt(s.tokens_per_s.map(|t| format!("{t:.0} tokens/s")))
    );
    println!("eta        {}", opt(s.eta_s.map(human_s)));
    println!("restarts   {}", s.restarts);
    if let Some(h) = &s.holder {
        println!("held by    {h}");
    }
    if let Some(e) = &s.last_error {
        println!("last error {e}");
    }
}

/// Runs `lazarus status`; returns the exit code.
pub fn run(a: &StatusArgs) -> Result<u8> {
    let deadline = std::time::Instant::now() + Duration::from_secs(a.watch_max_s);
    loop {
        let s = read_status(&a.run_dir)
            .with_context(|| format!("reading the status of {}", a.run_dir.display()))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print_text(&s);
        }
        let terminal = matches!(s.state, RunState::Complete | RunState::Failed);
        if !a.watch || terminal || std::time::Instant::now() >= deadline {
            return Ok(s.state.exit_code());
        }
        std::thread::sleep(Duration::from_secs(a.interval_s.max(1)));
        if !a.json {
            println!();
        }
    }
}
