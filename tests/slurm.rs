//! umtune under a real SLURM: a one-node cluster on localhost (`cluster/local-slurm.sh`, Debian's
//! slurm-wlm and munge), started and stopped by these tests, one at a time. `srun` ranks and
//! `umtune-launch` in a step match one process; a job that gets SLURM's warning signal
//! checkpoints, requeues itself and finishes bitwise as an uninterrupted run; a `--slurm` sweep
//! runs as a job array that `umtune report` summarizes.
mod common;

use common::process::*;
use common::TestResult;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One test at a time owns the cluster: it starts the daemons and stops the ones it started.
static CLUSTER: Mutex<()> = Mutex::new(());

struct Cluster<'a> {
    _one_at_a_time: std::sync::MutexGuard<'a, ()>,
}

impl Cluster<'_> {
    fn up() -> Cluster<'static> {
        let guard = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        let up = Command::new(root().join("cluster/local-slurm.sh"))
            .arg("start")
            .output()
            .unwrap();
        check(&up, "cluster/local-slurm.sh start");
        Cluster {
            _one_at_a_time: guard,
        }
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        let _ = Command::new(root().join("cluster/local-slurm.sh"))
            .arg("stop")
            .status();
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn scontrol_field(job: &str, field: &str) -> String {
    let out = Command::new("scontrol")
        .args(["show", "job", job])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{field}=")).map(String::from))
        .unwrap_or_default()
}

fn wait_for(what: &str, limit: Duration, done: impl FnMut() -> bool) {
    wait_or_explain(what, limit, done, String::new);
}

/// Waits until `done`; on time out, panics with what `explain` says of the cluster's state.
fn wait_or_explain(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
    explain: impl Fn() -> String,
) {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            panic!("timed out waiting for {what}\n{}", explain());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What SLURM and the job said, for a failure message: the job's record, the node's state and
/// reason, the job's output and the daemons' last log lines.
fn cluster_state(job: &str, job_out: &Path) -> String {
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd).args(args).output().map_or_else(
            |e| format!("{cmd}: {e}"),
            |o| String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let tail = |path: &str| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    format!(
        "--- scontrol show job {job}\n{}\n--- sinfo -R\n{}\n--- sinfo\n{}\n--- {}\n{}\n\
         --- slurmctld.log\n{}\n--- slurmd.log\n{}",
        run("scontrol", &["show", "job", job]),
        run("sinfo", &["-R"]),
        run("sinfo", &[]),
        job_out.display(),
        std::fs::read_to_string(job_out).unwrap_or_default(),
        tail("/var/log/slurm/slurmctld.log"),
        tail("/var/log/slurm/slurmd.log"),
    )
}

fn sbatch(args: &[String]) -> String {
    let out = Command::new("sbatch").args(args).output().unwrap();
    check(&out, "sbatch");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn srun_two_ranks_match_one_process() -> TestResult {
    let _cluster = Cluster::up();
    let mut srun = Command::new("srun");
    srun.args(["-n", "2", "--time", "10", "--kill-on-bad-exit=1"]);
    two_ranks_match_one_process("srun", srun)?;
    // umtune-launch inside a SLURM step (one launcher per node): its layout comes from SLURM's
    // variables, and the workers, which inherit the step's SLURM_* variables, still follow the
    // launcher's RANK/WORLD_SIZE.
    let mut launch = Command::new("srun");
    launch
        .args(["-n", "1", "--time", "10"])
        .arg(launcher_bin())
        .args(["--nproc-per-node", "2", "--"]);
    two_ranks_match_one_process("srun-launch", launch)
}

#[test]
fn a_warned_job_checkpoints_requeues_and_finishes_as_if_uninterrupted() -> TestResult {
    let _cluster = Cluster::up();
    let out = common::fresh_dir("preempt");
    std::fs::create_dir_all(&out)?;
    let sets = [
        "train.grad_accum=2",
        "checkpoint.every=5",
        "train.log_every=1",
    ];
    let args = |name: &str| train_args(&out, name, 4, 40, &sets);
    check(
        &Command::new(umtune_bin()).args(args("whole")).output()?,
        "uninterrupted run",
    );
    // cluster/preempt.sbatch takes `train`'s arguments after the config.
    let mut submit = vec![
        "--parsable".to_string(),
        format!("--output={}/job.out", out.display()),
        format!("--export=ALL,UMTUNE={}", umtune_bin().display()),
        root().join("cluster/preempt.sbatch").display().to_string(),
    ];
    submit.extend(args("cut").into_iter().skip(1));
    let job = sbatch(&submit);
    let metrics = out.join("cut/metrics.jsonl");
    let job_out = out.join("job.out");
    let explain = || cluster_state(&job, &job_out);
    wait_or_explain(
        "the job to train",
        Duration::from_secs(120),
        || std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) >= 3,
        explain,
    );
    // SLURM's warning before the time limit (what --signal=B:USR1@120 sends to the script).
    let sent = Command::new("scancel")
        .args(["--signal=USR1", "--batch", &job])
        .status()?;
    assert!(sent.success());
    wait_or_explain(
        "the requeue",
        Duration::from_secs(60),
        || scontrol_field(&job, "Restarts") == "1" && scontrol_field(&job, "JobState") == "PENDING",
        explain,
    );
    // A requeued job starts again once its previous run's credential has expired: cred_expire, 10 s
    // on the local cluster (not forced earlier: slurmd would refuse the launch, "Job credential
    // revoked", and the job would fail).
    let mut asked = Instant::now();
    wait_or_explain(
        "the requeued job to finish",
        Duration::from_secs(240),
        || {
            let state = scontrol_field(&job, "JobState");
            let ended = [
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
                "BOOT_FAIL",
            ];
            assert!(
                !ended.contains(&state.as_str()),
                "the requeued job ended {state}\n{}",
                explain()
            );
            // A requeued job whose relaunch failed is held (Reason=launch_failed_requeued_held):
            // release it, and say so in the test's output.
            if state == "PENDING"
                && asked.elapsed() > Duration::from_secs(2)
                && scontrol_field(&job, "Reason").contains("held")
            {
                eprintln!("releasing a held job:\n{}", explain());
                let _ = Command::new("scontrol").args(["release", &job]).output();
                asked = Instant::now();
            }
            state == "COMPLETED"
        },
        explain,
    );
    let log = std::fs::read_to_string(out.join("job.out"))?;
    assert!(log.contains("requeueing job"), "{log}");
    assert!(log.contains("interrupted by SIGUSR1"), "{log}");
    assert!(log.contains("resuming"), "{log}");
    assert_bitwise(&out.join("whole"), &out.join("cut"), 40);
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn a_slurm_sweep_runs_as_a_job_array_and_report_summarizes_it() -> TestResult {
    let _cluster = Cluster::up();
    let out = common::fresh_dir("sweep");
    let args = train_args(&out, "unused", 4, 6, &[]);
    let config: PathBuf = args[1].clone().into();
    let mut sweep = vec![
        "sweep".to_string(),
        config.display().to_string(),
        "--grid".into(),
        "train.lr=0.01,0.001".into(),
        "--seeds".into(),
        "1,2".into(),
        "--out".into(),
        out.display().to_string(),
        "--slurm".into(),
    ];
    // The tiny model's settings, without the run's own name and directory.
    sweep.extend(
        args[2..]
            .chunks(2)
            .filter(|kv| !kv[1].starts_with("run.output_dir") && !kv[1].starts_with("run.name"))
            .flatten()
            .cloned(),
    );
    let submitted = Command::new(umtune_bin()).args(&sweep).output()?;
    check(&submitted, "umtune sweep --slurm");
    let stdout = String::from_utf8_lossy(&submitted.stdout);
    assert!(stdout.contains("submitted job array"), "{stdout}");
    let names = [
        "lr=0.01,seed=1",
        "lr=0.01,seed=2",
        "lr=0.001,seed=1",
        "lr=0.001,seed=2",
    ];
    wait_for("the array's 4 runs", Duration::from_secs(300), || {
        names
            .iter()
            .all(|n| out.join(n).join("summary.json").is_file())
    });
    let s = summary(&out.join("lr=0.001,seed=2"));
    assert_eq!(s["hyper"]["train.lr"], 0.001);
    assert_eq!(s["hyper"]["run.seed"], 2);
    assert!(s["overrides"]
        .as_array()
        .is_some_and(|o| o.iter().any(|x| x == "train.lr=0.001")));
    let report = Command::new(umtune_bin())
        .arg("report")
        .arg(&out)
        .output()?;
    check(&report, "umtune report");
    let text = String::from_utf8_lossy(&report.stdout);
    for group in ["| lr=0.01 | 2 |", "| lr=0.001 | 2 |", "best: lr=0.0"] {
        assert!(text.contains(group), "{group} missing from:\n{text}");
    }
    assert!(out.join("groups.csv").is_file());
    // The dry run prints the array script instead of submitting it.
    let mut dry = sweep.clone();
    dry.push("--dry-run".into());
    let dry = Command::new(umtune_bin()).args(&dry).output()?;
    check(&dry, "umtune sweep --slurm --dry-run");
    let script = String::from_utf8_lossy(&dry.stdout);
    assert!(script.contains("#SBATCH --array=0-3") && script.contains("scontrol requeue"));
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}
