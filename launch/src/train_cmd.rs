//! `lazarus train`: resolves the configuration (file, then flags), makes the default data when
//! it is missing, runs training, and prints log lines or a progress bar.

use crate::cli::{CommArg, TrainArgs};
use crate::slurm::SlurmTask;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use lazarus_comm::{CommError, SingleRank, ThreadsComm};
use lazarus_trainer::config::ComputeDevice;
use lazarus_trainer::run;
use lazarus_trainer::run::{Resume, RunOptions, RunOutcome};
use lazarus_trainer::snapshot::RestoreParts;
use lazarus_trainer::stages::{stage_state, StageState};
use lazarus_trainer::stats::StatsRecord;
use lazarus_trainer::train::{self, Event};
use lazarus_trainer::TrainError;
use lazarus_trainer::{corpus, TrainConfig};
use std::io::IsTerminal;

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
    set_opt!(layers, heads, channels, vocab, block_size, peak_tflops);
    if let Some(v) = args.stats_interval_s {
        c.stats_interval_s = v;
    }
    if args.ckpt_fail_fast {
        c.ckpt_fail_fast = true;
    }
    if let Some(p) = args.precision {
        c.precision = p.into();
    }
    if let Some(d) = args.device {
        c.device = d.into();
    }
    Ok(c)
}

fn format_stats(r: &StatsRecord) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    const GIB: f64 = (1u64 << 30) as f64;
    let mut s = format!(
        "stats | step {} | {:.0} tok/s | {:.1} samples/s | {:.1} ms/step",
        r.step, r.tokens_per_s, r.samples_per_s, r.step_ms
    );
    if let (Some(rss), Some(peak)) = (r.host_rss_bytes, r.host_rss_peak_bytes) {
        s.push_str(&format!(
            " | rss {:.0} MiB (peak {:.0} MiB)",
            rss as f64 / MIB,
            peak as f64 / MIB
        ));
    }
    s.push_str(&format!(" | {:.3} TFLOP/s", r.model_tflops));
    if let Some(mfu) = r.mfu {
        s.push_str(&format!(" | mfu {:.1}%", 100.0 * mfu));
    }
    if let (Some(i), Some(used), Some(total), Some(util)) = (
        r.gpu_index,
        r.gpu_mem_used_bytes,
        r.gpu_mem_total_bytes,
        r.gpu_util_pct,
    ) {
        s.push_str(&format!(
            " | gpu {i}: {:.1}/{:.1} GiB, util {util}%",
            used as f64 / GIB,
            total as f64 / GIB
        ));
    }
    s
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

/// Events of a rank other than 0: only its warnings are shown.
fn warn_only(rank: usize, ev: Event) {
    if let Event::Warn(s) = ev {
        eprintln!("warning (rank {rank}): {s}");
    }
}

/// Runs `n` ranks as threads of this process: rank 0 on this thread (it reports), the others on
/// scoped threads. A rank that fails drops its communicator, so the others fail promptly; the
/// error reported is the first that is not a consequence of another rank's failure.
fn run_threads(
    cfg: &TrainConfig,
    opts: &RunOptions,
    n: usize,
    timeout_ms: u64,
    on_event: &mut dyn FnMut(Event),
) -> Result<RunOutcome> {
    let mut comms = ThreadsComm::group(n, timeout_ms).into_iter();
    let first = comms.next().expect("a group of n >= 1 ranks");
    let results: Vec<(usize, lazarus_trainer::Result<RunOutcome>)> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .enumerate()
            .map(|(i, c)| {
                let (cfg, opts) = (cfg.clone(), opts.clone());
                s.spawn(move || run::run(cfg, opts, Box::new(c), &mut |ev| warn_only(i + 1, ev)))
            })
            .collect();
        let mut results = vec![(
            0,
            run::run(cfg.clone(), opts.clone(), Box::new(first), on_event),
        )];
        for (i, h) in handles.into_iter().enumerate() {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(TrainError::Config(format!("rank {} panicked", i + 1))));
            results.push((i + 1, r));
        }
        results
    });
    let is_echo = |e: &TrainError| {
        matches!(
            e,
            TrainError::Comm(CommError::PeerLost { .. } | CommError::Timeout { .. })
        )
    };
    let mut errors: Vec<(usize, TrainError)> = Vec::new();
    let mut outcome = None;
    for (rank, r) in results {
        match r {
            Ok(o) if rank == 0 => outcome = Some(o),
            Ok(_) => {}
            Err(e) => errors.push((rank, e)),
        }
    }
    errors.sort_by_key(|(_, e)| is_echo(e));
    match (errors.into_iter().next(), outcome) {
        (Some((rank, e)), _) => {
            Err(anyhow::Error::new(e).context(format!("rank {rank} of {n} failed")))
        }
        (None, Some(o)) => Ok(o),
        (None, None) => anyhow::bail!("rank 0 ended without an outcome"),
    }
}

/// Where an NCCL rank stands: rank, world size, local rank (its GPU) and the key that names
/// this start of the group. From SLURM inside an srun step, else from `lazarus ranks`, else a
/// group of one.
fn nccl_task(slurm: Option<&SlurmTask>, get: impl Fn(&str) -> Option<String>) -> Result<NcclTask> {
    use crate::ranks::env;
    let num = |var: &str| -> Result<Option<usize>> {
        get(var)
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("{var}={v:?} is not a non-negative integer"))
            })
            .transpose()
    };
    // `lazarus ranks` (also inside a batch script, where SLURM names one task) comes first.
    if let Some(rank) = num(env::RANK)? {
        let world_size = num(env::WORLD_SIZE)?.ok_or_else(|| {
            anyhow::anyhow!("{} is set but {} is not", env::RANK, env::WORLD_SIZE)
        })?;
        if rank >= world_size {
            anyhow::bail!(
                "{}={rank} is not below {}={world_size}",
                env::RANK,
                env::WORLD_SIZE
            );
        }
        return Ok(NcclTask {
            rank,
            world_size,
            local_rank: num(env::LOCAL_RANK)?.unwrap_or(rank),
            key: get(env::RENDEZVOUS_KEY).ok_or_else(|| {
                anyhow::anyhow!("{} is set but {} is not", env::RANK, env::RENDEZVOUS_KEY)
            })?,
        });
    }
    if let Some(t) = slurm {
        // The step id and the restart count keep a requeued job from reading an old id file.
        let step = get("SLURM_STEP_ID").unwrap_or_else(|| "batch".into());
        return Ok(NcclTask {
            rank: t.rank,
            world_size: t.world_size,
            local_rank: t.local_rank,
            key: format!("slurm-{}-{step}-{}", t.job_id, t.restart_count),
        });
    }
    Ok(NcclTask {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        key: format!("single-{}", std::process::id()),
    })
}

/// One NCCL rank's place in its group.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NcclTask {
    rank: usize,
    world_size: usize,
    local_rank: usize,
    key: String,
}

/// Runs this process's NCCL rank: the group's unique id passes through a file in the run
/// directory, written by rank 0.
#[cfg(feature = "cuda")]
fn run_nccl(
    cfg: &TrainConfig,
    opts: RunOptions,
    slurm: Option<&SlurmTask>,
    timeout_ms: u64,
    on_event: &mut dyn FnMut(Event),
) -> Result<Option<RunOutcome>> {
    if cfg.device != ComputeDevice::Cuda {
        return Err(TrainError::Config(
            "--comm nccl moves data between GPUs: add --device cuda".into(),
        )
        .into());
    }
    let t = nccl_task(slurm, |k| std::env::var(k).ok())?;
    std::fs::create_dir_all(&cfg.run_dir)
        .map_err(|e| TrainError::io("creating", &cfg.run_dir, e))?;
    let comm = anyhow::Context::context(
        lazarus_comm::NcclComm::init(
            t.rank,
            t.world_size,
            t.local_rank,
            &cfg.run_dir,
            &t.key,
            timeout_ms,
        ),
        "starting NCCL",
    )?;
    let r = t.rank;
    let result = if r == 0 {
        run::run(cfg.clone(), opts, Box::new(comm), on_event)
    } else {
        run::run(cfg.clone(), opts, Box::new(comm), &mut |ev| {
            warn_only(r, ev)
        })
    };
    match result {
        Ok(o) => Ok((r == 0).then_some(o)),
        Err(e) => Err(anyhow::Error::new(e).context(format!("rank {r} of {}", t.world_size))),
    }
}

#[cfg(not(feature = "cuda"))]
fn run_nccl(
    _: &TrainConfig,
    _: RunOptions,
    slurm: Option<&SlurmTask>,
    _: u64,
    _: &mut dyn FnMut(Event),
) -> Result<Option<RunOutcome>> {
    // Checked anyway, so that a bad environment is reported first.
    nccl_task(slurm, |k| std::env::var(k).ok())?;
    anyhow::bail!("this build of lazarus has no NCCL support: rebuild with `cargo build --release -p lazarus --features cuda`, or use --comm threads or mpi")
}

/// Runs this process's MPI rank. After success MPI is finalized; after an error the whole
/// job is aborted, since the other ranks may be blocked in a collective waiting for this one.
#[cfg(feature = "mpi")]
fn run_mpi(
    cfg: &TrainConfig,
    opts: RunOptions,
    timeout_ms: u64,
    on_event: &mut dyn FnMut(Event),
) -> Result<Option<RunOutcome>> {
    use lazarus_comm::Communicator;
    let comm = anyhow::Context::context(lazarus_comm::MpiComm::init(timeout_ms), "starting MPI")?;
    let r = comm.rank();
    let result = if r == 0 {
        run::run(cfg.clone(), opts, Box::new(comm), on_event)
    } else {
        // Only rank 0 reports; the others show their warnings and errors.
        run::run(cfg.clone(), opts, Box::new(comm), &mut |ev| {
            warn_only(r, ev)
        })
    };
    match result {
        Ok(o) => {
            lazarus_comm::mpi::finalize();
            Ok((r == 0).then_some(o))
        }
        Err(e) => {
            eprintln!("error (rank {r}): {:#}", anyhow::Error::new(e));
            lazarus_comm::mpi::abort(1)
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(
    _: &TrainConfig,
    _: RunOptions,
    _: u64,
    _: &mut dyn FnMut(Event),
) -> Result<Option<RunOutcome>> {
    anyhow::bail!("this build of lazarus has no MPI support: rebuild with `cargo build --release -p lazarus --features mpi` (needs Open MPI), or use --comm threads")
}

/// Runs `lazarus train`; an error that ends a run is also written to the run directory's
/// `last_error.txt` for `lazarus status`.
pub fn train(args: TrainArgs) -> Result<()> {
    let cfg = resolve(&args)?;
    if args.list_stages {
        return list_stages(&cfg);
    }
    if args.dry_run {
        return crate::dry_run::dry_run(&args, &cfg);
    }
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
    if let Some(name) = &args.stage {
        cfg.stage_index(name)?;
    }
    if cfg.device == ComputeDevice::Cuda {
        // Fails at once, before any file is written, in a build without CUDA or on a machine
        // without a usable GPU; each rank opens its own device later.
        lazarus_kernels::check_device(lazarus_kernels::Device::Cuda { ordinal: 0 })?;
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
                pb.set_length(total);
                pb.set_position(report.step);
                pb.set_message(format!("loss {:.4}", report.loss));
            }
            if logged {
                say(format_step(&report, total));
            }
        }
        Event::Stats(r) => say(format_stats(&r)),
    };
    let slurm = SlurmTask::from_env()?;
    if let Some(t) = slurm.as_ref().filter(|t| t.rank == 0) {
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
        stop_signal: Some(crate::signals::install()?),
        job: slurm.as_ref().map(SlurmTask::job),
        only_stage: args.stage.clone(),
        stage: None,
        init_from: None,
    };
    let outcome = match args.comm {
        CommArg::Mpi => match run_mpi(&cfg, opts, args.collective_timeout_ms, &mut on_event)? {
            Some(o) => o,
            None => return Ok(()),
        },
        CommArg::Nccl => {
            match run_nccl(
                &cfg,
                opts,
                slurm.as_ref(),
                args.collective_timeout_ms,
                &mut on_event,
            )? {
                Some(o) => o,
                None => return Ok(()),
            }
        }
        CommArg::Threads if args.ranks > 1 => run_threads(
            &cfg,
            &opts,
            args.ranks,
            args.collective_timeout_ms,
            &mut on_event,
        )?,
        CommArg::Threads => run::run(
            cfg.clone(),
            opts,
            Box::new(SingleRank::new()),
            &mut on_event,
        )?,
    };
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

/// `--list-stages`: the config's stages, their settings and where each stands.
fn list_stages(cfg: &TrainConfig) -> Result<()> {
    if cfg.stages.is_empty() {
        println!(
            "the config has no [[stages]]: the run is one stage of {} steps",
            cfg.steps
        );
        return Ok(());
    }
    println!(
        "{} stages, {} steps, run directory {}",
        cfg.stages.len(),
        cfg.stages_total_steps(),
        cfg.run_dir.display()
    );
    println!(
        "{:>2}  {:<16} {:>7} {:>13} {:>5} {:>5} {:>5} {:>9} {:>6}  {:<21}  {:<24} STATE",
        "#",
        "NAME",
        "STEPS",
        "RUN STEPS",
        "SEQ",
        "BATCH",
        "ACCUM",
        "LR",
        "WARMUP",
        "INIT FROM",
        "DATA"
    );
    let mut before = 0;
    for (i, st) in cfg.stages.iter().enumerate() {
        let c = cfg.stage_config(i);
        let init = match (i, st.init_from.unwrap_or_default()) {
            (0, _) => "-",
            (_, lazarus_trainer::config::InitFrom::Weights) => "weights",
            (_, lazarus_trainer::config::InitFrom::WeightsAndOptimizer) => "weights_and_optimizer",
        };
        let state = match stage_state(cfg, i) {
            StageState::Complete => "complete".to_string(),
            StageState::Started(Some(s)) => format!("started, committed step {s}"),
            StageState::Started(None) => "started, nothing committed".to_string(),
            StageState::NotStarted => "not started".to_string(),
        };
        println!(
            "{:>2}  {:<16} {:>7} {:>13} {:>5} {:>5} {:>5} {:>9.2e} {:>6}  {:<21}  {:<24} {state}",
            i + 1,
            st.name,
            c.steps,
            format!("{}-{}", before + 1, before + c.steps),
            c.seq,
            c.batch,
            c.accum,
            c.lr,
            c.warmup_steps,
            init,
            c.data.display().to_string(),
        );
        before += c.steps;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn an_nccl_rank_finds_its_place_from_ranks_then_slurm_then_alone() {
        let t = nccl_task(
            None,
            vars(&[
                ("LAZARUS_RANK", "2"),
                ("LAZARUS_WORLD_SIZE", "4"),
                ("LAZARUS_LOCAL_RANK", "2"),
                ("LAZARUS_RENDEZVOUS_KEY", "k1"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (t.rank, t.world_size, t.local_rank, t.key.as_str()),
            (2, 4, 2, "k1")
        );
        let slurm = SlurmTask {
            job_id: "77".into(),
            rank: 5,
            world_size: 8,
            local_rank: 1,
            restart_count: 3,
        };
        let t = nccl_task(Some(&slurm), vars(&[("SLURM_STEP_ID", "0")])).unwrap();
        assert_eq!((t.rank, t.world_size, t.local_rank), (5, 8, 1));
        // A requeued job (restart count 4) never reads the id file of restart 3.
        assert_eq!(t.key, "slurm-77-0-3");
        let t = nccl_task(None, vars(&[])).unwrap();
        assert_eq!((t.rank, t.world_size), (0, 1));
    }

    #[test]
    fn a_bad_nccl_environment_is_an_error_that_names_the_variable() {
        let e = nccl_task(
            None,
            vars(&[
                ("LAZARUS_RANK", "4"),
                ("LAZARUS_WORLD_SIZE", "4"),
                ("LAZARUS_RENDEZVOUS_KEY", "k"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("LAZARUS_RANK=4 is not below"), "{e}");
        let e = nccl_task(None, vars(&[("LAZARUS_RANK", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("LAZARUS_RANK"), "{e}");
        let e = nccl_task(
            None,
            vars(&[("LAZARUS_RANK", "0"), ("LAZARUS_WORLD_SIZE", "2")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("LAZARUS_RENDEZVOUS_KEY"), "{e}");
    }
}
