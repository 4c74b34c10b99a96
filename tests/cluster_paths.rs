//! Regression tests for what broke when umtune was pushed on the cluster paths as a user would
//! (issue 18): two writers of one run directory, `--resume auto` of a finished run under another
//! config, sweeps with duplicate or changed plans and their orphans, an edited manifest and a
//! corrupt memory shard in the newest checkpoint.
mod common;

use common::process::*;
use common::TestResult;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn scratch(tag: &str) -> PathBuf {
    common::fresh_dir(&format!("paths-{tag}"))
}

fn umtune(args: &[String]) -> std::io::Result<Output> {
    Command::new(umtune_bin()).args(args).output()
}

fn with_resume(mut args: Vec<String>) -> Vec<String> {
    args.extend(["--resume".into(), "auto".into()]);
    args
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_second_writer_of_a_run_is_refused_naming_the_holder() -> TestResult {
    let out = scratch("lock");
    let args = with_resume(train_args(
        &out,
        "c",
        4,
        100000,
        &["data.train_limit=400", "checkpoint.every=1"],
    ));
    let mut first = Command::new(umtune_bin())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_until("the first run writes", Duration::from_secs(60), || {
        out.join("c/metrics.jsonl").exists()
    });
    let second = umtune(&args)?;
    first.kill()?;
    first.wait()?;
    let e = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{e}");
    assert!(
        e.contains("another umtune process is writing this run")
            && e.contains(&format!("pid {}", first.id())),
        "{e}"
    );
    // The lock goes with its process (here killed): the run resumes.
    let resumed = umtune(&with_resume(train_args(
        &out,
        "c",
        4,
        3,
        &["data.train_limit=400", "checkpoint.every=1"],
    )))?;
    let e = String::from_utf8_lossy(&resumed.stderr);
    assert!(
        !e.contains("another umtune process"),
        "a dead holder's lock stays:\n{e}"
    );
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn resume_auto_of_a_finished_run_compares_its_config() -> TestResult {
    let out = scratch("finished");
    check(&umtune(&train_args(&out, "f", 4, 2, &[]))?, "the run");
    let changed = umtune(&with_resume(train_args(
        &out,
        "f",
        4,
        2,
        &["train.lr=0.02", "peft.method=ia3"],
    )))?;
    let e = String::from_utf8_lossy(&changed.stderr);
    assert_eq!(changed.status.code(), Some(2), "{e}");
    assert!(e.contains("train.lr") && e.contains("peft.method"), "{e}");
    // The same config: nothing to do, the run's results.
    check(
        &umtune(&with_resume(train_args(&out, "f", 4, 2, &[])))?,
        "resume of the finished run",
    );
    // Its PEFT export says what the adapter leaves out (the run has UM and the memory on).
    let export = Command::new(umtune_bin())
        .arg("export")
        .arg(out.join("f"))
        .arg("--out")
        .arg(out.join("adapter"))
        .output()?;
    check(&export, "export");
    let e = String::from_utf8_lossy(&export.stderr);
    assert!(
        e.contains("ignore the external memory") && e.contains("uncertainty modeling"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// `umtune sweep configs/default.toml --out OUT ARGS...`.
fn sweep(out: &Path, args: &[&str]) -> std::io::Result<Output> {
    Command::new(umtune_bin())
        .arg("sweep")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/default.toml"))
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
}

#[test]
fn sweeps_refuse_duplicate_runs_and_a_changed_plan() -> TestResult {
    let out = scratch("plan");
    let plan = out.join("sweep.json");
    let refused = sweep(&out, &["--grid", "train.lr=1e-3,1e-3", "--dry-run"])?;
    let e = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{e}");
    assert!(e.contains("lists `1e-3` twice"), "{e}");
    let refused = sweep(&out, &["--seeds", "1,1", "--dry-run"])?;
    assert!(!refused.status.success());
    // --parallel 0, and no way to run it: refused before anything is written.
    let refused = sweep(&out, &["--local", "--parallel", "0"])?;
    assert!(!refused.status.success());
    let refused = sweep(&out, &["--grid", "train.lr=1e-3"])?;
    assert!(!refused.status.success());
    assert!(!plan.exists(), "a refused sweep wrote its plan");
    // A dataset path's `/` stays out of the run names.
    let dry = sweep(
        &out,
        &[
            "--grid",
            "data.dataset=/data/a.jsonl,uci-sentiment",
            "--dry-run",
        ],
    )?;
    check(&dry, "dry run");
    let text = std::fs::read_to_string(&plan)?;
    let written: serde_json::Value = serde_json::from_str(&text)?;
    for run in written["runs"].as_array().ok_or("runs")? {
        let name = run["name"].as_str().ok_or("name")?;
        assert!(!name.contains('/'), "run name {name}");
    }
    // The same plan again continues it; another plan in the same directory is refused.
    check(
        &sweep(
            &out,
            &[
                "--grid",
                "data.dataset=/data/a.jsonl,uci-sentiment",
                "--dry-run",
            ],
        )?,
        "the same plan",
    );
    let refused = sweep(&out, &["--grid", "train.lr=2e-3", "--dry-run"])?;
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && e.contains("holds another sweep's plan"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(&plan)?,
        text,
        "the plan was replaced"
    );
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// Live processes whose command line has `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

#[test]
fn sigterm_to_a_local_sweep_stops_its_runs() -> TestResult {
    let out = scratch("sweep-term");
    // The tiny model's `--set`s (train_args' without the run's own names), long runs.
    let args = train_args(&out, "unused", 4, 100000, &["data.train_limit=400"]);
    let sets: Vec<&String> = args[2..]
        .chunks(2)
        .filter(|kv| !kv[1].starts_with("run."))
        .flatten()
        .collect();
    let mut sweep = Command::new(umtune_bin())
        .args(["sweep", &args[1], "--out"])
        .arg(&out)
        .args(["--grid", "train.lr=0.01,0.02", "--local", "--parallel", "2"])
        .args(sets)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let plan = out.join("sweep.json").display().to_string();
    wait_until("both runs train", Duration::from_secs(90), || {
        ["lr=0.01,seed=42", "lr=0.02,seed=42"]
            .iter()
            .all(|r| out.join(r).join("metrics.jsonl").exists())
    });
    assert_eq!(processes_with(&plan).len(), 2, "two sweep-task processes");
    Command::new("kill")
        .args(["-TERM", &sweep.id().to_string()])
        .status()?;
    let status = sweep.wait()?;
    assert_eq!(
        status.code(),
        Some(143),
        "the sweep ends with 128 + SIGTERM"
    );
    // Its runs were told too and are gone: none trains on as an orphan.
    assert!(
        processes_with(&plan).is_empty(),
        "sweep runs left behind: {:?}",
        processes_with(&plan)
    );
    let record = common::read_json(out.join("lr=0.01,seed=42/run.json"))?;
    assert_eq!(record["state"], "interrupted");
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// A run aborted at step 5 with the checkpoints of steps 2 and 4; its directory.
fn aborted_run(out: &Path, name: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let died = Command::new(umtune_bin())
        .args(train_args(out, name, 4, 6, &["checkpoint.every=2"]))
        .env("UMTUNE_TEST_ABORT_AT", "5:0")
        .output()?;
    assert!(!died.status.success());
    let run = out.join(name);
    assert!(run.join("checkpoints/step_000004").is_dir());
    Ok(run)
}

/// `--resume auto` of `run` skips its step-4 checkpoint naming `why`, continues from step 2 and
/// finishes.
fn falls_back_past_step_4(out: &Path, run: &Path, why: &str) -> TestResult {
    let name = run
        .file_name()
        .ok_or("name")?
        .to_string_lossy()
        .into_owned();
    let resumed = umtune(&with_resume(train_args(
        out,
        &name,
        4,
        6,
        &["checkpoint.every=2"],
    )))?;
    check(&resumed, "resume auto");
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(
        log.contains("skipping a bad checkpoint")
            && log.contains("step_000004")
            && log.contains(why),
        "{log}"
    );
    assert!(log.contains("step_000002"), "resumed from step 2:\n{log}");
    let record = common::read_json(run.join("run.json"))?;
    assert_eq!(record["state"], "finished");
    Ok(())
}

#[test]
fn an_edited_manifest_or_a_corrupt_shard_is_a_bad_checkpoint() -> TestResult {
    let out = scratch("manifest");
    // The step in the newest manifest edited (a later step would train past the budget with
    // other weights; an earlier one would repeat steps).
    let run = aborted_run(&out, "edited")?;
    let manifest = run.join("checkpoints/step_000004/manifest.json");
    let text = std::fs::read_to_string(&manifest)?;
    assert!(text.contains("\"step\": 4"), "{text}");
    std::fs::write(&manifest, text.replace("\"step\": 4", "\"step\": 9"))?;
    falls_back_past_step_4(&out, &run, "manifest.sha256")?;
    // A flipped byte in the newest checkpoint's memory shard (a requeued job used to fail on it
    // every time though step 2 was intact).
    let run = aborted_run(&out, "shard")?;
    let step4 = run.join("checkpoints/step_000004");
    let shard = std::fs::read_dir(&step4)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with("memory.") && n.ends_with(".safetensors")
        })
        .ok_or("step 4 has no memory shard")?;
    let mut bytes = std::fs::read(&shard)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&shard, &bytes)?;
    let name = shard.file_name().unwrap_or_default().to_string_lossy();
    falls_back_past_step_4(&out, &run, &name)?;
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn a_resume_that_would_write_elsewhere_or_past_its_budget_is_refused() -> TestResult {
    let out = scratch("resume-into");
    let run = aborted_run(&out, "other")?;
    // By path with another run.name: it would have written into `other`.
    let mut into = train_args(&out, "mine", 4, 6, &["checkpoint.every=2"]);
    into.push("--resume".into());
    into.push(run.join("checkpoints/step_000004").display().to_string());
    let refused = umtune(&into)?;
    let e = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{e}");
    assert!(e.contains("continues the run in"), "{e}");
    assert!(!out.join("mine").exists());
    // A step-4 checkpoint under train.max_steps = 3 would claim "finished, 3 steps".
    let refused = umtune(&with_resume(train_args(
        &out,
        "other",
        4,
        3,
        &["checkpoint.every=2"],
    )))?;
    let e = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{e}");
    assert!(
        e.contains("the checkpoint is at step 4, past this run's 3 steps"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn a_kill_in_the_final_evaluation_resumes_without_duplicate_lines() -> TestResult {
    let out = scratch("final-eval");
    let args = with_resume(train_args(&out, "e", 4, 3, &[]));
    let died = Command::new(umtune_bin())
        .args(&args)
        .env("UMTUNE_TEST_ABORT_IN_FINAL_EVALUATION", "1")
        .output()?;
    assert!(!died.status.success());
    check(&umtune(&args)?, "resume auto");
    let text = std::fs::read_to_string(out.join("e/metrics.jsonl"))?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    for split in ["validation", "test"] {
        let n = lines.iter().filter(|l| l["split"] == split).count();
        assert_eq!(n, 1, "{split} lines in metrics.jsonl:\n{text}");
    }
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn a_temperature_is_used_only_with_the_weights_it_was_fitted_on() -> TestResult {
    use umtune::train::run_files::{read_calibration, CALIBRATION_FILE};
    let dir = scratch("calibration");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(CALIBRATION_FILE);
    std::fs::write(
        &file,
        r#"{"temperature": 1.5, "fitted_on": "validation", "weights_step": 4}"#,
    )?;
    assert_eq!(read_calibration(&dir, Some(4))?, Some(1.5));
    // The final save failed after the temperature was fitted: step 2's weights are not its.
    assert_eq!(read_calibration(&dir, Some(2))?, None);
    // Runs from before the step was recorded keep their temperature.
    std::fs::write(&file, r#"{"temperature": 1.5, "fitted_on": "validation"}"#)?;
    assert_eq!(read_calibration(&dir, Some(2))?, Some(1.5));
    std::fs::write(&file, r#"{"temperature": -1, "fitted_on": "validation"}"#)?;
    assert!(read_calibration(&dir, Some(2)).is_err());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn a_full_disk_leaves_no_partial_checkpoint_and_records_the_failure() -> TestResult {
    // A 4 MB tmpfs: the run's files fit, the first checkpoint (a 12.7 MB memory shard) does not.
    let out = scratch("enospc");
    std::fs::create_dir_all(&out)?;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&out)
        .status()?;
    assert!(
        mounted.success(),
        "mounting a tmpfs (the tests run as root)"
    );
    let run = umtune(&train_args(&out, "full", 4, 3, &["checkpoint.every=1"]));
    let leftovers: Vec<String> = std::fs::read_dir(out.join("full/checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    let record = common::read_json(out.join("full/run.json"));
    Command::new("umount").arg(&out).status()?;
    let run = run?;
    let record = record?;
    assert_eq!(record["state"], "failed", "{record}");
    assert!(
        record["message"]
            .as_str()
            .is_some_and(|m| m.contains("No space left on device")),
        "{record}"
    );
    let e = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{e}");
    assert!(e.contains("No space left on device"), "{e}");
    assert!(
        leftovers.is_empty(),
        "partial checkpoints left: {leftovers:?}"
    );
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn a_sweep_report_lists_the_runs_without_results() -> TestResult {
    let out = scratch("sweep-report");
    let args = train_args(&out, "unused", 4, 2, &[]);
    let sets: Vec<&String> = args[2..]
        .chunks(2)
        .filter(|kv| !kv[1].starts_with("run.") && !kv[1].starts_with("data.dataset"))
        .flatten()
        .collect();
    // The second grid point's data does not exist: its run fails before it trains.
    let missing = out.join("no-such.jsonl").display().to_string();
    let sweep = Command::new(umtune_bin())
        .args(["sweep", &args[1], "--out"])
        .arg(&out)
        .args(["--grid", &format!("data.dataset=uci-sentiment,{missing}")])
        .arg("--local")
        .args(sets)
        .output()?;
    assert!(!sweep.status.success(), "a failed run fails the sweep");
    let report = Command::new(umtune_bin())
        .arg("report")
        .arg(&out)
        .output()?;
    check(&report, "umtune report");
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(
        text.contains("1 of 2 planned runs have no results") && text.contains("no-such.jsonl"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}
