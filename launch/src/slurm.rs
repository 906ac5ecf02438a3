//! SLURM: the task's place in the job from srun's environment, and `lazarus sbatch`, which
//! prints a batch script for a preemptible partition.

use anyhow::{bail, Result};
use lazarus_trainer::run::JobInfo;
use std::path::PathBuf;

/// What srun tells a task about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmTask {
    pub job_id: String,
    /// SLURM_PROCID: the global rank.
    pub rank: usize,
    /// SLURM_NTASKS: the world size.
    pub world_size: usize,
    /// SLURM_LOCALID: the rank on this node (the GPU it uses).
    pub local_rank: usize,
    /// SLURM_RESTART_COUNT: how often the job was requeued (0 when unset).
    pub restart_count: u64,
}

impl SlurmTask {
    /// Reads the task from `get` (the environment in production); `None` outside a SLURM job.
    /// A variable that is set but malformed is an error rather than a silent rank 0.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(job_id) = get("SLURM_JOB_ID") else {
            return Ok(None);
        };
        let num = |name: &str, default: Option<u64>| -> Result<u64> {
            match get(name) {
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
                None => default.ok_or_else(|| {
                    anyhow::anyhow!(
                        "{name} is not set inside SLURM job {job_id}: run the ranks with srun"
                    )
                }),
            }
        };
        // A batch script itself (outside srun) has SLURM_JOB_ID but no SLURM_PROCID: one task.
        let in_step = get("SLURM_PROCID").is_some();
        let d = |v: u64| if in_step { None } else { Some(v) };
        let task = SlurmTask {
            rank: num("SLURM_PROCID", d(0))? as usize,
            world_size: num("SLURM_NTASKS", d(1))? as usize,
            local_rank: num("SLURM_LOCALID", d(0))? as usize,
            restart_count: num("SLURM_RESTART_COUNT", Some(0))?,
            job_id,
        };
        if task.world_size == 0 || task.rank >= task.world_size {
            bail!(
                "SLURM_PROCID {} is not below SLURM_NTASKS {}",
                task.rank,
                task.world_size
            );
        }
        Ok(Some(task))
    }

    /// From the process environment.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The part recorded in `training_state.json`.
    pub fn job(&self) -> JobInfo {
        JobInfo {
            job_id: self.job_id.clone(),
            restart_count: self.restart_count,
        }
    }
}

/// Flags of `lazarus sbatch`.
#[derive(Debug, Clone, clap::Args)]
pub struct SbatchArgs {
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// GPUs (and ranks) per node; 0 for a CPU job.
    #[arg(long, default_value_t = 4)]
    pub gpus_per_node: usize,
    /// Ranks per node for a CPU job (--gpus-per-node 0).
    #[arg(long, default_value_t = 1)]
    pub tasks_per_node: usize,
    #[arg(long)]
    pub partition: Option<String>,
    /// Time limit, in SLURM's format (e.g. 04:00:00).
    #[arg(long)]
    pub time: Option<String>,
    #[arg(long, default_value = "lazarus")]
    pub job_name: String,
    /// Seconds of warning before the end: SLURM sends USR1 this long before the time limit.
    #[arg(long, default_value_t = 120)]
    pub signal_before_s: u64,
    /// Requeues at most this often before giving up.
    #[arg(long, default_value_t = 50)]
    pub requeue_max: u64,
    /// The lazarus binary the job runs (default: this one).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Run more ranks than the node has CPUs (`#SBATCH --overcommit`), e.g. a CPU test job;
    /// MPI ranks then yield the CPU while they wait instead of spinning.
    #[arg(long)]
    pub overcommit: bool,
    /// Extra srun flags, e.g. `--mpi=pmix` for `--comm mpi`.
    #[arg(long, allow_hyphen_values = true)]
    pub srun_flags: Option<String>,
    /// The `train ...` command line the ranks run.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Where a `train ...` command line trains: its run directory and the marker that says it is
/// done (the run's, or with `--stage NAME` that stage's). The command line is parsed by the
/// real parser and its config file read, so `--run-dir` may come from either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainTarget {
    pub run_dir: PathBuf,
    pub complete_marker: PathBuf,
    /// How the ranks talk (`--comm`).
    pub comm: crate::cli::CommArg,
}

impl TrainTarget {
    pub fn of(cmd: &[String]) -> Result<Self> {
        use clap::Parser;
        if cmd.first().map(String::as_str) != Some("train") {
            bail!("the command after `--` must be a `train ...` command line");
        }
        let cli = crate::cli::Cli::try_parse_from(
            std::iter::once("lazarus").chain(cmd.iter().map(String::as_str)),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "the train command after `--` does not parse: {}",
                e.render().to_string().trim()
            )
        })?;
        let crate::cli::Command::Train(args) = cli.command else {
            bail!("the command after `--` must be a `train ...` command line");
        };
        let cfg = crate::train_cmd::resolve(&args)?;
        let done_dir = match &args.stage {
            Some(name) => {
                let i = cfg
                    .stages
                    .iter()
                    .position(|s| &s.name == name)
                    .ok_or_else(|| {
                        anyhow::anyhow!("--stage {name}: the config has no stage of that name")
                    })?;
                lazarus_trainer::stages::stage_dir(&cfg, i)
            }
            None => cfg.run_dir.clone(),
        };
        Ok(TrainTarget {
            complete_marker: done_dir.join(lazarus_trainer::train::files::COMPLETE),
            run_dir: cfg.run_dir,
            comm: args.comm,
        })
    }
}

/// The batch script for `args`.
pub fn script(args: &SbatchArgs, binary: &str) -> Result<String> {
    let target = TrainTarget::of(&args.command)?;
    let run_dir = target.run_dir.display().to_string();
    let tasks = if args.gpus_per_node > 0 {
        args.gpus_per_node
    } else {
        args.tasks_per_node
    };
    let mut s = String::from("#!/bin/bash\n");
    let mut opt = |k: &str, v: String| s.push_str(&format!("#SBATCH --{k}={v}\n"));
    opt("job-name", args.job_name.clone());
    opt("nodes", args.nodes.to_string());
    if args.overcommit {
        // SLURM refuses --ntasks-per-node above the node's CPUs even with --overcommit; a
        // total task count is accepted.
        opt("ntasks", (tasks * args.nodes).to_string());
    } else {
        opt("ntasks-per-node", tasks.to_string());
    }
    if args.gpus_per_node > 0 {
        opt("gpus-per-node", args.gpus_per_node.to_string());
    }
    if let Some(p) = &args.partition {
        opt("partition", p.clone());
    }
    if let Some(t) = &args.time {
        opt("time", t.clone());
    }
    opt("signal", format!("B:USR1@{}", args.signal_before_s));
    opt("output", format!("{run_dir}/slurm-%j.out"));
    s.push_str("#SBATCH --requeue\n#SBATCH --open-mode=append\n");
    if args.overcommit {
        s.push_str("#SBATCH --overcommit\n");
    }
    s.push('\n');
    let train: Vec<String> = args.command.iter().map(|a| quote(a)).collect();
    let srun_flags = args.srun_flags.clone().unwrap_or_default();
    s.push_str(&format!(
        r#"# Written by `lazarus sbatch`. Preemption: SLURM signals this script (USR1 before the time
# limit, TERM on preemption); the trap forwards the signal to the ranks, which stop at the same
# step with a committed checkpoint and exit 0; the job is then requeued and resumes from it.
set -u
RUN_DIR={run_dir}
LAZARUS={binary}
mkdir -p "$RUN_DIR"
{yield_idle}echo "lazarus: job $SLURM_JOB_ID, restart ${{SLURM_RESTART_COUNT:-0}}, on $(hostname) at $(date -u +%FT%TZ)"

forward() {{
  echo "lazarus: caught $1, forwarding it to the ranks"
  kill -s "$1" "$SRUN_PID" 2>/dev/null
}}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun --kill-on-bad-exit=1 {srun_flags} "$LAZARUS" {train} &
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives; wait again until srun has really ended.
while :; do
  wait "$SRUN_PID"
  RC=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done

if [ -f {complete} ]; then
  echo "lazarus: training complete"
  exit 0
fi
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge {requeue_max} ]; then
  echo "lazarus: not complete after {requeue_max} requeues (last exit code $RC); giving up"
  exit 1
fi
echo "lazarus: not complete (exit code $RC); requeueing job $SLURM_JOB_ID"
scontrol requeue "$SLURM_JOB_ID"
exit 0
"#,
        run_dir = quote(&run_dir),
        binary = quote(binary),
        srun_flags = srun_flags,
        train = train.join(" "),
        requeue_max = args.requeue_max,
        complete = quote(&target.complete_marker.display().to_string()),
        yield_idle = if args.overcommit {
            "# More ranks than CPUs: Open MPI's busy-polling would starve the ranks that compute.\n\
             export OMPI_MCA_mpi_yield_when_idle=1\n"
        } else {
            ""
        },
    ));
    Ok(s)
}

/// Runs `lazarus sbatch`: prints the script.
pub fn sbatch(args: &SbatchArgs) -> Result<()> {
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()?,
    };
    let text = script(args, &binary.to_string_lossy())?;
    // SLURM opens the --output file inside the run directory before the script runs.
    let run_dir = TrainTarget::of(&args.command)?.run_dir;
    std::fs::create_dir_all(&run_dir).map_err(|e| {
        anyhow::anyhow!(
            "creating the run directory {} for the job's output: {e}",
            run_dir.display()
        )
    })?;
    print!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn task_comes_from_srun_variables() {
        assert_eq!(SlurmTask::from_vars(vars(&[])).unwrap(), None);
        let t = SlurmTask::from_vars(vars(&[
            ("SLURM_JOB_ID", "77"),
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_RESTART_COUNT", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (t.rank, t.world_size, t.local_rank, t.restart_count),
            (5, 8, 1, 2)
        );
        let batch = SlurmTask::from_vars(vars(&[("SLURM_JOB_ID", "77")]))
            .unwrap()
            .unwrap();
        assert_eq!((batch.rank, batch.world_size), (0, 1));
        assert!(SlurmTask::from_vars(vars(&[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_PROCID", "x"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0")
        ]))
        .is_err());
        assert!(SlurmTask::from_vars(vars(&[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0")
        ]))
        .is_err());
    }

    fn cmd(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn train_target_reads_flags_the_config_file_and_the_stage() {
        let t = TrainTarget::of(&cmd(&["train", "--run-dir", "runs/a"])).unwrap();
        assert_eq!(t.run_dir, PathBuf::from("runs/a"));
        assert_eq!(
            t.complete_marker,
            PathBuf::from("runs/a/training_complete.marker")
        );
        let tmp = tempfile::tempdir().unwrap();
        let conf = tmp.path().join("c.toml");
        std::fs::write(
            &conf,
            "model = \"d2\"\nrun_dir = \"runs/from-file\"\n\
             [[stages]]\nname = \"short\"\nsteps = 5\nseq = 16\n\
             [[stages]]\nname = \"long\"\nsteps = 5\nseq = 32\n",
        )
        .unwrap();
        let c = conf.to_str().unwrap();
        let t = TrainTarget::of(&cmd(&["train", "--config", c])).unwrap();
        assert_eq!(t.run_dir, PathBuf::from("runs/from-file"));
        let t = TrainTarget::of(&cmd(&["train", "--config", c, "--stage", "long"])).unwrap();
        assert_eq!(
            t.complete_marker,
            PathBuf::from("runs/from-file/stages/long/training_complete.marker")
        );
        let e = TrainTarget::of(&cmd(&["train", "--config", c, "--stage", "nope"])).unwrap_err();
        assert!(e.to_string().contains("no stage"), "{e}");
        let e = TrainTarget::of(&cmd(&["train", "--steps", "many"])).unwrap_err();
        assert!(e.to_string().contains("does not parse"), "{e}");
        assert!(TrainTarget::of(&cmd(&["sample"])).is_err());
    }

    #[test]
    fn script_has_the_preemption_pieces() {
        let a = SbatchArgs {
            nodes: 2,
            gpus_per_node: 4,
            tasks_per_node: 1,
            partition: Some("preempt".into()),
            time: Some("04:00:00".into()),
            job_name: "gpt".into(),
            signal_before_s: 90,
            requeue_max: 7,
            binary: None,
            overcommit: false,
            srun_flags: None,
            command: ["train", "--model", "d12", "--run-dir", "runs/my run"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        let s = script(&a, "/opt/lazarus").unwrap();
        for want in [
            "--requeue",
            "--open-mode=append",
            "--signal=B:USR1@90",
            "--nodes=2",
            "--gpus-per-node=4",
            "--ntasks-per-node=4",
            "srun --kill-on-bad-exit=1",
            "scontrol requeue",
            "trap 'forward USR1' USR1",
            "RUN_DIR='runs/my run'",
            "-ge 7",
            "&\nSRUN_PID=$!",
        ] {
            assert!(s.contains(want), "missing {want:?} in:\n{s}");
        }
        assert!(!s.contains("--overcommit") && !s.contains("yield_when_idle"));
        let over = script(
            &SbatchArgs {
                overcommit: true,
                gpus_per_node: 0,
                tasks_per_node: 4,
                ..a.clone()
            },
            "/opt/lazarus",
        )
        .unwrap();
        for want in [
            "#SBATCH --overcommit",
            "--ntasks=8",
            "export OMPI_MCA_mpi_yield_when_idle=1",
        ] {
            assert!(over.contains(want), "missing {want:?} in:\n{over}");
        }
        assert!(!over.contains("--gpus-per-node"));
        let bad = SbatchArgs {
            command: vec!["sample".into()],
            ..a
        };
        assert!(script(&bad, "x").is_err());
    }
}
