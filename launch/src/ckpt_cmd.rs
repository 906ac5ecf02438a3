//! `lazarus ckpt`: list, verify, inspect, prune and export the checkpoints of a run directory.
//!
//! Everything is ordered by step, never by modification time. Every error names the run
//! directory or step and says what to do; a failed verification is an exit status of 1.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use lazarus_trainer::checkpoint::{
    apply_retention, list_checkpoints, open_verified, CheckpointEntry, EntryStatus, Manifest,
    OpenCheckpoint, RunLock, ShardInfo, COMMITTED_FILE,
};
use lazarus_trainer::export::export_hf;
use lazarus_trainer::run::CHECKPOINTS_DIR;
use lazarus_trainer::state::TrainingState;
use serde_json::json;

/// The `ckpt` subcommands.
#[derive(Debug, Subcommand)]
pub enum CkptCommand {
    /// List a run's step directories, oldest step first: status, world size, size, age.
    Ls {
        /// Run directory (or its `checkpoints/` folder).
        run_dir: PathBuf,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check committed checkpoints shard by shard (sizes, header hashes, every tensor's
    /// checksum); exit status 1 if any fails.
    Verify {
        /// Run directory (or its `checkpoints/` folder).
        run_dir: PathBuf,
        /// Check only this step (default: every committed checkpoint).
        #[arg(long)]
        step: Option<u64>,
    },
    /// Show a checkpoint's manifest, training state and the tensors of one shard.
    Inspect {
        /// Run directory (or its `checkpoints/` folder).
        run_dir: PathBuf,
        /// The step (default: the newest committed checkpoint).
        #[arg(long)]
        step: Option<u64>,
        /// The shard (rank) whose tensors to list.
        #[arg(long, default_value_t = 0)]
        shard: usize,
    },
    /// Delete old checkpoints as training's retention does: keep the newest K committed ones
    /// (never the newest), and drop uncommitted or invalid ones older than the newest commit.
    Prune {
        /// Run directory (or its `checkpoints/` folder).
        run_dir: PathBuf,
        /// Committed checkpoints to keep (the newest one is always kept, even with 0).
        #[arg(long)]
        keep_last: usize,
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write a verified checkpoint's weights as a Hugging Face GPT-2 model directory
    /// (model.safetensors + config.json, for GPT2LMHeadModel.from_pretrained).
    ExportHf {
        /// Run directory (or its `checkpoints/` folder).
        run_dir: PathBuf,
        /// The step (default: the newest committed checkpoint).
        #[arg(long)]
        step: Option<u64>,
        /// Output directory (created if absent; earlier exported files are replaced).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs one `ckpt` subcommand.
pub fn run(cmd: CkptCommand) -> Result<()> {
    match cmd {
        CkptCommand::Ls { run_dir, json } => ls(&run_dir, json),
        CkptCommand::Verify { run_dir, step } => verify(&run_dir, step),
        CkptCommand::Inspect {
            run_dir,
            step,
            shard,
        } => inspect(&run_dir, step, shard),
        CkptCommand::Prune {
            run_dir,
            keep_last,
            dry_run,
        } => prune(&run_dir, keep_last, dry_run),
        CkptCommand::ExportHf { run_dir, step, out } => export(&run_dir, step, &out),
    }
}

/// The checkpoint root of `run_dir`: `run_dir/checkpoints`, or `run_dir` itself when it holds
/// step directories (the user pointed at the checkpoints folder).
fn checkpoint_root(run_dir: &Path) -> Result<PathBuf> {
    if !run_dir.is_dir() {
        bail!(
            "run directory `{}` does not exist or is not a directory; pass the --run-dir of a training run",
            run_dir.display()
        );
    }
    let nested = run_dir.join(CHECKPOINTS_DIR);
    if nested.is_dir() {
        return Ok(nested);
    }
    let stages = run_dir.join(lazarus_trainer::config::STAGES_DIR);
    if stages.is_dir() {
        bail!(
            "`{}` is a run with stages, whose checkpoints are in each stage's directory: give `{}/NAME` (`lazarus train --list-stages` names them)",
            run_dir.display(),
            stages.display()
        );
    }
    let holds_steps = !list_checkpoints(run_dir).unwrap_or_default().is_empty();
    Ok(if holds_steps {
        run_dir.to_path_buf()
    } else {
        nested
    })
}

fn entries(root: &Path) -> Result<Vec<CheckpointEntry>> {
    list_checkpoints(root).with_context(|| format!("listing checkpoints in `{}`", root.display()))
}

/// The error for a root with no committed checkpoint, saying what is there instead.
fn no_committed(root: &Path, entries: &[CheckpointEntry]) -> anyhow::Error {
    let found = if entries.is_empty() {
        "no step directories".to_string()
    } else {
        format!(
            "{} step directories, none committed; `lazarus ckpt ls` shows why",
            entries.len()
        )
    };
    anyhow!(
        "no committed checkpoint in `{}` ({found}); train with --save-every N to write some",
        root.display()
    )
}

/// The committed checkpoint of `step`, or the newest committed one.
fn pick(root: &Path, step: Option<u64>) -> Result<(PathBuf, Manifest)> {
    let entries = entries(root)?;
    let Some(s) = step else {
        return entries
            .iter()
            .rev()
            .find_map(|e| Some((e.dir.clone(), e.manifest()?.clone())))
            .ok_or_else(|| no_committed(root, &entries));
    };
    let matching: Vec<&CheckpointEntry> = entries.iter().filter(|e| e.step() == Some(s)).collect();
    if let Some(e) = matching.iter().find(|e| e.manifest().is_some()) {
        return Ok((e.dir.clone(), e.manifest().expect("just checked").clone()));
    }
    match matching.first().map(|e| (&e.dir, &e.status)) {
        None => Err(anyhow!(
            "no checkpoint of step {s} in `{}`; `lazarus ckpt ls {}` lists the steps there",
            root.display(),
            root.display()
        )),
        Some((dir, EntryStatus::Invalid(reason))) => Err(anyhow!(
            "step {s} (`{}`) is not a usable checkpoint: {reason}",
            dir.display()
        )),
        Some((dir, _)) => Err(anyhow!(
            "step {s} (`{}`) is not committed: its save never finished, so it holds no usable checkpoint; pick a committed step from `lazarus ckpt ls`",
            dir.display()
        )),
    }
}

/// The trainer's state stored in a manifest.
fn training_state(dir: &Path, m: &Manifest) -> Result<TrainingState> {
    serde_json::from_value(m.training_state.clone()).map_err(|e| {
        anyhow!(
            "`{}`: the training state of step {} is not one this version of lazarus understands ({e}); use the version that wrote it",
            dir.join(COMMITTED_FILE).display(),
            m.step
        )
    })
}

/// Opens a committed checkpoint with every shard verified.
fn open_all(dir: &Path, m: &Manifest) -> lazarus_trainer::checkpoint::Result<OpenCheckpoint> {
    let all: Vec<usize> = (0..m.world_size).collect();
    open_verified(dir, m, &all)
}

fn ls(run_dir: &Path, as_json: bool) -> Result<()> {
    let root = checkpoint_root(run_dir)?;
    let entries = entries(&root)?;
    let now = unix_ms(SystemTime::now());
    if as_json {
        let rows: Vec<_> = entries.iter().map(|e| entry_json(e, now)).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if entries.is_empty() {
        let why = if root.is_dir() {
            "it holds no step directories"
        } else {
            "the directory does not exist: the run has not saved one yet"
        };
        println!("no checkpoints in `{}` ({why})", root.display());
        return Ok(());
    }
    let count = |f: fn(&EntryStatus) -> bool| entries.iter().filter(|e| f(&e.status)).count();
    println!(
        "checkpoints in `{}`: {} step directories, {} committed, {} uncommitted, {} invalid",
        root.display(),
        entries.len(),
        count(|s| matches!(s, EntryStatus::Committed(_))),
        count(|s| matches!(s, EntryStatus::Uncommitted)),
        count(|s| matches!(s, EntryStatus::Invalid(_))),
    );
    println!(
        "{:>9}  {:>5}  {:>10}  {:>9}  STATUS",
        "STEP", "WORLD", "SIZE", "AGE"
    );
    for e in &entries {
        let step = e.step().map_or_else(|| "-".to_string(), |s| s.to_string());
        let world = e
            .manifest()
            .map_or_else(|| "-".to_string(), |m| m.world_size.to_string());
        let status = match &e.status {
            EntryStatus::Committed(_) => "committed".to_string(),
            EntryStatus::Uncommitted => "uncommitted".to_string(),
            EntryStatus::Invalid(r) => format!("invalid: {r}"),
        };
        println!(
            "{step:>9}  {world:>5}  {:>10}  {:>9}  {status}",
            human_bytes(e.size_bytes),
            age(entry_time_ms(e), now)
        );
    }
    Ok(())
}

/// When a step directory was made: the commit time for committed ones (it survives copies),
/// the directory's modification time otherwise.
fn entry_time_ms(e: &CheckpointEntry) -> u64 {
    e.manifest()
        .map_or_else(|| unix_ms(e.modified), |m| m.created_unix_ms)
}

fn entry_json(e: &CheckpointEntry, now_ms: u64) -> serde_json::Value {
    let (status, reason) = match &e.status {
        EntryStatus::Committed(_) => ("committed", None),
        EntryStatus::Uncommitted => ("uncommitted", None),
        EntryStatus::Invalid(r) => ("invalid", Some(r.as_str())),
    };
    let time = entry_time_ms(e);
    json!({
        "step": e.step(),
        "dir": e.dir,
        "status": status,
        "reason": reason,
        "world_size": e.manifest().map(|m| m.world_size),
        "size_bytes": e.size_bytes,
        "time_unix_ms": time,
        "age_s": now_ms.saturating_sub(time) / 1000,
    })
}

fn verify(run_dir: &Path, step: Option<u64>) -> Result<()> {
    let root = checkpoint_root(run_dir)?;
    let entries = entries(&root)?;
    let targets: Vec<&CheckpointEntry> = match step {
        Some(s) => entries.iter().filter(|e| e.step() == Some(s)).collect(),
        None => entries
            .iter()
            .filter(|e| !matches!(e.status, EntryStatus::Uncommitted))
            .collect(),
    };
    if targets.is_empty() {
        return Err(match step {
            Some(s) => anyhow!(
                "no checkpoint of step {s} in `{}`; `lazarus ckpt ls {}` lists the steps there",
                root.display(),
                root.display()
            ),
            None => no_committed(&root, &entries),
        });
    }
    let mut failed = 0usize;
    for e in &targets {
        let step = e.step().map_or_else(|| "-".to_string(), |s| s.to_string());
        match verify_entry(e) {
            Ok(what) => println!("step {step:>9}  OK      {what}"),
            Err(why) => {
                failed += 1;
                println!("step {step:>9}  FAILED  {why}");
            }
        }
    }
    let skipped = entries.len() - targets.len();
    if step.is_none() && skipped > 0 {
        println!(
            "({} skipped: restore ignores them)",
            plural(skipped, "uncommitted step directory")
        );
    }
    if failed > 0 {
        bail!(
            "{failed} of {} checkpoints in `{}` failed verification; restore skips them and falls back to an older committed checkpoint that passes (remove the failed directories once you have looked at them)",
            targets.len(),
            root.display()
        );
    }
    println!("{}: all verified", plural(targets.len(), "checkpoint"));
    Ok(())
}

/// Verifies one step directory: what was checked, or why it is unusable.
fn verify_entry(e: &CheckpointEntry) -> std::result::Result<String, String> {
    let m = match &e.status {
        EntryStatus::Committed(m) => m,
        EntryStatus::Uncommitted => {
            return Err(format!(
                "`{}` is not committed (no {COMMITTED_FILE} file): a save that never finished; restore ignores it",
                e.dir.display()
            ))
        }
        EntryStatus::Invalid(r) => return Err(r.clone()),
    };
    open_all(&e.dir, m).map_err(|err| err.to_string())?;
    let state = training_state(&e.dir, m).map_err(|err| err.to_string())?;
    let tensors: usize = m.shards.iter().map(|s| s.tensors.len()).sum();
    let bytes: u64 = m.shards.iter().map(|s| s.size).sum();
    Ok(format!(
        "{} shards, {tensors} tensors, {} checked; training step {} of {}",
        m.world_size,
        human_bytes(bytes),
        state.step,
        state.total_steps
    ))
}

fn inspect(run_dir: &Path, step: Option<u64>, shard: usize) -> Result<()> {
    let root = checkpoint_root(run_dir)?;
    let (dir, m) = pick(&root, step)?;
    let Some(info) = m.shards.get(shard) else {
        bail!(
            "step {} has {} shards (0 to {}), so there is no shard {shard}; pass --shard below {}",
            m.step,
            m.world_size,
            m.world_size - 1,
            m.world_size
        );
    };
    let now = unix_ms(SystemTime::now());
    println!("checkpoint    {}", dir.display());
    println!("step          {}", m.step);
    println!("world size    {}", m.world_size);
    println!("layout hash   {}", m.layout_hash);
    println!(
        "created       {} ({})",
        utc_time(m.created_unix_ms),
        age(m.created_unix_ms, now)
    );
    println!(
        "size          {} in {} shards",
        human_bytes(m.shards.iter().map(|s| s.size).sum()),
        m.world_size
    );
    match training_state(&dir, &m) {
        Ok(state) => print_state(&state),
        Err(e) => println!(
            "training      {e:#}\n              raw: {}",
            m.training_state
        ),
    }
    print_shard(shard, m.world_size, info);
    println!(
        "(read from {COMMITTED_FILE}; `lazarus ckpt verify {} --step {}` checks the data itself)",
        root.display(),
        m.step
    );
    Ok(())
}

fn print_state(s: &TrainingState) {
    let md = &s.model;
    println!(
        "training      step {} of {}, {} tokens ({} samples; epoch {}, position {}), lr {:.3e}, {} restarts",
        s.step, s.total_steps, s.tokens, s.samples, s.epoch, s.position, s.lr, s.restarts
    );
    if let Some(st) = &s.stage {
        println!(
            "stage         {} of {} `{}`",
            st.index + 1,
            st.count,
            st.name
        );
    }
    println!(
        "model         {} layers, {} heads, {} channels, vocab {} (padded {}), block size {}; {} parameters",
        md.layers,
        md.heads,
        md.channels,
        md.vocab,
        md.padded_vocab,
        md.block_size,
        md.num_params()
    );
    match s.metrics.last() {
        None => println!("last metrics  (none recorded)"),
        Some(r) => {
            let val = r
                .val_loss
                .map_or_else(String::new, |v| format!(", val loss {v:.4}"));
            println!(
                "last metrics  step {}: loss {:.4}{val}, lr {:.3e}, grad norm {:.4}, {:.0} tokens/s",
                r.step, r.loss, r.lr, r.grad_norm, r.tokens_per_s
            );
        }
    }
}

fn print_shard(shard: usize, world: usize, info: &ShardInfo) {
    println!(
        "shard {shard} of {world}  {}, {}, header xxh3 {}",
        info.file,
        human_bytes(info.size),
        info.header_xxh3
    );
    println!(
        "  {:<12} {:<5} {:<12} {:<28} {:>10}  CHECKSUM",
        "NAME", "DTYPE", "SHAPE", "FLAT SLICE", "STORED"
    );
    for (name, t) in &info.tensors {
        let flat = t.flat.map_or_else(
            || "-".to_string(),
            |f| {
                let len = t.shape.first().copied().unwrap_or(0) as u64;
                format!("[{}, {}) of {}", f.offset, f.offset + len, f.total)
            },
        );
        println!(
            "  {name:<12} {:<5} {:<12} {flat:<28} {:>10}  {}",
            t.dtype.as_str(),
            format!("{:?}", t.shape),
            human_bytes(t.stored_bytes),
            t.checksum
        );
    }
}

/// A step directory that retention removes, and why.
struct Doomed<'a> {
    entry: &'a CheckpointEntry,
    why: String,
}

/// What `apply_retention(root, keep_last)` would remove, by the same policy: committed
/// checkpoints beyond the newest `max(keep_last, 1)`, and uncommitted or invalid step
/// directories older than the newest commit. Sorted by step.
fn retention_plan(entries: &[CheckpointEntry], keep_last: usize) -> Vec<Doomed<'_>> {
    let mut committed: Vec<(u64, &CheckpointEntry)> = entries
        .iter()
        .filter_map(|e| Some((e.manifest()?.step, e)))
        .collect();
    committed.sort_by_key(|c| std::cmp::Reverse(c.0));
    let Some(&(newest, _)) = committed.first() else {
        return Vec::new();
    };
    let keep = keep_last.max(1);
    let mut plan: Vec<Doomed<'_>> = committed
        .iter()
        .skip(keep)
        .map(|&(_, entry)| Doomed {
            entry,
            why: format!("committed, beyond the newest {keep}"),
        })
        .collect();
    for entry in entries
        .iter()
        .filter(|e| e.dir_step.is_some_and(|s| s < newest))
    {
        let why = match &entry.status {
            EntryStatus::Committed(_) => continue,
            EntryStatus::Uncommitted => {
                format!("uncommitted, older than the newest commit (step {newest})")
            }
            EntryStatus::Invalid(r) => {
                format!("invalid, older than the newest commit (step {newest}): {r}")
            }
        };
        plan.push(Doomed { entry, why });
    }
    plan.sort_by(|a, b| a.entry.dir.cmp(&b.entry.dir));
    plan
}

fn prune(run_dir: &Path, keep_last: usize, dry_run: bool) -> Result<()> {
    let root = checkpoint_root(run_dir)?;
    let entries = entries(&root)?;
    if entries.is_empty() {
        println!("no checkpoints in `{}`: nothing to prune", root.display());
        return Ok(());
    }
    if dry_run {
        let plan = retention_plan(&entries, keep_last);
        for d in &plan {
            println!("would remove {}  ({})", d.entry.dir.display(), d.why);
        }
        println!(
            "dry run: would remove {} of {} step directories in `{}`; nothing was removed",
            plan.len(),
            entries.len(),
            root.display()
        );
        return Ok(());
    }
    // Taking the run's lock keeps prune from racing a live run's own saves and retention.
    let lock_dir = root.parent().unwrap_or(&root);
    let (_lock, note) = RunLock::acquire(lock_dir).with_context(|| {
        format!(
            "pruning `{}` needs the run directory to itself",
            root.display()
        )
    })?;
    if let Some(n) = note {
        eprintln!("note: {n}");
    }
    let mut removed = apply_retention(&root, keep_last)
        .with_context(|| format!("pruning `{}`", root.display()))?;
    removed.sort();
    for dir in &removed {
        println!("removed {}", dir.display());
    }
    println!(
        "pruned `{}`: {} of {} step directories removed",
        root.display(),
        removed.len(),
        entries.len()
    );
    Ok(())
}

fn export(run_dir: &Path, step: Option<u64>, out: &Path) -> Result<()> {
    let root = checkpoint_root(run_dir)?;
    let (dir, m) = pick(&root, step)?;
    let state = training_state(&dir, &m)?;
    let ckpt = open_all(&dir, &m).with_context(|| {
        format!(
            "step {} (`{}`) failed verification and is not exported; `lazarus ckpt verify {}` shows which steps pass, export one with --step",
            m.step,
            dir.display(),
            root.display()
        )
    })?;
    let s = export_hf(&ckpt, &state, out).with_context(|| {
        format!(
            "exporting step {} (`{}`) to `{}`",
            m.step,
            dir.display(),
            out.display()
        )
    })?;
    let md = s.model;
    println!(
        "exported step {} ({} layers, {} heads, {} channels, vocab {}, block size {}; {} parameters) to `{}`",
        s.step,
        md.layers,
        md.heads,
        md.channels,
        md.vocab,
        md.block_size,
        s.params,
        out.display()
    );
    println!(
        "  {} ({}, {} tensors, F32; lm_head is tied to wte)",
        s.weights.display(),
        human_bytes(s.weights_bytes),
        s.tensors
    );
    println!("  {}", s.config.display());
    println!(
        "load it with transformers.GPT2LMHeadModel.from_pretrained(\"{}\")",
        out.display()
    );
    Ok(())
}

/// `1 checkpoint`, `3 checkpoints`, `2 step directories`.
fn plural(n: usize, noun: &str) -> String {
    match (n, noun.strip_suffix('y')) {
        (1, _) => format!("{n} {noun}"),
        (_, Some(stem)) => format!("{n} {stem}ies"),
        _ => format!("{n} {noun}s"),
    }
}

/// Milliseconds since the Unix epoch (0 before it).
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `1.5 KiB`, `3.0 GiB`; plain bytes below 1 KiB.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `42s ago`, `3m ago`, `5h ago`, `2d ago`.
fn age(then_ms: u64, now_ms: u64) -> String {
    let Some(s) = now_ms.checked_sub(then_ms).map(|d| d / 1000) else {
        return "in future".to_string();
    };
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// `2024-05-20 13:45:07 UTC`.
fn utc_time(unix_ms: u64) -> String {
    let c = lazarus_trainer::clock::civil_utc(unix_ms / 1000);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_times_read_well() {
        assert_eq!(plural(1, "checkpoint"), "1 checkpoint");
        assert_eq!(plural(2, "step directory"), "2 step directories");
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(age(1_000, 43_000), "42s ago");
        assert_eq!(age(0, 180_000), "3m ago");
        assert_eq!(age(0, 5 * 3_600_000 + 1), "5h ago");
        assert_eq!(age(0, 2 * 86_400_000), "2d ago");
        assert_eq!(age(2, 1), "in future");
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(1_716_212_707_000), "2024-05-20 13:45:07 UTC");
    }
}
