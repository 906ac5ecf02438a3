//! `lazarus train --dry-run`: resolves the configuration and checks what training would need
//! (data, run directory, device), estimates the memory of each rank against what the host has
//! (or a stated budget), the size of a checkpoint and the time per step from a few steps trained
//! in memory, then exits without training or writing to the run directory.

use crate::cli::{CommArg, TrainArgs};
use anyhow::{bail, Context, Result};
use lazarus_comm::{SingleRank, ThreadsComm};
use lazarus_trainer::checkpoint::{discover_committed, list_checkpoints, lock_holder};
use lazarus_trainer::config::ComputeDevice;
use lazarus_trainer::data::DataSource;
use lazarus_trainer::device::{cuda_memory, DeviceMemory};
use lazarus_trainer::estimate::{
    checkpoint_bytes, max_batch_fitting, DeviceEstimate, MemoryEstimate,
};
use lazarus_trainer::run::CHECKPOINTS_DIR;
use lazarus_trainer::snapshot::state_of;
use lazarus_trainer::stages::stage_dir;
use lazarus_trainer::train::Trainer;
use lazarus_trainer::{host, ModelConfig, TrainConfig};
use std::path::{Path, PathBuf};

const GIB: f64 = (1u64 << 30) as f64;

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB)
}

/// One stage (or the whole run without stages) as the dry run sees it.
struct Part {
    label: String,
    cfg: TrainConfig,
    model: ModelConfig,
    est: MemoryEstimate,
    train_windows: usize,
    /// Where its checkpoints are.
    ckpt_root: PathBuf,
}

/// Runs the dry run; an `Err` is a failed check.
pub fn dry_run(args: &TrainArgs, cfg: &TrainConfig) -> Result<()> {
    let world = args.ranks;
    cfg.validate(world)?;
    println!("dry run: nothing is trained and nothing is written");
    // Each rank of a GPU run uses the GPU of its local rank; device 0 stands for them all.
    let gpu = match cfg.device {
        ComputeDevice::Cuda => Some(cuda_memory(0)?),
        ComputeDevice::Cpu => None,
    };
    let parts = parts(args, cfg, world)?;
    let (budget, source) = budget(args)?;
    println!(
        "device       {}, {world} rank(s) in this process; host memory {} ({source})",
        if gpu.is_some() { "cuda" } else { "cpu" },
        budget.map_or("unknown".into(), gib)
    );
    if let Some(g) = &gpu {
        println!(
            "gpu          {}: {} free of {} after opening it (each rank uses its own GPU)",
            g.name,
            gib(g.free),
            gib(g.total)
        );
    }
    let mut problems = Vec::new();
    for p in &parts {
        print_part(p, world);
        if let Some(limit) = budget {
            if let Some(e) = fit_problem(p, world, limit, &source) {
                problems.push(e);
            }
        }
        if let Some(g) = &gpu {
            if let Some(e) = device_fit_problem(p, world, args.comm == CommArg::Nccl, g) {
                problems.push(e);
            }
        }
    }
    problems.extend(check_run_dir(cfg, &parts, args.resume.as_str(), world)?);
    if !problems.is_empty() {
        for p in &problems[1..] {
            eprintln!("error: {p}");
        }
        bail!("{}", problems[0]);
    }
    if args.dry_run_steps > 0 {
        for p in &parts {
            time_steps(p, world, args.dry_run_steps)?;
        }
    }
    println!("dry run: all checks passed");
    Ok(())
}

/// The parts to check: each stage (or `--stage`), or the run itself.
fn parts(args: &TrainArgs, cfg: &TrainConfig, world: usize) -> Result<Vec<Part>> {
    let list: Vec<(String, TrainConfig, PathBuf)> = if cfg.stages.is_empty() {
        vec![("run".into(), cfg.clone(), cfg.run_dir.join(CHECKPOINTS_DIR))]
    } else {
        let only = args
            .stage
            .as_deref()
            .map(|n| cfg.stage_index(n))
            .transpose()?;
        (0..cfg.stages.len())
            .filter(|&i| only.is_none_or(|o| o == i))
            .map(|i| {
                (
                    format!("stage `{}`", cfg.stages[i].name),
                    cfg.stage_config(i),
                    stage_dir(cfg, i).join(CHECKPOINTS_DIR),
                )
            })
            .collect()
    };
    list.into_iter()
        .map(|(label, c, ckpt_root)| {
            let data = DataSource::open(&c.data, c.seq).with_context(|| {
                format!(
                    "{label}: checking the data {} (`lazarus data synth` or `lazarus data prepare` writes some)",
                    c.data.display()
                )
            })?;
            let model = c.model_config(data.vocab)?;
            let est = MemoryEstimate::per_rank(&c, &model, world, data.train.windows);
            println!("{label}: data {}", data.description);
            Ok(Part {
                label,
                model,
                est,
                train_windows: data.train.windows,
                cfg: c,
                ckpt_root,
            })
        })
        .collect()
}

/// The memory to hold the estimate against: `--memory-budget-gib`, else the host's.
fn budget(args: &TrainArgs) -> Result<(Option<u64>, String)> {
    if let Some(g) = args.memory_budget_gib {
        if !(g.is_finite() && g > 0.0) {
            bail!("--memory-budget-gib must be a positive number of GiB, got {g}");
        }
        return Ok((Some((g * GIB) as u64), "--memory-budget-gib".into()));
    }
    Ok(match host::memory_available() {
        Some((b, src)) => (Some(b), format!("available now: {src}")),
        None => (None, "not readable on this system".into()),
    })
}

fn print_part(p: &Part, world: usize) {
    let (m, c) = (&p.model, &p.cfg);
    println!(
        "{}: model {} layers, {} heads, {} channels, vocab {} (padded {}), block size {}; {} parameters ({:.2}M)",
        p.label, m.layers, m.heads, m.channels, m.vocab, m.padded_vocab, m.block_size,
        m.num_params(), m.num_params() as f64 / 1e6
    );
    println!(
        "{}: {} steps of global batch {} x seq {} x accum {} ({} sequences per rank per micro-step)",
        p.label,
        c.steps,
        c.batch,
        c.seq,
        c.accum,
        c.batch / world
    );
    println!("{}: host memory per rank", p.label);
    for (name, bytes) in p.est.terms() {
        if bytes > 0 {
            println!("    {name:<30} {:>10}", gib(bytes));
        }
    }
    let total = p.est.total();
    println!(
        "    {:<30} {:>10} ({total} bytes) at peak, while a checkpoint is written",
        "total per rank",
        gib(total)
    );
    let ck = checkpoint_bytes(m, world);
    println!(
        "{}: one checkpoint is {} ({ck} bytes): parameters, AdamW m and v in f32",
        p.label,
        gib(ck)
    );
}

/// The error when the ranks of this process do not fit in `limit` bytes.
fn fit_problem(p: &Part, world: usize, limit: u64, source: &str) -> Option<String> {
    let need = p.est.total() * world as u64;
    if need <= limit {
        println!(
            "{}: {world} rank(s) need {} of the {} ({source}): fits",
            p.label,
            gib(need),
            gib(limit)
        );
        return None;
    }
    let terms: Vec<String> = p
        .est
        .terms()
        .iter()
        .filter(|(_, b)| *b > 0)
        .map(|(n, b)| format!("{n} {}", gib(*b)))
        .collect();
    let c = &p.cfg;
    let advice = batch_advice(
        c,
        world,
        max_batch_fitting(c, &p.model, world, world, p.train_windows, limit),
        "use a smaller model or more memory",
    );
    Some(format!(
        "{}: batch {} x seq {} does not fit: {world} rank(s) need {} ({need} bytes; per rank: {}) but the memory is {} ({limit} bytes, {source}); {advice}",
        p.label,
        c.batch,
        c.seq,
        gib(need),
        terms.join(", "),
        gib(limit)
    ))
}

/// What to do when the batch does not fit and at most `max` sequences (a multiple of `world`)
/// would: the largest fitting batch, and a batch and accumulation within it that keep the
/// global batch (sequences per optimizer step) at or just above the configured one.
fn batch_advice(c: &TrainConfig, world: usize, max: Option<usize>, otherwise: &str) -> String {
    match max {
        Some(b) if b < c.batch => {
            let global = c.batch * c.accum;
            let accum = global.div_ceil(b);
            let batch = global.div_ceil(accum).div_ceil(world) * world;
            format!(
                "at most --batch {b} fits; --batch {batch} --accum {accum} gives {} sequences per step (now {global})",
                batch * accum
            )
        }
        _ => format!("not even one sequence per rank fits: {otherwise}"),
    }
}

/// Prints the GPU memory a rank of `p` needs; the error when it does not fit the free memory.
fn device_fit_problem(p: &Part, world: usize, nccl: bool, g: &DeviceMemory) -> Option<String> {
    let est = DeviceEstimate::per_rank(&p.cfg, &p.model, world, nccl);
    println!("{}: GPU memory per rank", p.label);
    for (name, bytes) in est.terms() {
        if bytes > 0 {
            println!("    {name:<30} {:>10}", gib(bytes));
        }
    }
    let need = est.total();
    if need <= g.free {
        println!(
            "{}: each rank needs {} of its GPU's {} free: fits",
            p.label,
            gib(need),
            gib(g.free)
        );
        return None;
    }
    let c = &p.cfg;
    let advice = batch_advice(
        c,
        world,
        DeviceEstimate::max_batch_fitting(c, &p.model, world, nccl, g.free),
        "use a smaller model, a shorter --seq or more ranks",
    );
    let terms: Vec<String> = est
        .terms()
        .iter()
        .filter(|(_, b)| *b > 0)
        .map(|(n, b)| format!("{n} {}", gib(*b)))
        .collect();
    Some(format!(
        "{}: batch {} x seq {} does not fit on the GPU: each rank needs {} ({need} bytes: {}) but {} has {} free ({} bytes); {advice}",
        p.label,
        c.batch,
        c.seq,
        gib(need),
        terms.join(", "),
        g.name,
        gib(g.free),
        g.free
    ))
}

/// The nearest existing ancestor of `dir` (itself if it exists).
fn existing_ancestor(dir: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(dir).ok()?;
    abs.ancestors().find(|a| a.exists()).map(Path::to_path_buf)
}

/// Whether a file can be created in directory `dir` (created and removed at once).
fn writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".lazarus-dry-run-{}", std::process::id()));
    std::fs::File::create(&probe)?;
    std::fs::remove_file(&probe)
}

/// Checks the run directory: writable, free space for the checkpoints kept, existing
/// checkpoints compatible with the config, not in use. Returns the failed checks.
fn check_run_dir(
    cfg: &TrainConfig,
    parts: &[Part],
    resume: &str,
    world: usize,
) -> Result<Vec<String>> {
    let dir = &cfg.run_dir;
    let mut problems = Vec::new();
    let Some(base) = existing_ancestor(dir) else {
        return Ok(vec![format!(
            "run directory {}: cannot resolve the path",
            dir.display()
        )]);
    };
    if !base.is_dir() {
        problems.push(format!(
            "run directory {} cannot be created: {} is not a directory",
            dir.display(),
            base.display()
        ));
        return Ok(problems);
    }
    match writable(&base) {
        Ok(()) => println!(
            "run dir      {} ({}): writable",
            dir.display(),
            if base == std::path::absolute(dir)? {
                "exists"
            } else {
                "will be created"
            }
        ),
        Err(e) => problems.push(format!(
            "run directory {}: cannot write in {}: {e}",
            dir.display(),
            base.display()
        )),
    }
    if let Ok(Some((h, alive))) = lock_holder(dir) {
        if alive.unwrap_or(true) {
            problems.push(format!(
                "run directory {} is in use by pid {} on {}",
                dir.display(),
                h.pid,
                h.host
            ));
        }
    }
    let mut existing = 0u64;
    for p in parts {
        existing += list_checkpoints(&p.ckpt_root)?
            .iter()
            .map(|e| e.size_bytes)
            .sum::<u64>();
        problems.extend(check_checkpoints(p, resume)?);
    }
    // Every stage keeps its last `keep_last` checkpoints; one more is written at a time.
    let ck = checkpoint_bytes(&parts[0].model, world);
    let kept = (cfg.keep_last.max(1) * cfg.stages.len().max(1) + 1) as u64;
    let need = (kept * ck).saturating_sub(existing).max(ck);
    match host::free_disk_bytes(&base) {
        Some(free) if free < need => problems.push(format!(
            "run directory {}: {} free ({free} bytes) but {kept} checkpoints of {} need {} more ({need} bytes); free space or lower --keep-last",
            dir.display(),
            gib(free),
            gib(ck),
            gib(need)
        )),
        Some(free) => println!(
            "disk         {} free; {kept} checkpoints of {} (keep_last {} per stage, + 1 being written) need {} more: fits",
            gib(free),
            gib(ck),
            cfg.keep_last,
            gib(need)
        ),
        None => println!("disk         free space unknown"),
    }
    Ok(problems)
}

/// Whether the committed checkpoints under `root` can be resumed by `part`.
fn check_checkpoints(part: &Part, resume: &str) -> Result<Vec<String>> {
    let (label, root) = (&part.label, &part.ckpt_root);
    let committed = discover_committed(root)?;
    let Some((newest_dir, m)) = committed.first() else {
        println!("{label}: no committed checkpoint: training starts at step 0");
        return Ok(Vec::new());
    };
    if resume == "never" {
        return Ok(vec![format!(
            "{label}: --resume never, but {} holds committed checkpoints (newest: step {})",
            root.display(),
            m.step
        )]);
    }
    let state = match state_of(m) {
        Ok(s) => s,
        Err(e) => return Ok(vec![format!("{label}: {e}")]),
    };
    let want = lazarus_trainer::layout::Layout::gpt2(&part.model).hash();
    if state.model != part.model || state.layout_hash != want {
        let (a, b) = (&state.model, &part.model);
        return Ok(vec![format!(
            "{label}: {} holds a model of {} layers, {} heads, {} channels, vocab {}, block {}, but the config makes {} layers, {} heads, {} channels, vocab {}, block {}; training would refuse it (use a new --run-dir)",
            newest_dir.display(), a.layers, a.heads, a.channels, a.vocab, a.block_size,
            b.layers, b.heads, b.channels, b.vocab, b.block_size
        )]);
    }
    println!(
        "{label}: {} committed checkpoint(s), newest step {} of {} (written by {} rank(s)): compatible, training resumes there",
        committed.len(),
        m.step,
        state.total_steps,
        m.world_size
    );
    Ok(Vec::new())
}

/// Trains `steps` steps of `p` in memory (no run directory) and prints the time per step.
fn time_steps(p: &Part, world: usize, steps: u64) -> Result<()> {
    let cfg = p.cfg.clone();
    let run = |comm: Box<dyn lazarus_comm::Communicator>| -> lazarus_trainer::Result<Vec<f64>> {
        let mut tr = Trainer::new(cfg.clone(), comm)?;
        (0..steps).map(|_| tr.train_step().map(|r| r.ms)).collect()
    };
    let mut ms = if world == 1 {
        run(Box::new(SingleRank::new()))?
    } else {
        let mut comms =
            ThreadsComm::group(world, lazarus_comm::COLLECTIVE_TIMEOUT_MS_DEFAULT).into_iter();
        let first = comms.next().expect("a group of world >= 1 ranks");
        std::thread::scope(|s| {
            let others: Vec<_> = comms.map(|c| s.spawn(|| run(Box::new(c)))).collect();
            let lead = run(Box::new(first));
            for h in others {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a rank panicked while timing steps"))??;
            }
            lead.map_err(anyhow::Error::from)
        })?
    };
    // The first step pays for page faults and cold caches.
    if ms.len() > 1 {
        ms.remove(0);
    }
    ms.sort_by(f64::total_cmp);
    let med = ms[ms.len() / 2];
    let c = &p.cfg;
    let tokens = (c.batch * c.seq * c.accum) as f64;
    let total_s = med * c.steps as f64 / 1e3;
    println!(
        "{}: time per step {med:.1} ms (median of {} measured), {:.0} tokens/s; {} steps take about {}",
        p.label,
        ms.len(),
        tokens / (med / 1e3),
        c.steps,
        human_s(total_s)
    );
    Ok(())
}

fn human_s(s: f64) -> String {
    match s {
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_and_durations() {
        let tmp = std::env::temp_dir();
        assert_eq!(
            existing_ancestor(&tmp.join("no/such/dir")),
            Some(std::path::absolute(&tmp).unwrap())
        );
        assert_eq!(human_s(30.0), "30 s");
        assert_eq!(human_s(600.0), "10 min");
        assert_eq!(human_s(36_000.0), "10.0 h");
    }
}
