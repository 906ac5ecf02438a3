//! `lazarus-bench report`: reads the result files of every suite, takes the newest of each
//! (by `machine.date_utc`) and writes a Markdown report with tables and SVG plots. The GPU
//! section appears only when there is a `gpu` result.

use crate::ckpt_suite::{self, PeerStatus};
use crate::gpu_suite::{self, GpuReport};
use crate::machine::Machine;
use crate::plots::{self, Kind, Panel, Series};
use crate::train_suite;
use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Component, Path, PathBuf};

/// The suites the report has a section for, in order (`gpu` only when it has a result).
pub const SUITES: [&str; 4] = ["train", "ckpt", "recovery", "gpu"];
/// Every plot the report may write; ones not written this time are removed, so the plots
/// directory never shows a chart of data the report no longer uses.
const PLOT_FILES: [&str; 6] = [
    "train_tokens_per_s.svg",
    "ckpt_stall.svg",
    "ckpt_persist.svg",
    "ckpt_restore.svg",
    "ckpt_vs_pytorch.svg",
    "recovery.svg",
];
/// Largest result file read, in bytes.
const RESULT_BYTES_MAX: u64 = 64 << 20;

/// Options of `report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Markdown file to write.
    #[arg(long, default_value = "bench/REPORT.md")]
    pub report_file: PathBuf,
    /// Directory for the SVG plots.
    #[arg(long, default_value = "bench/plots")]
    pub plots_dir: PathBuf,
}

/// Fields every result file has.
#[derive(Debug, Deserialize)]
struct Header {
    suite: String,
    machine: Machine,
}

#[derive(Debug, Deserialize)]
pub struct TrainFile {
    pub rows: Vec<train_suite::Row>,
}

#[derive(Debug, Deserialize)]
pub struct CkptFile {
    pub dir: String,
    pub page_cache: String,
    /// Absent in files written before the suite had a PyTorch peer.
    #[serde(default)]
    pub peer: Option<PeerStatus>,
    pub rows: Vec<ckpt_suite::Row>,
}

/// One row of the recovery suite: a rank killed at a step, and how the run came back.
#[derive(Debug, Clone, Deserialize)]
pub struct RecoveryRow {
    pub model: String,
    pub ranks: usize,
    pub params: u64,
    pub save_every: u64,
    pub kill_at_step: u64,
    pub detection_ms: f64,
    pub restart_ms: f64,
    pub restore_ms: f64,
    pub first_step_ms: f64,
    pub total_ms: f64,
    pub steps_lost: u64,
}

#[derive(Debug, Deserialize)]
pub struct RecoveryFile {
    pub rows: Vec<RecoveryRow>,
}

/// A suite's data.
#[derive(Debug)]
pub enum Data {
    Train(TrainFile),
    Ckpt(CkptFile),
    Recovery(RecoveryFile),
    Gpu(Box<GpuReport>),
}

impl Data {
    fn rows(&self) -> usize {
        match self {
            Data::Train(f) => f.rows.len(),
            Data::Ckpt(f) => f.rows.len(),
            Data::Recovery(f) => f.rows.len(),
            Data::Gpu(f) => f.rows.len(),
        }
    }

    /// A `gpu` result of a machine without a GPU: no rows, and the reason.
    fn is_skip(&self) -> bool {
        matches!(self, Data::Gpu(g) if g.status == "skipped")
    }
}

/// One parsed result file.
#[derive(Debug)]
pub struct ResultFile {
    pub path: PathBuf,
    pub suite: String,
    pub machine: Machine,
    pub data: Data,
}

/// The result files of a directory: the usable ones and, for each other `.json`, why not.
#[derive(Debug, Default)]
pub struct Loaded {
    pub files: Vec<ResultFile>,
    pub skipped: Vec<(PathBuf, String)>,
}

/// Whether `s` is a UTC time as `Machine` writes it: `YYYY-MM-DDTHH:MM:SSZ`.
fn is_date_utc(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

fn parse_rows<T: serde::de::DeserializeOwned>(v: serde_json::Value, suite: &str) -> Result<T> {
    serde_json::from_value(v).with_context(|| format!("not a `{suite}` result"))
}

/// Parses one result file's bytes; the error says what is wrong with it.
pub fn parse_result(path: &Path, bytes: &[u8]) -> Result<ResultFile> {
    let v: serde_json::Value = serde_json::from_slice(bytes).context("not valid JSON")?;
    let h: Header = serde_json::from_value(v.clone())
        .context("not a result file (it needs `suite` and `machine`)")?;
    ensure!(
        is_date_utc(&h.machine.date_utc),
        "`machine.date_utc` is `{}`, not YYYY-MM-DDTHH:MM:SSZ",
        h.machine.date_utc
    );
    let data = match h.suite.as_str() {
        "train" => Data::Train(parse_rows(v, "train")?),
        "ckpt" => Data::Ckpt(parse_rows(v, "ckpt")?),
        "recovery" => Data::Recovery(parse_rows(v, "recovery")?),
        "gpu" => Data::Gpu(Box::new(parse_rows(v, "gpu")?)),
        other => anyhow::bail!("unknown suite `{other}` (known: {})", SUITES.join(", ")),
    };
    ensure!(
        data.rows() > 0 || data.is_skip(),
        "the `{}` result has no rows",
        h.suite
    );
    Ok(ResultFile {
        path: path.to_path_buf(),
        suite: h.suite,
        machine: h.machine,
        data,
    })
}

/// Reads every `*.json` in `dir`, in name order. A file that cannot be used is listed in
/// `skipped` with the reason; a directory that cannot be read is an error.
pub fn load_dir(dir: &Path) -> Result<Loaded> {
    let entries = fs::read_dir(dir).with_context(|| {
        format!(
            "reading the results directory {} (run a suite first, or pass --out)",
            dir.display()
        )
    })?;
    let mut paths = Vec::new();
    for e in entries {
        let p = e
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if p.extension().is_some_and(|x| x == "json") && p.is_file() {
            paths.push(p);
        }
    }
    paths.sort();
    let mut loaded = Loaded::default();
    for p in paths {
        let read = fs::metadata(&p).map_err(anyhow::Error::from).and_then(|m| {
            ensure!(
                m.len() <= RESULT_BYTES_MAX,
                "larger than {RESULT_BYTES_MAX} bytes"
            );
            Ok(fs::read(&p)?)
        });
        match read.and_then(|b| parse_result(&p, &b)) {
            Ok(f) => loaded.files.push(f),
            Err(e) => loaded.skipped.push((p, format!("{e:#}"))),
        }
    }
    Ok(loaded)
}

/// The newest file of `suite` by `machine.date_utc` (ties: the later file name).
pub fn newest<'a>(files: &'a [ResultFile], suite: &str) -> Option<&'a ResultFile> {
    files
        .iter()
        .filter(|f| f.suite == suite)
        .max_by(|a, b| (&a.machine.date_utc, &a.path).cmp(&(&b.machine.date_utc, &b.path)))
}

/// `path` as a link from `base` (a directory): relative when `path` is inside it.
fn link(base: &Path, path: &Path) -> String {
    let abs = |p: &Path| {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        p.components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect::<PathBuf>()
    };
    let (base, path) = (abs(base), abs(path));
    let shown = path.strip_prefix(&base).unwrap_or(&path);
    shown.to_string_lossy().replace('\\', "/")
}

/// Where the report goes and how it links to the rest.
struct Ctx {
    report_dir: PathBuf,
    plots_dir: PathBuf,
    results_dir: PathBuf,
    written: Vec<String>,
}

impl Ctx {
    /// Writes one plot and returns the Markdown image line for it.
    fn plot(&mut self, file: &str, alt: &str, panels: &[Panel]) -> Result<String> {
        assert!(
            PLOT_FILES.contains(&file),
            "plot {file} is not in PLOT_FILES"
        );
        let path = self.plots_dir.join(file);
        plots::write_svg(&path, panels)?;
        self.written.push(file.to_string());
        Ok(format!("![{alt}]({})\n\n", link(&self.report_dir, &path)))
    }

    fn source(&self, f: &ResultFile) -> String {
        let m = &f.machine;
        let l = link(&self.report_dir, &f.path);
        format!(
            "Source: [`{l}`]({l}); machine: {}, {} cores, {} GiB; commit `{}`; measured {}.\n\n",
            m.cpu, m.cores, m.memory_gib, m.git_commit, m.date_utc
        )
    }

    fn not_measured(&self, suite: &str) -> String {
        format!(
            "Not measured: no usable `{suite}` result file in `{}` (run `lazarus-bench {suite}`).\n\n",
            link(&self.report_dir, &self.results_dir)
        )
    }
}

fn train_section(ctx: &mut Ctx, f: &ResultFile, t: &TrainFile) -> Result<String> {
    let mut md = ctx.source(f);
    md.push_str(&train_suite::table(&t.rows));
    md.push('\n');
    let mut ranks: Vec<usize> = t.rows.iter().map(|r| r.ranks).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let mut models: Vec<&str> = Vec::new();
    for r in &t.rows {
        if !models.contains(&r.model.as_str()) {
            models.push(&r.model);
        }
    }
    let series = models
        .iter()
        .map(|m| {
            let row = |k: usize| t.rows.iter().find(|r| r.model == *m && r.ranks == k);
            let params = row(ranks[0]).or_else(|| t.rows.iter().find(|r| r.model == *m));
            let name = format!(
                "{m} ({:.2}M params)",
                params.map_or(0.0, |r| r.params as f64 / 1e6)
            );
            Series::new(
                name,
                ranks
                    .iter()
                    .map(|&k| row(k).map(|r| r.tokens_per_s))
                    .collect(),
            )
        })
        .collect();
    let panel = Panel {
        title: "Training throughput by model and thread ranks".into(),
        y_desc: "tokens/s (log)".into(),
        categories: ranks
            .iter()
            .map(|&k| format!("{k} rank{}", if k == 1 { "" } else { "s" }))
            .collect(),
        series,
        kind: Kind::Lines,
        log_y: true,
    };
    md.push_str(&ctx.plot(
        "train_tokens_per_s.svg",
        "tokens/s by model and ranks",
        &[panel],
    )?);
    Ok(md)
}

fn ckpt_panels(rows: &[ckpt_suite::Row]) -> [Panel; 3] {
    let cats: Vec<String> = rows.iter().map(|r| format!("{} MiB", r.size_mib)).collect();
    let col = |f: fn(&ckpt_suite::Row) -> f64| rows.iter().map(|r| Some(f(r))).collect::<Vec<_>>();
    let panel = |title: &str, y: &str, series, log_y| Panel {
        title: title.into(),
        y_desc: y.into(),
        categories: cats.clone(),
        series,
        kind: Kind::Lines,
        log_y,
    };
    [
        panel(
            "Training-loop stall of a checkpoint save",
            "ms (log)",
            vec![
                Series::new("async save stall", col(|r| r.stall_ms)),
                Series::new("async save stall, cold staging", col(|r| r.stall_cold_ms)),
                Series::new(
                    "synchronous save (no async writer)",
                    col(|r| r.sync_save_ms),
                ),
            ],
            true,
        ),
        panel(
            "Persist bandwidth against the raw disk",
            "GB/s",
            vec![
                Series::new("Lazarus persist (save to durable)", col(|r| r.persist_gbps)),
                Series::new("raw write + fsync", col(|r| r.raw_write_gbps)),
            ],
            false,
        ),
        panel(
            "Restore time, cold cache",
            "ms (log)",
            vec![
                Series::new(
                    "restore, 1 rank (checksums verified)",
                    col(|r| r.restore_ms),
                ),
                Series::new(
                    "reshard restore 4 to 3 ranks",
                    col(|r| r.reshard_restore_ms),
                ),
                Series::new("raw read", col(|r| r.raw_read_ms)),
            ],
            true,
        ),
    ]
}

fn peer_panels(rows: &[ckpt_suite::Row]) -> Vec<Panel> {
    let with: Vec<_> = rows
        .iter()
        .filter_map(|r| r.peer.as_ref().map(|p| (r, p)))
        .collect();
    let cats: Vec<String> = with
        .iter()
        .map(|(r, _)| format!("{} MiB", r.size_mib))
        .collect();
    let n = with.first().map_or(0, |(_, p)| p.ranks);
    let col = |f: fn(&ckpt_suite::PeerRow) -> f64| {
        with.iter().map(|(_, p)| Some(f(p))).collect::<Vec<_>>()
    };
    let panel = |title: String, series| Panel {
        title,
        y_desc: "ms (log)".into(),
        categories: cats.clone(),
        series,
        kind: Kind::Bars,
        log_y: true,
    };
    vec![
        panel(
            format!("Blocking the training loop, {n} ranks"),
            vec![
                Series::new("Lazarus async save stall", col(|p| p.lazarus_stall_ms)),
                Series::new("DCP async_save blocking", col(|p| p.dcp_async_blocking_ms)),
                Series::new("DCP save (synchronous)", col(|p| p.dcp_save_ms)),
            ],
        ),
        panel(
            "Until durable".into(),
            vec![
                Series::new(
                    format!("Lazarus, {n} shards"),
                    col(|p| p.lazarus_durable_ms),
                ),
                Series::new(
                    format!("DCP async_save, {n} ranks"),
                    col(|p| p.dcp_async_durable_ms),
                ),
                Series::new(
                    "Lazarus, 1 writer",
                    col(|p| p.lazarus_one_writer_durable_ms),
                ),
                Series::new("torch.save + fsync", col(|p| p.torch_save_durable_ms)),
            ],
        ),
    ]
}

fn peer_section(ctx: &mut Ctx, c: &CkptFile) -> Result<String> {
    let mut md = String::from("### Against PyTorch\n\n");
    if c.rows.iter().any(|r| r.peer.is_some()) {
        md.push_str(&ckpt_suite::peer_table(&c.rows));
        md.push('\n');
        md.push_str(ckpt_suite::PEER_NOTE);
        md.push_str("\n\n");
        if let Some(p) = c.rows.iter().find_map(|r| r.peer.as_ref()) {
            let _ = writeln!(md, "PyTorch {}.\n", p.torch_version);
        }
        md.push_str(&ctx.plot(
            "ckpt_vs_pytorch.svg",
            "Lazarus against PyTorch",
            &peer_panels(&c.rows),
        )?);
    } else {
        let why = match &c.peer {
            None => "the result file predates the PyTorch peer".to_string(),
            Some(p) => p
                .reason
                .clone()
                .unwrap_or_else(|| format!("peer status `{}`", p.status)),
        };
        let _ = writeln!(md, "Not measured: {why}.\n");
    }
    for r in c.rows.iter().filter(|r| r.peer_error.is_some()) {
        let _ = writeln!(
            md,
            "The PyTorch peer failed at {} MiB: {}\n",
            r.size_mib,
            r.peer_error.as_deref().unwrap_or_default()
        );
    }
    Ok(md)
}

fn ckpt_section(ctx: &mut Ctx, f: &ResultFile, c: &CkptFile) -> Result<String> {
    let mut md = ctx.source(f);
    let _ = writeln!(md, "Disk: `{}`; page cache: {}.\n", c.dir, c.page_cache);
    let loads: Vec<String> = c
        .rows
        .iter()
        .filter_map(|r| r.load_1m.map(|l| format!("{} MiB {l:.1}", r.size_mib)))
        .collect();
    if !loads.is_empty() {
        let _ = writeln!(
            md,
            "Load average (1 min) as each size finished, on {} cores: {}.\n",
            f.machine.cores,
            loads.join(", ")
        );
    }
    md.push_str(&ckpt_suite::table(&c.rows));
    md.push('\n');
    let [stall, persist, restore] = ckpt_panels(&c.rows);
    md.push_str(&ctx.plot("ckpt_stall.svg", "checkpoint stall by state size", &[stall])?);
    md.push_str(&ctx.plot(
        "ckpt_persist.svg",
        "persist bandwidth and raw write",
        &[persist],
    )?);
    md.push_str(&ctx.plot("ckpt_restore.svg", "restore and reshard time", &[restore])?);
    md.push_str(&peer_section(ctx, c)?);
    Ok(md)
}

/// The recovery table, one line per run.
pub fn recovery_table(rows: &[RecoveryRow]) -> String {
    let mut s = String::from(
        "| model | ranks | params | save every | killed at step | detection ms | restart ms | restore ms | first step ms | total ms | steps lost |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.2}M | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
            r.model,
            r.ranks,
            r.params as f64 / 1e6,
            r.save_every,
            r.kill_at_step,
            r.detection_ms,
            r.restart_ms,
            r.restore_ms,
            r.first_step_ms,
            r.total_ms,
            r.steps_lost
        );
    }
    s
}

fn recovery_section(ctx: &mut Ctx, f: &ResultFile, rec: &RecoveryFile) -> Result<String> {
    let mut md = ctx.source(f);
    md.push_str(&recovery_table(&rec.rows));
    md.push('\n');
    let mut cats: Vec<String> = rec
        .rows
        .iter()
        .map(|r| format!("{}, {} ranks", r.model, r.ranks))
        .collect();
    let mut seen = BTreeMap::new();
    for c in &cats {
        *seen.entry(c.clone()).or_insert(0) += 1;
    }
    for (c, r) in cats.iter_mut().zip(&rec.rows) {
        if seen[c.as_str()] > 1 {
            c.push_str(&format!(", kill at {}", r.kill_at_step));
        }
    }
    let col = |f: fn(&RecoveryRow) -> f64| rec.rows.iter().map(|r| Some(f(r))).collect::<Vec<_>>();
    let panel = Panel {
        title: "Recovery after a killed rank".into(),
        y_desc: "ms".into(),
        categories: cats,
        series: vec![
            Series::new("detection", col(|r| r.detection_ms)),
            Series::new("restart", col(|r| r.restart_ms)),
            Series::new("restore", col(|r| r.restore_ms)),
        ],
        kind: Kind::Stacked,
        log_y: false,
    };
    md.push_str(&ctx.plot(
        "recovery.svg",
        "recovery time: detection, restart, restore",
        &[panel],
    )?);
    Ok(md)
}

/// The GPU section, present only when there is a `gpu` result: the newest measured one, or,
/// when every `gpu` result is a skip, the newest skip's reason. A later skip on a machine
/// without a GPU does not hide a measurement.
fn gpu_section(ctx: &Ctx, files: &[ResultFile]) -> Option<String> {
    let gpu: Vec<(&ResultFile, &GpuReport)> = files
        .iter()
        .filter_map(|f| match &f.data {
            Data::Gpu(g) => Some((f, g.as_ref())),
            _ => None,
        })
        .collect();
    let newest = |measured: bool| {
        gpu.iter()
            .filter(|(_, g)| (g.status == "measured") == measured)
            .max_by(|(a, _), (b, _)| {
                (&a.machine.date_utc, &a.path).cmp(&(&b.machine.date_utc, &b.path))
            })
    };
    let mut md = String::from("## GPU (`gpu`)\n\n");
    let Some((f, g)) = newest(true) else {
        let (f, g) = newest(false)?;
        let l = link(&ctx.report_dir, &f.path);
        let _ = writeln!(
            md,
            "Not measured: the newest `gpu` result ([`{l}`]({l}), {}) was skipped: {}.\n",
            f.machine.date_utc,
            g.skip_reason.as_deref().unwrap_or("no reason recorded")
        );
        return Some(md);
    };
    md.push_str(&ctx.source(f));
    let m = &g.machine;
    if let Some(gpu) = m.gpus.first() {
        let mem = gpu
            .memory_mib
            .map_or(String::new(), |v| format!(", {v} MiB"));
        let _ = writeln!(md, "GPU: {}{mem}, driver {}.\n", gpu.name, gpu.driver);
    }
    if let Some(p) = &g.peak_source {
        let _ = writeln!(md, "MFU peak: {p}.\n");
    }
    md.push_str(&gpu_suite::table(&g.rows));
    md.push('\n');
    if let Some(c) = &g.curve {
        let _ = writeln!(md, "{}.\n", gpu_suite::curve_line(c));
    }
    match g.peer.as_ref() {
        Some(p) => match gpu_suite::peer_line(p) {
            Some(line) => {
                let _ = writeln!(md, "{line}.\n");
            }
            None => {
                let v = p.torch_version.as_deref().unwrap_or("unknown");
                let _ = writeln!(md, "PyTorch {v}.\n");
            }
        },
        None => md.push_str("PyTorch peer: not recorded.\n\n"),
    }
    Some(md)
}

const TITLES: [(&str, &str); 3] = [
    ("train", "Training throughput"),
    ("ckpt", "Checkpoints"),
    ("recovery", "Recovery"),
];

/// The whole Markdown report, writing the plots on the way; also the suites it had results
/// for.
fn render(ctx: &mut Ctx, loaded: &Loaded) -> Result<(String, Vec<&'static str>)> {
    let mut measured = Vec::new();
    let mut md = String::from("# Lazarus benchmark report\n\n");
    let _ = writeln!(
        md,
        "Written by `lazarus-bench report` from the newest result file of each suite (by \
         `machine.date_utc`) in `{}`. Regenerate with \
         `cargo run --release -p lazarus-bench -- report`; `lazarus-bench all` measures and \
         regenerates.\n",
        link(&ctx.report_dir, &ctx.results_dir)
    );
    for (suite, title) in TITLES {
        let _ = writeln!(md, "## {title} (`{suite}`)\n");
        let body = match newest(&loaded.files, suite) {
            None => ctx.not_measured(suite),
            Some(f) => {
                measured.push(suite);
                match &f.data {
                    Data::Train(t) => train_section(ctx, f, t)?,
                    Data::Ckpt(c) => ckpt_section(ctx, f, c)?,
                    Data::Recovery(r) => recovery_section(ctx, f, r)?,
                    // GPU results have their own section below.
                    Data::Gpu(_) => unreachable!("TITLES has no gpu entry"),
                }
            }
        };
        md.push_str(&body);
        if !md.ends_with("\n\n") {
            md.push('\n');
        }
    }
    if let Some(gpu) = gpu_section(ctx, &loaded.files) {
        if loaded
            .files
            .iter()
            .any(|f| matches!(&f.data, Data::Gpu(g) if g.status == "measured"))
        {
            measured.push("gpu");
        }
        md.push_str(&gpu);
    }
    if !loaded.skipped.is_empty() {
        md.push_str("## Files not used\n\n");
        for (p, why) in &loaded.skipped {
            let _ = writeln!(md, "- `{}`: {why}", link(&ctx.report_dir, p));
        }
        md.push('\n');
    }
    Ok((md, measured))
}

/// Reads `results_dir`, writes the report and its plots; returns the report's text and the
/// suites it had results for.
pub fn write_report(results_dir: &Path, args: &ReportArgs) -> Result<(String, Vec<&'static str>)> {
    let loaded = load_dir(results_dir)?;
    for (p, why) in &loaded.skipped {
        eprintln!("skipped {}: {why}", p.display());
    }
    let report_dir = match args.report_file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&args.plots_dir)
        .with_context(|| format!("creating {}", args.plots_dir.display()))?;
    let mut ctx = Ctx {
        report_dir,
        plots_dir: args.plots_dir.clone(),
        results_dir: results_dir.to_path_buf(),
        written: Vec::new(),
    };
    let (md, measured) = render(&mut ctx, &loaded)?;
    for stale in PLOT_FILES
        .iter()
        .filter(|p| !ctx.written.iter().any(|w| w == *p))
    {
        let path = args.plots_dir.join(stale);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    fs::write(&args.report_file, &md)
        .with_context(|| format!("writing {}", args.report_file.display()))?;
    Ok((md, measured))
}

/// `lazarus-bench report`.
pub fn run(args: &ReportArgs, results_dir: &Path) -> Result<()> {
    let (_, measured) = write_report(results_dir, args)?;
    let measured = if measured.is_empty() {
        "none".to_string()
    } else {
        measured.join(", ")
    };
    println!(
        "wrote {} (suites with results: {measured}) and plots in {}",
        args.report_file.display(),
        args.plots_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn machine(date: &str) -> Value {
        json!({"cores": 2, "memory_gib": 23.5, "cpu": "Test CPU", "git_commit": "abc123def456",
               "date_utc": date})
    }

    fn train_json(date: &str) -> Value {
        let row = |model: &str, ranks: usize, tps: f64| {
            json!({"model": model, "ranks": ranks, "params": 437760, "batch": 8, "seq": 64,
                   "steps": 10, "ms_per_step_median": 30.0, "tokens_per_s": tps, "scaling": 1.0})
        };
        json!({"suite": "train", "machine": machine(date),
               "rows": [row("d2", 1, 14000.0), row("d2", 2, 11000.0), row("d6", 1, 800.0)]})
    }

    fn ckpt_json(date: &str, with_peer: bool) -> Value {
        let rows = [64, 256].map(|m| ckpt_suite::example_row(m, with_peer));
        let mut v = json!({"suite": "ckpt", "machine": machine(date), "dir": "/scratch",
                           "page_cache": "cold cache", "cache_drops": {"attempts": 1, "dropped": 1},
                           "runtime_s": 1.0, "rows": rows});
        if with_peer {
            v["peer"] = json!({"status": "measured", "reason": null, "python": "python3",
                               "torch_version": "2.15.0", "ranks": 2});
        }
        v
    }

    fn recovery_json(date: &str) -> Value {
        let row = |kill: u64| {
            json!({"model": "d2", "ranks": 4, "params": 437760, "save_every": 10,
                   "kill_at_step": kill, "detection_ms": 3000.0, "restart_ms": 800.0,
                   "restore_ms": 120.0, "first_step_ms": 40.0, "total_ms": 3960.0,
                   "steps_lost": 7})
        };
        json!({"suite": "recovery", "machine": machine(date), "rows": [row(17), row(25)]})
    }

    fn parse(v: &Value) -> Result<ResultFile> {
        parse_result(Path::new("x.json"), v.to_string().as_bytes())
    }

    fn err(v: &Value) -> String {
        format!("{:#}", parse(v).unwrap_err())
    }

    #[test]
    fn each_suite_parses() {
        let f = parse(&train_json("2026-11-23T02:37:21Z")).unwrap();
        assert!(matches!(&f.data, Data::Train(t) if t.rows.len() == 3 && t.rows[2].model == "d6"));
        assert_eq!(f.machine.git_commit, "abc123def456");
        let f = parse(&ckpt_json("2026-11-23T02:37:21Z", true)).unwrap();
        let Data::Ckpt(c) = &f.data else {
            panic!("not ckpt")
        };
        assert_eq!(c.peer.as_ref().unwrap().status, "measured");
        assert_eq!(
            c.rows[1].peer.as_ref().unwrap().dcp_async_blocking_ms,
            200.0
        );
        let f = parse(&recovery_json("2026-11-23T02:37:21Z")).unwrap();
        assert!(matches!(&f.data, Data::Recovery(r) if r.rows[1].kill_at_step == 25));
    }

    #[test]
    fn ckpt_files_from_before_the_peer_parse() {
        let mut v = ckpt_json("2026-11-23T01:24:36Z", false);
        for r in v["rows"].as_array_mut().unwrap() {
            let r = r.as_object_mut().unwrap();
            r.remove("peer");
            r.remove("peer_error");
        }
        let f = parse(&v).unwrap();
        let Data::Ckpt(c) = &f.data else {
            panic!("not ckpt")
        };
        assert!(c.peer.is_none() && c.rows.iter().all(|r| r.peer.is_none()));
    }

    #[test]
    fn malformed_files_say_what_is_wrong() {
        let e = format!(
            "{:#}",
            parse_result(Path::new("x.json"), b"{\"suite\": ").unwrap_err()
        );
        assert!(e.contains("not valid JSON"), "{e}");
        assert!(err(&json!({"suite": "train"})).contains("needs `suite` and `machine`"));
        let mut v = train_json("2026-11-23T02:37:21Z");
        v["machine"]["date_utc"] = json!("23/11/2026");
        assert!(err(&v).contains("not YYYY-MM-DDTHH:MM:SSZ"), "{}", err(&v));
        v["machine"]["date_utc"] = json!("2026-11-23T02:37:21Z");
        v["suite"] = json!("speed");
        assert!(err(&v).contains("unknown suite `speed`"), "{}", err(&v));
        v["suite"] = json!("train");
        v["rows"] = json!([]);
        assert!(err(&v).contains("has no rows"), "{}", err(&v));
        let mut v = ckpt_json("2026-11-23T02:37:21Z", false);
        v["rows"][0].as_object_mut().unwrap().remove("stall_ms");
        let e = err(&v);
        assert!(
            e.contains("not a `ckpt` result") && e.contains("stall_ms"),
            "{e}"
        );
        let mut v = recovery_json("2026-11-23T02:37:21Z");
        v["rows"][0]["detection_ms"] = json!("fast");
        assert!(err(&v).contains("not a `recovery` result"), "{}", err(&v));
    }

    #[test]
    fn dates_are_checked_strictly() {
        assert!(is_date_utc("2026-11-23T02:37:21Z"));
        assert!(!is_date_utc("2026-11-23T02:37:21"));
        assert!(!is_date_utc("2026-11-23 02:37:21Z"));
        assert!(!is_date_utc("2026-1a-23T02:37:21Z"));
    }

    #[test]
    fn newest_goes_by_date_not_by_name() {
        let mk = |name: &str, v: Value| parse_result(Path::new(name), v.to_string().as_bytes());
        let files = vec![
            mk("b-train.json", train_json("2026-11-22T10:00:00Z")).unwrap(),
            mk("a-train.json", train_json("2026-11-23T09:00:00Z")).unwrap(),
            mk("z-train.json", train_json("2025-12-31T23:59:59Z")).unwrap(),
            mk("c-ckpt.json", ckpt_json("2026-11-24T00:00:00Z", false)).unwrap(),
            mk("d-ckpt.json", ckpt_json("2026-11-24T00:00:00Z", false)).unwrap(),
        ];
        assert_eq!(
            newest(&files, "train").unwrap().path,
            Path::new("a-train.json")
        );
        // Same date: the later name wins, so the choice never depends on listing order.
        assert_eq!(
            newest(&files, "ckpt").unwrap().path,
            Path::new("d-ckpt.json")
        );
        assert!(newest(&files, "recovery").is_none());
    }

    #[test]
    fn a_missing_results_directory_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("no-such-results");
        let e = format!("{:#}", load_dir(&missing).unwrap_err());
        assert!(
            e.contains("no-such-results") && e.contains("run a suite first"),
            "{e}"
        );
    }

    fn write(dir: &Path, name: &str, v: &Value) {
        fs::write(dir.join(name), serde_json::to_vec_pretty(v).unwrap()).unwrap();
    }

    /// A results directory, a report and plots under one temporary directory.
    fn setup() -> (tempfile::TempDir, PathBuf, ReportArgs) {
        let tmp = tempfile::tempdir().unwrap();
        let results = tmp.path().join("results");
        fs::create_dir_all(&results).unwrap();
        let args = ReportArgs {
            report_file: tmp.path().join("REPORT.md"),
            plots_dir: tmp.path().join("plots"),
        };
        (tmp, results, args)
    }

    fn svg(args: &ReportArgs, name: &str) -> String {
        let s = fs::read_to_string(args.plots_dir.join(name)).unwrap();
        assert!(
            s.starts_with("<svg") && s.len() > 1000,
            "{name}: {:.100}",
            s
        );
        s
    }

    #[test]
    fn report_without_recovery_says_so_and_plots_the_rest() {
        let (_tmp, results, args) = setup();
        write(
            &results,
            "train-2026-11-23.json",
            &train_json("2026-11-23T02:37:21Z"),
        );
        write(
            &results,
            "train-2026-11-20.json",
            &train_json("2026-11-20T02:37:21Z"),
        );
        write(
            &results,
            "ckpt-2026-11-23.json",
            &ckpt_json("2026-11-23T03:00:00Z", true),
        );
        fs::write(results.join("broken.json"), "{ not json").unwrap();
        fs::write(results.join("notes.txt"), "not a result").unwrap();
        fs::create_dir_all(&args.plots_dir).unwrap();
        fs::write(args.plots_dir.join("recovery.svg"), "<svg>stale</svg>").unwrap();

        let (md, measured) = write_report(&results, &args).unwrap();
        assert_eq!(measured, ["train", "ckpt"]);
        assert_eq!(fs::read_to_string(&args.report_file).unwrap(), md);
        assert!(md.contains("[`results/train-2026-11-23.json`](results/train-2026-11-23.json)"));
        assert!(!md.contains("train-2026-11-20.json"), "{md}");
        assert!(
            md.contains("commit `abc123def456`; measured 2026-11-23T02:37:21Z"),
            "{md}"
        );
        assert!(md.contains("Not measured: no usable `recovery` result file in `results`"));
        assert!(
            md.contains("- `results/broken.json`: not valid JSON"),
            "{md}"
        );
        assert!(!md.contains("notes.txt"));
        assert!(md.contains("| 64 MiB | 2 | 10.0 | 200.0 | 0.050 |"), "{md}");
        for plot in [
            "train_tokens_per_s",
            "ckpt_stall",
            "ckpt_persist",
            "ckpt_restore",
            "ckpt_vs_pytorch",
        ] {
            assert!(
                md.contains(&format!("](plots/{plot}.svg)")),
                "{plot} not linked"
            );
        }
        assert!(svg(&args, "train_tokens_per_s.svg").contains("d6 (0.44M params)"));
        let persist = svg(&args, "ckpt_persist.svg");
        assert!(persist.contains("raw write + fsync") && persist.contains("Lazarus persist"));
        let peer = svg(&args, "ckpt_vs_pytorch.svg");
        for name in [
            "DCP async_save blocking",
            "torch.save + fsync",
            "Lazarus, 2 shards",
        ] {
            assert!(peer.contains(name), "peer plot lacks {name}");
        }
        assert!(
            !args.plots_dir.join("recovery.svg").exists(),
            "stale plot kept"
        );
    }

    #[test]
    fn report_with_only_recovery_and_an_old_ckpt_file() {
        let (_tmp, results, args) = setup();
        write(
            &results,
            "recovery-2026-11-24.json",
            &recovery_json("2026-11-24T00:00:00Z"),
        );
        write(
            &results,
            "ckpt-old.json",
            &ckpt_json("2026-11-01T00:00:00Z", false),
        );
        let (md, measured) = write_report(&results, &args).unwrap();
        assert_eq!(measured, ["ckpt", "recovery"]);
        assert!(
            md.contains("Not measured: no usable `train` result file"),
            "{md}"
        );
        assert!(
            md.contains("Not measured: the result file predates the PyTorch peer."),
            "{md}"
        );
        assert!(md.contains("| d2 | 4 | 0.44M | 10 | 17 | 3000 | 800 | 120 | 40 | 3960 | 7 |"));
        let rec = svg(&args, "recovery.svg");
        for name in [
            "detection",
            "restart",
            "restore",
            "d2, 4 ranks, kill at 17",
            "kill at 25",
        ] {
            assert!(rec.contains(name), "recovery plot lacks {name}");
        }
        assert!(!args.plots_dir.join("ckpt_vs_pytorch.svg").exists());
    }

    #[test]
    fn an_empty_results_directory_gives_a_report_of_not_measured() {
        let (_tmp, results, args) = setup();
        let (md, measured) = write_report(&results, &args).unwrap();
        assert!(measured.is_empty());
        assert_eq!(md.matches("Not measured: no usable").count(), 3, "{md}");
    }

    fn gpu_json(date: &str, measured: bool) -> Value {
        let row = |run: &str, tps: f64| {
            json!({"run": run, "model": "d12", "params": 124475904, "dtype": "f32", "batch": 8,
                   "seq": 1024, "warmup": 5, "steps": 20, "ms_per_step_median": 8192.0 / tps * 1e3,
                   "tokens_per_s": tps, "mfu": 0.25, "stats_tokens_per_s": null, "stats_mfu": null,
                   "ckpt_stall_ms_median": null, "ckpt_stall_ms_max": null,
                   "step_with_stall_ms_median": null, "slowdown_vs_no_saves": null,
                   "vs_pytorch": null})
        };
        let mut m = machine(date);
        m["gpu"] = json!("NVIDIA H100 80GB HBM3");
        m["gpus"] = json!([{"index": 0, "name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15",
                            "memory_mib": 81559}]);
        let mut v = json!({"suite": "gpu", "machine": m, "status": "skipped",
                           "skip_reason": "nvidia-smi not found (no NVIDIA driver on this machine)",
                           "lazarus": null, "runtime_s": 0.0, "flops_per_token": null,
                           "peak_tflops": null, "peak_source": null, "rows": [], "curve": null,
                           "peer": null});
        if measured {
            v["status"] = json!("measured");
            v["skip_reason"] = json!(null);
            v["peak_source"] = json!("dense bf16 peak of NVIDIA H100 80GB HBM3: 989.4 TFLOP/s");
            v["rows"] = json!([row("lazarus", 30000.0), row("pytorch", 300000.0)]);
            v["rows"][0]["vs_pytorch"] = json!(0.1);
            v["curve"] = json!({"model": "d2", "batch": 8, "seq": 128, "steps": 3,
                                "cpu_losses": [5.0, 4.0, 3.0], "cuda_losses": [5.0, 4.0, 3.0001],
                                "max_rel_diff": 3.3e-5, "max_rel_diff_step": 3,
                                "last_rel_diff": 3.3e-5, "rtol": 1e-3, "within_tolerance": true,
                                "tolerance": "f32"});
            v["peer"] = json!({"status": "skipped", "reason": "--no-peer", "python": null,
                               "torch_version": null, "output": null});
        }
        v
    }

    #[test]
    fn the_gpu_section_shows_the_newest_measurement_or_the_skip() {
        let (_tmp, results, args) = setup();
        let (md, _) = write_report(&results, &args).unwrap();
        assert!(!md.contains("## GPU"), "no gpu result, no section: {md}");

        write(
            &results,
            "gpu-2026-11-20.json",
            &gpu_json("2026-11-20T00:00:00Z", false),
        );
        let (md, measured) = write_report(&results, &args).unwrap();
        assert!(measured.is_empty());
        assert!(
            md.contains("## GPU (`gpu`)\n\nNot measured: the newest `gpu` result")
                && md.contains("was skipped: nvidia-smi not found"),
            "{md}"
        );
        assert!(!md.contains("Files not used"), "a skip file is used: {md}");

        write(
            &results,
            "gpu-2026-11-21.json",
            &gpu_json("2026-11-21T00:00:00Z", true),
        );
        // A later skip on a machine without a GPU does not hide the measurement.
        write(
            &results,
            "gpu-2026-11-22.json",
            &gpu_json("2026-11-22T00:00:00Z", false),
        );
        let (md, measured) = write_report(&results, &args).unwrap();
        assert_eq!(measured, ["gpu"]);
        assert!(md.contains("results/gpu-2026-11-21.json"), "{md}");
        assert!(md.contains("GPU: NVIDIA H100 80GB HBM3, 81559 MiB, driver 550.54.15."));
        assert!(md.contains("| lazarus | f32 | 124.48M | 8x1024 |"), "{md}");
        assert!(md.contains("| 25.0% | - | - | - | 0.10 |"), "{md}");
        assert!(
            md.contains("d2 loss curve, CPU vs CUDA (f32), 3 steps of 8x128"),
            "{md}"
        );
        assert!(md.contains("PyTorch peer skipped: --no-peer."), "{md}");

        let mut v = gpu_json("2026-11-21T00:00:00Z", true);
        v["rows"] = json!([]);
        assert!(
            err(&v).contains("the `gpu` result has no rows"),
            "{}",
            err(&v)
        );
    }

    #[test]
    fn links_are_relative_inside_the_report_directory() {
        assert_eq!(
            link(Path::new("bench"), Path::new("bench/plots/a.svg")),
            "plots/a.svg"
        );
        assert_eq!(
            link(Path::new("./bench"), Path::new("bench/results")),
            "results"
        );
        assert_eq!(
            link(Path::new("/x/bench"), Path::new("/y/r.json")),
            "/y/r.json"
        );
    }
}
