//! Live stats: with `--stats-interval-s 1` a log line and a metrics.jsonl record appear every
//! second with throughput, step time, host memory and MFU (and GPU fields where NVML is found).

use super::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn stats_records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "stats")
        .collect()
}

#[test]
fn stats_lines_and_records_come_at_the_set_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 100_000);
    let dir = tmp.path().join("run");
    let log = tmp.path().join("stdout.txt");
    let mut child = lazarus()
        .args(TINY_TRAIN)
        .args([
            "--steps",
            "1000000",
            "--log-every",
            "1000000",
            "--save-every",
            "0",
        ])
        .args(["--stats-interval-s", "1", "--peak-tflops", "2"])
        .args([
            "--data",
            data.to_str().unwrap(),
            "--run-dir",
            dir.to_str().unwrap(),
        ])
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while stats_records(&dir).len() < 4 {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "no 4 stats records in 180 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "training ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    let recs = stats_records(&dir);
    let stdout = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("stats |"))
        .collect();
    assert_eq!(lines.len(), recs.len(), "{stdout}");
    assert!(
        lines[0].contains("tok/s") && lines[0].contains("mfu"),
        "{stdout}"
    );
    let mut last_ms = None;
    let mut last_step = 0;
    for r in &recs {
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
        assert!(f("interval_s") >= 1.0, "{r}");
        let ms = r["time_unix_ms"].as_u64().unwrap();
        if let Some(prev) = last_ms {
            // Records are at least the interval apart (allowing for wall-clock jitter).
            assert!(ms >= prev + 950, "{prev} then {ms}");
        }
        last_ms = Some(ms);
        let step = r["step"].as_u64().unwrap();
        assert!(step > last_step, "{r}");
        last_step = step;
        // 4 sequences of 16 tokens per step.
        assert!((f("tokens_per_s") - 16.0 * f("samples_per_s")).abs() < 1e-6 * f("tokens_per_s"));
        let steps = r["steps"].as_u64().unwrap() as f64;
        assert!(
            (f("step_ms") * steps - 1e3 * f("interval_s")).abs() < 1e-3,
            "{r}"
        );
        assert!(
            (f("samples_per_s") * f("interval_s") - 4.0 * steps).abs() < 1e-6,
            "{r}"
        );
        assert!(f("host_rss_bytes") > 0.0 && f("host_rss_peak_bytes") >= f("host_rss_bytes"));
        assert!((f("mfu") - f("model_tflops") / 2.0).abs() < 1e-12, "{r}");
        match r.get("gpu_mem_total_bytes") {
            None => assert!(r.get("gpu_util_pct").is_none(), "{r}"),
            Some(total) => {
                assert!(r["gpu_mem_used_bytes"].as_u64() <= total.as_u64(), "{r}");
                assert!(r["gpu_util_pct"].as_u64().unwrap() <= 100, "{r}");
            }
        }
    }
    // Step records still read as before, next to the stats.
    let o = run(&["status", dir.to_str().unwrap(), "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(s["loss"].as_f64().is_some(), "{s}");
}

/// A stand-in for libnvidia-ml with the six functions Lazarus calls and fixed readings.
const FAKE_NVML_C: &str = r#"
typedef struct { unsigned long long total, free, used; } mem_t;
typedef struct { unsigned int gpu, memory; } util_t;
static int dev;
int nvmlInit_v2(void) { return 0; }
int nvmlShutdown(void) { return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int i, void **d) { *d = &dev; return i == 0 ? 0 : 2; }
int nvmlDeviceGetMemoryInfo(void *d, mem_t *m) {
    m->total = 80ULL << 30; m->used = 3ULL << 30; m->free = m->total - m->used; return 0;
}
int nvmlDeviceGetUtilizationRates(void *d, util_t *u) { u->gpu = 42; u->memory = 7; return 0; }
int nvmlDeviceGetName(void *d, char *name, unsigned int n) {
    const char *s = "Fake GPU"; unsigned int i = 0;
    for (; s[i] && i + 1 < n; i++) name[i] = s[i];
    name[i] = 0; return 0;
}
"#;

#[test]
fn gpu_fields_come_from_nvml_when_it_can_be_opened() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("nvml.c");
    std::fs::write(&src, FAKE_NVML_C).unwrap();
    let lib = tmp.path().join("libnvidia-ml.so.1");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status();
    if !built.is_ok_and(|s| s.success()) {
        eprintln!("no C compiler: the NVML stand-in cannot be built, test skipped");
        return;
    }
    let data = synth_data(tmp.path(), 50_000);
    let dir = tmp.path().join("run");
    let log = tmp.path().join("stdout.txt");
    let mut child = lazarus()
        .args(TINY_TRAIN)
        .args([
            "--steps",
            "1000000",
            "--log-every",
            "1000000",
            "--save-every",
            "0",
        ])
        .args(["--stats-interval-s", "1"])
        .args([
            "--data",
            data.to_str().unwrap(),
            "--run-dir",
            dir.to_str().unwrap(),
        ])
        .env("LD_LIBRARY_PATH", tmp.path())
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while stats_records(&dir).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no stats record");
        assert!(child.try_wait().unwrap().is_none(), "training ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    let r = &stats_records(&dir)[0];
    assert_eq!(r["gpu_name"], "Fake GPU", "{r}");
    assert_eq!(r["gpu_index"], 0);
    assert_eq!(r["gpu_mem_used_bytes"].as_u64(), Some(3 << 30));
    assert_eq!(r["gpu_mem_total_bytes"].as_u64(), Some(80 << 30));
    assert_eq!(r["gpu_util_pct"], 42);
    // The GPU does not train (the CPU backend does), so its peak is no MFU denominator.
    assert!(r.get("mfu").is_none(), "{r}");
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(
        out.contains("live stats include GPU 0 (Fake GPU) through NVML"),
        "{out}"
    );
    assert!(out.contains("gpu 0: 3.0/80.0 GiB, util 42%"), "{out}");
}
