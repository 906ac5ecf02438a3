//! `lazarus train`: resolves the configuration (file, then flags), makes the default data when
//! it is missing, runs training, and prints log lines or a progress bar.

use crate::cli::{DeviceArg, TrainArgs};
use crate::slurm::SlurmTask;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lazarus_comm::SingleRank;
use lazarus_trainer::run::{Resume, RunOptions, RunOutcome};
use lazarus_trainer::snapshot::RestoreParts;
use lazarus_trainer::train::{self, Event};
use lazarus_trainer::{corpus, TrainConfig};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use std::io::IsTerminal;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The config file (or defaults) with every given flag applied on top.
pub fn resolve(args: &TrainArgs) -> Result<TrainConfig> {
    let mut c = match &args.config {
        Some(p) => TrainConfig::from_toml_file(p)?,
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = args.$f.clone() { c.$f = v; } )* };
    }
    macro_rules! set_opt {
        ($($f:ident),*) => { $( if let Some(v) = args.$f { c.$f = Some(v); } )* };
    }
    set!(
        model,
        steps,
        seed,
        batch,
        seq,
        accum,
        lr,
        warmup_steps,
        weight_decay,
        grad_clip,
        data,
        val_every,
        val_batches,
        log_every,
        run_dir,
        save_every,
        keep_last,
        ckpt_compress
    );
    set_opt!(layers, heads, channels, vocab);
    if args.ckpt_fail_fast {
        c.ckpt_fail_fast = true;
    }
    Ok(c)
}

fn format_step(r: &train::StepReport, total: u64) -> String {
    let mut s = format!(
        "step {:>5}/{total} | loss {:.4} | lr {:.2e} | norm {:.3} | {:.1} ms | {:.0} tok/s",
        r.step, r.loss, r.lr, r.grad_norm, r.ms, r.tokens_per_s
    );
    if let Some(v) = r.val_loss {
        s.push_str(&format!(" | val {v:.4}"));
    }
    if let Some(ms) = r.ckpt_stall_ms {
        s.push_str(&format!(" | ckpt stall {ms:.1} ms"));
    }
    s
}

/// SIGTERM, SIGUSR1 and SIGINT set the returned flag (the loop stops at the next step boundary
/// with a committed checkpoint); a second one while the flag is set exits at once with 128+signal.
fn install_signal_handlers() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGUSR1, SIGINT] {
        // Registered first, so it sees the flag as it was before this signal's own handler runs.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&flag))
            .with_context(|| format!("installing the handler of signal {sig}"))?;
        signal_hook::flag::register(sig, Arc::clone(&flag))
            .with_context(|| format!("installing the handler of signal {sig}"))?;
    }
    Ok(flag)
}

/// Runs `lazarus train`; an error that ends a run is also written to the run directory's
/// `last_error.txt` for `lazarus status`.
pub fn train(args: TrainArgs) -> Result<()> {
    let cfg = resolve(&args)?;
    let result = train_with(args, &cfg);
    if let Err(e) = &result {
        if cfg
            .run_dir
            .join(lazarus_trainer::train::files::CONFIG)
            .exists()
        {
            let line = format!("{e:#}\n");
            // Best effort: the error itself is what the user must see.
            let _ = std::fs::write(cfg.run_dir.join(crate::status_cmd::LAST_ERROR_FILE), line);
        }
    }
    result
}

fn train_with(args: TrainArgs, cfg: &TrainConfig) -> Result<()> {
    let cfg = cfg.clone();
    // Reject a bad configuration before anything is written to disk.
    cfg.validate(1)?;
    if args.device == DeviceArg::Cuda {
        lazarus_kernels::check_device(lazarus_kernels::Device::Cuda { ordinal: 0 })?;
        anyhow::bail!("the CUDA training path is not available in this version; use --device cpu");
    }
    if !cfg.data.exists() && cfg.data == TrainConfig::default().data {
        println!(
            "no data at {}: writing the synthetic corpus there",
            cfg.data.display()
        );
        corpus::synth(&cfg.data, 1, 2_000_000)?;
    }
    let bar = (!args.no_progress && std::io::stdout().is_terminal()).then(|| {
        let pb = ProgressBar::new(cfg.steps);
        pb.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} steps, eta {eta} {msg}")
                .expect("valid template"),
        );
        pb
    });
    let say = |line: String| match &bar {
        Some(pb) => pb.println(line),
        None => println!("{line}"),
    };
    let mut on_event = |ev: Event| match ev {
        Event::Info(s) => say(s),
        Event::Warn(s) => match &bar {
            Some(pb) => pb.suspend(|| eprintln!("warning: {s}")),
            None => eprintln!("warning: {s}"),
        },
        Event::Step {
            report,
            logged,
            total,
        } => {
            if let Some(pb) = &bar {
                pb.set_position(report.step);
                pb.set_message(format!("loss {:.4}", report.loss));
            }
            if logged {
                say(format_step(&report, total));
            }
        }
    };
    let slurm = SlurmTask::from_env()?;
    if let Some(t) = &slurm {
        say(format!(
            "SLURM job {}, restart count {}, task {} of {} (local {})",
            t.job_id, t.restart_count, t.rank, t.world_size, t.local_rank
        ));
    }
    let opts = RunOptions {
        resume: match args.resume.as_str() {
            "auto" => Resume::Auto,
            "never" => Resume::Never,
            path => Resume::Path(path.into()),
        },
        stop_at: args.stop_at,
        parts: RestoreParts {
            skip_optimizer: args.no_load_optimizer,
            reset_schedule: args.reset_schedule,
        },
        final_save_timeout_ms: args.grace_ms,
        stop_signal: Some(install_signal_handlers()?),
        job: slurm.as_ref().map(SlurmTask::job),
    };
    let outcome = lazarus_trainer::run::run(
        cfg.clone(),
        opts,
        Box::new(SingleRank::new()),
        &mut on_event,
    )?;
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    match outcome {
        RunOutcome::Complete(fm) => println!(
            "done: {} steps, final loss {:.4}, val loss {:.4}, {:.0} tok/s; params sha256 {}",
            fm.step, fm.final_loss, fm.val_loss, fm.tokens_per_s, fm.params_sha256
        ),
        RunOutcome::Stopped {
            step, committed, ..
        } => println!(
            "stopped after step {step}; newest committed checkpoint: {}",
            committed.map_or("none".into(), |s| format!("step {s}"))
        ),
    }
    println!("run directory: {}", cfg.run_dir.display());
    Ok(())
}
