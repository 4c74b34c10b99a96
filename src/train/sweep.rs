//! `umtune sweep`: a grid of config overrides times seeds, expanded into runs named after their
//! values (`lr=3e-4,seed=2`) under one directory, with the plan in `sweep.json`. Each run is
//! `umtune sweep-task PLAN --task I` — an ordinary training run with `--resume auto`, so a
//! finished run is skipped and an interrupted one continues — started one after another or K at
//! a time (`--local`), or as one SLURM job array whose task id picks the grid point (`--slurm`:
//! the sbatch script asks for SIGUSR1 before the time limit and requeues the task, which then
//! resumes). `umtune report SWEEP_DIR` groups the runs by grid point.
use crate::atomic_file::write_atomic;
use crate::config::{Config, OverrideArgs};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const PLAN_FILE: &str = "sweep.json";
pub const SBATCH_FILE: &str = "sweep.sbatch";
const FORMAT: &str = "umtune-sweep/1";

/// One `--grid KEY=V1,V2,...`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Axis {
    pub key: String,
    pub values: Vec<String>,
}

/// One run of the sweep.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SweepRun {
    /// The run directory's name: `lr=3e-4,seed=2`.
    pub name: String,
    /// The grid point: key -> value.
    pub point: BTreeMap<String, String>,
    pub seed: u64,
}

/// `sweep.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SweepPlan {
    pub format: String,
    /// The config every run starts from (absolute).
    pub config: PathBuf,
    /// `--set` overrides every run gets (before the grid's).
    pub sets: Vec<String>,
    pub grid: Vec<Axis>,
    pub seeds: Vec<u64>,
    pub runs: Vec<SweepRun>,
}

impl SweepPlan {
    /// Expands `grid` (`KEY=V1,V2,...` each) times `seeds` (the last axis varies fastest, seeds
    /// last). Every key and value is checked by loading the config with it.
    pub fn new(config: &Path, sets: &[String], grid: &[String], seeds: &[u64]) -> Result<Self> {
        let config = std::path::absolute(config).map_err(|e| Error::io(config, e))?;
        let mut axes = Vec::new();
        for g in grid {
            let (key, values) = g.split_once('=').ok_or_else(|| {
                Error::Config(format!("--grid `{g}` must look like section.key=v1,v2,..."))
            })?;
            let values: Vec<String> = values
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(String::from)
                .collect();
            if values.is_empty() {
                return Err(Error::Config(format!("--grid `{g}`: no values")));
            }
            if key.trim() == "run.seed" {
                return Err(Error::Config("--grid run.seed: use --seeds".into()));
            }
            if let Some(twice) = repeated(&values) {
                // Two runs of one grid point would share a run directory.
                return Err(Error::Config(format!(
                    "--grid `{g}` lists `{twice}` twice: each value once (--seeds repeats runs)"
                )));
            }
            axes.push(Axis {
                key: key.trim().to_string(),
                values,
            });
        }
        if seeds.is_empty() {
            return Err(Error::Config("--seeds: at least one seed".into()));
        }
        if let Some(twice) = repeated(seeds) {
            return Err(Error::Config(format!(
                "--seeds lists {twice} twice: each seed once"
            )));
        }
        let short = short_names(&axes);
        let mut points: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
        for axis in &axes {
            points = points
                .into_iter()
                .flat_map(|p| {
                    axis.values.iter().map(move |v| {
                        let mut p = p.clone();
                        p.insert(axis.key.clone(), v.clone());
                        p
                    })
                })
                .collect();
        }
        let mut runs = Vec::new();
        for point in points {
            for &seed in seeds {
                let mut parts: Vec<String> = axes
                    .iter()
                    .map(|a| format!("{}={}", short[&a.key], name_part(&point[&a.key])))
                    .collect();
                parts.push(format!("seed={seed}"));
                runs.push(SweepRun {
                    name: parts.join(","),
                    point: point.clone(),
                    seed,
                });
            }
        }
        if let Some(twice) = repeated(&runs.iter().map(|r| &r.name).collect::<Vec<_>>()) {
            return Err(Error::Config(format!(
                "two grid points would both be named `{twice}` (values that differ only in `/`): give them distinct values"
            )));
        }
        let plan = SweepPlan {
            format: FORMAT.into(),
            config,
            sets: sets.to_vec(),
            grid: axes,
            seeds: seeds.to_vec(),
            runs,
        };
        // Every grid value is a valid config before anything runs.
        for i in 0..plan.runs.len() {
            plan.config_of(i, Path::new("."))?;
        }
        Ok(plan)
    }

    /// The overrides of run `task` writing under `out`.
    pub fn overrides(&self, task: usize, out: &Path) -> Result<Vec<String>> {
        let run = self.runs.get(task).ok_or_else(|| {
            Error::Config(format!(
                "--task {task}: the sweep has runs 0 to {}",
                self.runs.len().saturating_sub(1)
            ))
        })?;
        let mut o = self.sets.clone();
        o.extend(run.point.iter().map(|(k, v)| format!("{k}={v}")));
        o.push(format!("run.seed={}", run.seed));
        o.push(format!("run.output_dir={}", out.display()));
        o.push(format!("run.name={}", run.name));
        Ok(o)
    }

    /// The resolved config of run `task` writing under `out`.
    pub fn config_of(&self, task: usize, out: &Path) -> Result<Config> {
        let overrides = self.overrides(task, out)?;
        Config::load(Some(&self.config), &overrides).map_err(|e| {
            Error::Config(format!(
                "sweep run {} ({}): {e}",
                task, self.runs[task].name
            ))
        })
    }

    /// Writes `OUT/sweep.json`. A sweep directory holds one plan: running the same plan again
    /// continues it (finished runs are skipped); another plan there is refused, since its runs'
    /// results would be reported as the new plan's.
    pub fn write(&self, out: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let path = out.join(PLAN_FILE);
        if path.is_file() {
            let old = Self::read(&path)?;
            let same = serde_json::to_value(&old).ok() == serde_json::to_value(self).ok();
            if !same {
                return Err(Error::Config(format!(
                    "{} holds another sweep's plan (config, --set, --grid or --seeds differ): use another --out, or remove that directory to start over",
                    path.display()
                )));
            }
        }
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Internal(format!("{PLAN_FILE}: {e}")))?;
        write_atomic(&path, &json)?;
        Ok(path)
    }

    pub fn read(path: &Path) -> Result<SweepPlan> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let plan: SweepPlan =
            serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        if plan.format != FORMAT {
            return Err(Error::format(
                path,
                format!("format `{}`: this umtune reads `{FORMAT}`", plan.format),
            ));
        }
        Ok(plan)
    }
}

/// The first value that occurs twice in `values`.
fn repeated<T: PartialEq + std::fmt::Display>(values: &[T]) -> Option<String> {
    values
        .iter()
        .enumerate()
        .find(|(i, v)| values[..*i].contains(v))
        .map(|(_, v)| v.to_string())
}

/// A grid value as part of a run's directory name: a path's `/` become `_` (a dataset given as
/// a path would otherwise nest the run in directories).
fn name_part(value: &str) -> String {
    value.trim_start_matches('/').replace('/', "_")
}

/// Each key's last segment (`train.lr` -> `lr`), or the whole key where two axes share it.
fn short_names(axes: &[Axis]) -> BTreeMap<String, String> {
    let last = |k: &str| k.rsplit('.').next().unwrap_or(k).to_string();
    axes.iter()
        .map(|a| {
            let s = last(&a.key);
            let clash = axes.iter().filter(|b| last(&b.key) == s).count() > 1;
            (a.key.clone(), if clash { a.key.clone() } else { s })
        })
        .collect()
}

/// `umtune sweep`'s arguments.
#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// TOML experiment config every run starts from.
    pub config: PathBuf,
    /// `section.key=v1,v2,...` (repeatable; the grid is their product).
    #[arg(long)]
    pub grid: Vec<String>,
    /// Seeds, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "42")]
    pub seeds: Vec<u64>,
    /// The sweep's directory (sweep.json, the runs, logs/).
    #[arg(long)]
    pub out: PathBuf,
    /// Overrides every run gets.
    #[command(flatten)]
    pub overrides: OverrideArgs,
    #[arg(long)]
    pub local: bool,
    /// Runs at once with --local.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub parallel: u64,
    #[arg(long)]
    pub slurm: bool,
    /// Print the sbatch script (--slurm) or each run's overrides instead of running.
    #[arg(long)]
    pub dry_run: bool,
    /// GPUs (workers under umtune-launch) per array task, with --slurm.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// `--time` of each array task (HH:MM:SS), with --slurm.
    #[arg(long, default_value = "")]
    pub time: String,
    /// Extra sbatch options, e.g. `--sbatch=--partition=gpu` (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    pub sbatch: Vec<String>,
}

/// Plans the sweep (`OUT/sweep.json`) and runs it as `args` say: submits the job array
/// (`--slurm`), runs it here (`--local`), or prints what it would do (`--dry-run`), writing what
/// it tells the user to `out`. True when the runs ran here (a report of them is due).
pub fn run(args: &SweepArgs, bin: &Path, out: &mut dyn std::io::Write) -> Result<bool> {
    let say = |out: &mut dyn std::io::Write, text: &str| {
        out.write_all(text.as_bytes())
            .map_err(|e| Error::io("stdout", e))
    };
    if !(args.slurm || args.local || args.parallel > 1 || args.dry_run) {
        return Err(Error::Config("umtune sweep: say how to run it: --local [--parallel K], --slurm [--dry-run], or --dry-run".into()));
    }
    let plan = SweepPlan::new(&args.config, &args.overrides.set, &args.grid, &args.seeds)?;
    let plan_path = plan.write(&args.out)?;
    say(
        out,
        &format!(
            "{} runs ({} grid points x {} seeds), plan: {}\n",
            plan.runs.len(),
            plan.runs.len() / plan.seeds.len(),
            plan.seeds.len(),
            plan_path.display()
        ),
    )?;
    if args.slurm {
        let options = SlurmOptions {
            nproc_per_node: args.nproc_per_node,
            time: args.time.clone(),
            extra: args.sbatch.clone(),
        };
        let script = sbatch_script(&plan, &plan_path, bin, &options);
        if args.dry_run {
            say(out, &script)?;
        } else {
            let (id, file) = submit(&script, &args.out)?;
            say(
                out,
                &format!("submitted job array {id} ({})\n", file.display()),
            )?;
        }
        Ok(false)
    } else if args.local || args.parallel > 1 {
        run_local(bin, &plan, &plan_path, args.parallel as usize)?;
        Ok(true)
    } else {
        for i in 0..plan.runs.len() {
            say(
                out,
                &format!("{}\n", plan.overrides(i, &args.out)?.join(" ")),
            )?;
        }
        Ok(false)
    }
}

/// Writes `script` to `OUT/sweep.sbatch` and submits it; returns the job id and the file.
fn submit(script: &str, out: &Path) -> Result<(String, PathBuf)> {
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| Error::io(&logs, e))?;
    let file = out.join(SBATCH_FILE);
    write_atomic(&file, script.as_bytes())?;
    let submitted = std::process::Command::new("sbatch")
        .arg("--parsable")
        .arg(&file)
        .output()
        .map_err(|e| Error::io("sbatch (is SLURM installed here?)", e))?;
    if !submitted.status.success() {
        return Err(Error::Run {
            dir: out.to_path_buf(),
            msg: format!(
                "sbatch {} failed: {}",
                file.display(),
                String::from_utf8_lossy(&submitted.stderr).trim()
            ),
        });
    }
    let id = String::from_utf8_lossy(&submitted.stdout)
        .trim()
        .to_string();
    Ok((id, file))
}

/// How each SLURM array task runs.
pub struct SlurmOptions {
    /// Workers (GPUs) per task: more than 1 runs `umtune-launch` in the task.
    pub nproc_per_node: usize,
    /// `--time` of each task (`HH:MM:SS`), empty for the partition's default.
    pub time: String,
    /// Extra `#SBATCH` lines (`--partition=gpu`, ...).
    pub extra: Vec<String>,
}

/// The job-array script of a sweep whose plan is at `plan` (see the module doc).
pub fn sbatch_script(
    plan: &SweepPlan,
    plan_path: &Path,
    umtune: &Path,
    o: &SlurmOptions,
) -> String {
    let out = plan_path.parent().unwrap_or(Path::new("."));
    let mut h = vec![
        "#!/bin/bash".to_string(),
        "# Written by `umtune sweep --slurm`: one array task per run of sweep.json; each trains"
            .into(),
        "# with --resume auto (a finished run is skipped, an interrupted one continues).".into(),
        "# Submit again with `sbatch` after editing; SIGUSR1 120 s before the time limit".into(),
        "# makes the task checkpoint and requeue itself.".into(),
        "#SBATCH --job-name=umtune-sweep".into(),
        format!("#SBATCH --array=0-{}", plan.runs.len().saturating_sub(1)),
        format!("#SBATCH --output={}/logs/%A_%a.out", out.display()),
        "#SBATCH --ntasks=1".into(),
        "#SBATCH --signal=B:USR1@120".into(),
        "#SBATCH --requeue".into(),
        "#SBATCH --open-mode=append".into(),
    ];
    if o.nproc_per_node > 1 {
        h.push(format!("#SBATCH --gpus-per-task={}", o.nproc_per_node));
        h.push(format!("#SBATCH --cpus-per-task={}", 8 * o.nproc_per_node));
    }
    if !o.time.is_empty() {
        h.push(format!("#SBATCH --time={}", o.time));
    }
    h.extend(o.extra.iter().map(|e| format!("#SBATCH {e}")));
    let bin = umtune.display();
    let launch = if o.nproc_per_node > 1 {
        format!(
            "{} --nproc-per-node {} -- {bin}",
            umtune.with_file_name("umtune-launch").display(),
            o.nproc_per_node
        )
    } else {
        bin.to_string()
    };
    let body = format!(
        r#"
# NCCL hints (multi-GPU tasks): export NCCL_DEBUG=WARN; NCCL_SOCKET_IFNAME=<your IB/eth interface>
set -u
task="${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
requeue() {{
  echo "umtune sweep: SIGUSR1 (time limit near): checkpointing, then requeueing $task"
  kill -USR1 "$child" 2>/dev/null
  wait "$child"
  scontrol requeue "$task"
  exit 0
}}
trap requeue USR1
{launch} sweep-task "{plan}" --task "$SLURM_ARRAY_TASK_ID" &
child=$!
wait "$child"
"#,
        plan = plan_path.display()
    );
    format!("{}\n{body}", h.join("\n"))
}

/// Runs the sweep's runs here as child processes (`BIN sweep-task PLAN --task I`), `parallel` at
/// a time, each logging to `OUT/logs/NAME.log`; fails naming the runs that failed. SIGINT,
/// SIGTERM and SIGUSR1 are forwarded to the running children (which checkpoint and stop), no
/// further run starts, and the sweep waits for them and ends with 128 + the signal; children die
/// with the sweep (PR_SET_PDEATHSIG), so none trains on as an orphan.
pub fn run_local(bin: &Path, plan: &SweepPlan, plan_path: &Path, parallel: usize) -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let out = plan_path.parent().unwrap_or(Path::new("."));
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| Error::io(&logs, e))?;
    let signal = std::sync::Arc::new(AtomicUsize::new(0));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        signal_hook::flag::register_usize(sig, signal.clone(), sig as usize)
            .map_err(|e| Error::Internal(format!("installing the handler of signal {sig}: {e}")))?;
    }
    let mut waiting: std::collections::VecDeque<usize> = (0..plan.runs.len()).collect();
    let mut running: Vec<(usize, std::process::Child)> = Vec::new();
    let (mut failed, mut stopped) = (Vec::new(), None);
    while !waiting.is_empty() || !running.is_empty() {
        let sig = signal.swap(0, Ordering::SeqCst) as i32;
        if sig != 0 {
            tracing::warn!(
                signal = sig,
                runs = running.len(),
                "forwarding the signal to the running sweep runs; starting no more"
            );
            for (_, child) in &running {
                // SAFETY: kill(2) on a child we started and have not reaped.
                unsafe { libc::kill(child.id() as i32, sig) };
            }
            waiting.clear();
            stopped.get_or_insert(sig);
        }
        while running.len() < parallel {
            let Some(i) = waiting.pop_front() else { break };
            let name = &plan.runs[i].name;
            let log_path = logs.join(format!("{name}.log"));
            let log = std::fs::File::create(&log_path).map_err(|e| Error::io(&log_path, e))?;
            let mut cmd = std::process::Command::new(bin);
            cmd.args(["sweep-task".as_ref(), plan_path.as_os_str()])
                .args(["--task", &i.to_string()])
                .stdout(log.try_clone().map_err(|e| Error::io(&log_path, e))?)
                .stderr(log);
            // SAFETY: prctl is async-signal-safe; it runs between fork and exec.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().map_err(|e| Error::io(bin, e))?;
            tracing::info!(run = %name, "sweep run started");
            running.push((i, child));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut still = Vec::new();
        for (i, mut child) in running {
            match child.try_wait().map_err(|e| Error::io(bin, e))? {
                None => still.push((i, child)),
                Some(status) => {
                    let name = &plan.runs[i].name;
                    if status.success() {
                        tracing::info!(run = %name, "sweep run finished");
                    } else {
                        tracing::error!(run = %name, %status, "sweep run failed (see logs/{name}.log)");
                        failed.push(name.clone());
                    }
                }
            }
        }
        running = still;
    }
    if let Some(signal) = stopped {
        return Err(Error::Interrupted {
            signal,
            name: crate::dist::context::signal_name(signal),
            step: 0,
            msg: format!(
                "the sweep's running runs were stopped and saved; run the same `umtune sweep` again to continue it ({})",
                out.display()
            ),
        });
    }
    if !failed.is_empty() {
        return Err(Error::Run {
            dir: logs,
            msg: format!(
                "{} sweep run(s) failed: {}",
                failed.len(),
                failed.join(", ")
            ),
        });
    }
    Ok(())
}
