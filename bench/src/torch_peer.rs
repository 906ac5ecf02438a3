//! The PyTorch peer of the ckpt suite: finds a Python that imports torch, runs
//! `bench/peers/torch_ckpt_peer.py` (embedded in the binary) and reads its JSON.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The peer script, written next to the scratch data before each run so the binary works from
/// any directory.
const SCRIPT: &str = include_str!("../peers/torch_ckpt_peer.py");
const SCRIPT_NAME: &str = "torch_ckpt_peer.py";
/// Environment variable naming the Python to use when `--torch-python` is not given.
pub const PYTHON_ENV: &str = "LAZARUS_BENCH_PYTHON";
pub const PYTHON_DEFAULT: &str = "python3";
/// Longest wait for `python -c "import torch"`.
const PROBE_TIMEOUT_S_MAX: u64 = 120;
/// Longest wait for one run of the peer script at one size.
const RUN_TIMEOUT_S_MAX: u64 = 1800;
const POLL_MS: u64 = 20;

/// The Python to run: `--torch-python`, else `$LAZARUS_BENCH_PYTHON`, else `python3`.
pub fn resolve_python(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os(PYTHON_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(PYTHON_DEFAULT))
}

/// Medians (and the first, cold, run) of one save method, in ms.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaveTimes {
    pub cold_blocking_ms: f64,
    pub cold_durable_ms: f64,
    pub blocking_ms: f64,
    pub durable_ms: f64,
}

/// DCP load times in ms.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadTimes {
    pub cold_ms: f64,
    pub ms: f64,
    /// Whether the page cache was dropped before every load.
    pub cold_cache: bool,
}

/// What the peer script prints (the per-repetition samples are dropped here).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerOutput {
    pub torch_version: String,
    pub ranks: usize,
    pub elems_per_array: usize,
    pub state_bytes: u64,
    pub reps: usize,
    pub torch_save_measures: String,
    pub dcp_measures: String,
    pub torch_save: SaveTimes,
    pub dcp_save: SaveTimes,
    pub dcp_async_save: SaveTimes,
    pub dcp_load: LoadTimes,
    pub runtime_s: f64,
}

/// A Python known to import torch.
#[derive(Debug, Clone)]
pub struct TorchPeer {
    pub python: PathBuf,
    pub torch_version: String,
}

/// Reads a child's pipe to the end on a thread of its own, so a full pipe never blocks it.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            // A read error leaves what was read; the exit status tells whether the run worked.
            let _ = p.read_to_string(&mut s);
        }
        s
    })
}

/// What a finished child left: whether it exited 0, its stdout and its stderr (empty when
/// not piped).
struct Finished {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Waits for `child` at most `limit`, then kills its process group.
fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> Result<Finished> {
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break status;
        }
        if t0.elapsed() > limit {
            // SAFETY: kill(2) with the negated pid of the process group we created for the
            // child (`process_group(0)`); it touches no memory of this process.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            bail!(
                "{what} did not finish within {} s and was killed",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    };
    let join = |h: std::thread::JoinHandle<String>| h.join().unwrap_or_default();
    Ok(Finished {
        ok: status.success(),
        stdout: join(out),
        stderr: join(err),
    })
}

/// Checks that `python -c "import torch"` works; the error says why not, in one line.
pub fn probe(python: &Path) -> std::result::Result<TorchPeer, String> {
    let what = format!("`{} -c \"import torch\"`", python.display());
    let child = Command::new(python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{what} could not start: {e}"))?;
    let f = wait_bounded(child, Duration::from_secs(PROBE_TIMEOUT_S_MAX), &what)
        .map_err(|e| format!("{e:#}"))?;
    if !f.ok {
        let last = f.stderr.lines().rev().find(|l| !l.trim().is_empty());
        return Err(format!(
            "{what} failed: {}",
            last.unwrap_or("no message").trim()
        ));
    }
    Ok(TorchPeer {
        python: python.to_path_buf(),
        torch_version: f.stdout.trim().to_string(),
    })
}

/// Parses the peer's stdout: the last non-empty line is its JSON object.
pub fn parse_output(stdout: &str) -> Result<PeerOutput> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("the PyTorch peer printed nothing on stdout")?;
    serde_json::from_str(line).with_context(|| {
        format!("the PyTorch peer's last line is not the expected JSON object: {line:.200}")
    })
}

impl TorchPeer {
    /// Runs the peer for arrays of `elems_per_array` f32 elements on `ranks` gloo ranks, with
    /// its scratch files in `dir`; its progress goes to our stderr.
    pub fn run(
        &self,
        elems_per_array: usize,
        ranks: usize,
        reps: usize,
        dir: &Path,
    ) -> Result<PeerOutput> {
        let script = dir.join(SCRIPT_NAME);
        std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
        let what = format!("the PyTorch peer ({})", self.python.display());
        let child = Command::new(&self.python)
            .arg(&script)
            .args(["--elems-per-array", &elems_per_array.to_string()])
            .args(["--ranks", &ranks.to_string()])
            .args(["--reps", &reps.to_string()])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let f = wait_bounded(child, Duration::from_secs(RUN_TIMEOUT_S_MAX), &what)?;
        ensure!(f.ok, "{what} failed (its stderr is above)");
        let peer = parse_output(&f.stdout)?;
        ensure!(
            peer.elems_per_array == elems_per_array && peer.ranks == ranks,
            "{what} measured {} elements on {} ranks, not {elems_per_array} on {ranks}",
            peer.elems_per_array,
            peer.ranks
        );
        Ok(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"peer": "pytorch", "torch_version": "2.15.0", "python_version": "3.11.7",
 "ranks": 2, "elems_per_array": 10, "state_bytes": 120, "reps": 1,
 "torch_save_measures": "one process", "dcp_measures": "2 gloo ranks",
 "torch_save": {"cold_blocking_ms": 3.0, "cold_durable_ms": 4.0, "blocking_ms": 1.0, "durable_ms": 2.0, "samples": []},
 "dcp_save": {"cold_blocking_ms": 3.0, "cold_durable_ms": 4.0, "blocking_ms": 5.0, "durable_ms": 6.0, "samples": []},
 "dcp_async_save": {"cold_blocking_ms": 3.0, "cold_durable_ms": 4.0, "blocking_ms": 7.0, "durable_ms": 8.0, "samples": []},
 "dcp_load": {"cold_ms": 1.0, "ms": 9.0, "samples": [], "cold_cache": true}, "runtime_s": 1.5}"#;

    #[test]
    fn output_is_the_last_line() {
        let text = format!("some warning\n{}\n\n", SAMPLE.replace('\n', ""));
        let p = parse_output(&text).unwrap();
        assert_eq!(p.ranks, 2);
        assert_eq!(p.dcp_async_save.blocking_ms, 7.0);
        assert_eq!(p.dcp_load.ms, 9.0);
        assert!(p.dcp_load.cold_cache);
    }

    #[test]
    fn bad_output_is_a_clear_error() {
        let e = parse_output("").unwrap_err();
        assert!(format!("{e:#}").contains("printed nothing"), "{e:#}");
        let e = parse_output("Traceback (most recent call last):\n  boom").unwrap_err();
        assert!(format!("{e:#}").contains("not the expected JSON"), "{e:#}");
        let e = parse_output(r#"{"torch_version": "2"}"#).unwrap_err();
        assert!(format!("{e:#}").contains("missing field"), "{e:#}");
    }

    #[test]
    fn a_missing_python_is_a_reason_not_a_panic() {
        let r = probe(Path::new("/nonexistent/python-for-lazarus-bench")).unwrap_err();
        assert!(r.contains("could not start"), "{r}");
        // A Python that runs but fails the import gives the last line of its stderr.
        let r = probe(Path::new("false")).unwrap_err();
        assert!(r.contains("failed"), "{r}");
    }

    #[test]
    fn the_flag_wins_over_the_default() {
        assert_eq!(
            resolve_python(Some(Path::new("/opt/py/bin/python"))),
            PathBuf::from("/opt/py/bin/python")
        );
    }

    #[test]
    fn the_embedded_script_is_the_peer() {
        assert!(SCRIPT.contains("async_save"));
        assert!(SCRIPT.contains("def main"));
    }
}
