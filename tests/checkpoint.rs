//! Checkpoints and exact resume, with the real binary: a run aborted in the middle of a gradient
//! accumulation (and of an epoch), or stopped by SIGUSR1, and resumed with `--resume auto` ends
//! with bitwise the weights, optimizer state, memory and metrics of the uninterrupted run (tiny
//! LLaMA, LoRA + UM + memory, every random draw on). A kill while a checkpoint is written, a
//! flipped byte and a changed config are refused or survived as documented.
mod common;

use common::process::*;
use common::TestResult;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// 16 steps of 2 micro-batches of 4 over 96 examples: 12 steps an epoch, so the checkpoints of
/// steps 5 and 10 are mid-epoch and the run crosses an epoch; an evaluation every 5 steps.
fn args(out: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        "train.grad_accum=2",
        "checkpoint.every=5",
        "checkpoint.keep=2",
        "train.eval_every=5",
        "train.log_every=1",
    ];
    sets.extend_from_slice(extra);
    train_args(out, name, 4, 16, &sets)
}

fn umtune(args: &[String], env: &[(&str, &str)]) -> std::io::Result<std::process::Output> {
    let mut c = Command::new(umtune_bin());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output()
}

fn out_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("umtune-ckpt-{tag}-{}", std::process::id()))
}

fn checkpoints(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_run_aborted_mid_accumulation_resumes_bitwise() -> TestResult {
    let out = out_dir("abort");
    check(
        &umtune(&args(&out, "whole", &[]), &[])?,
        "uninterrupted run",
    );
    // Killed (abort: no cleanup) before the second micro-batch of step 7, after step 5's
    // checkpoint: the run is mid-epoch and mid-accumulation.
    let died = umtune(&args(&out, "cut", &[]), &[("UMTUNE_TEST_ABORT_AT", "7:1")])?;
    assert!(!died.status.success(), "the abort did not happen");
    assert_eq!(checkpoints(&out.join("cut")), ["latest", "step_000005"]);
    let mut resume = args(&out, "cut", &[]);
    resume.extend(["--resume".into(), "auto".into()]);
    let resumed = umtune(&resume, &[])?;
    check(&resumed, "resumed run");
    assert!(
        String::from_utf8_lossy(&resumed.stderr).contains("resuming"),
        "the resume is logged"
    );
    assert_bitwise(&out.join("whole"), &out.join("cut"), 16);
    // The newest two checkpoints are kept; `latest` names the newest.
    assert_eq!(
        checkpoints(&out.join("cut")),
        ["latest", "step_000015", "step_000016"]
    );
    let latest = std::fs::read_to_string(out.join("cut/checkpoints/latest"))?;
    assert_eq!(latest, "step_000016");
    // Resuming a finished run does nothing and says so.
    let again = umtune(&resume, &[])?;
    check(&again, "resuming a finished run");
    assert_bitwise(&out.join("whole"), &out.join("cut"), 16);
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn bad_checkpoints_are_named_and_auto_falls_back_to_a_good_one() -> TestResult {
    let out = out_dir("bad");
    check(
        &umtune(&args(&out, "whole", &[]), &[])?,
        "uninterrupted run",
    );
    // Killed with -9 halfway through writing step 10's checkpoint.
    let mut child = Command::new(umtune_bin())
        .args(args(&out, "cut", &[]))
        .env("UMTUNE_TEST_PAUSE_IN_CHECKPOINT", "10")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let partial = out.join("cut/checkpoints/step_000010.tmp/trainable.safetensors");
    let start = Instant::now();
    while !partial.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint write seen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill()?;
    child.wait()?;
    let run = out.join("cut");
    assert_eq!(
        checkpoints(&run),
        ["latest", "step_000005", "step_000010.tmp"]
    );
    // A changed config is refused naming the key; a safe key is not.
    let mut changed = args(&out, "cut", &["train.lr=0.02"]);
    changed.extend(["--resume".into(), "auto".into()]);
    let refused = umtune(&changed, &[])?;
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && e.contains("train.lr"), "{e}");
    // One flipped byte in step 5's optimizer state: named when asked for by path...
    let step5 = run.join("checkpoints/step_000005");
    let file = step5.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&file)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&file, &bytes)?;
    let mut by_path = args(&out, "cut", &[]);
    by_path.extend(["--resume".into(), step5.display().to_string()]);
    let refused = umtune(&by_path, &[])?;
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && e.contains("optimizer.safetensors") && e.contains("corrupt"),
        "{e}"
    );
    // ... and `auto`, with no good checkpoint left, says so and starts this run afresh, which
    // ends as the uninterrupted run.
    let mut auto = args(&out, "cut", &[]);
    auto.extend(["--resume".into(), "auto".into()]);
    let fresh = umtune(&auto, &[])?;
    check(&fresh, "resume auto");
    let log = String::from_utf8_lossy(&fresh.stderr);
    assert!(log.contains("skipping a bad checkpoint"), "{log}");
    assert_bitwise(&out.join("whole"), &run, 16);
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn sigusr1_checkpoints_at_a_step_and_the_run_resumes_bitwise() -> TestResult {
    let out = out_dir("usr1");
    check(
        &umtune(&args(&out, "whole", &[]), &[])?,
        "uninterrupted run",
    );
    let mut child = Command::new(umtune_bin())
        .args(args(&out, "cut", &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let metrics = out.join("cut/metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the run did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = Command::new("kill")
        .args(["-USR1", &child.id().to_string()])
        .status()?;
    assert!(sent.success());
    let status = child.wait()?;
    let usr1 = signal_hook::consts::SIGUSR1;
    assert_eq!(
        status.code(),
        Some(128 + usr1),
        "exit code of a SIGUSR1 stop"
    );
    let record = common::read_json(out.join("cut/run.json"))?;
    assert_eq!(record["state"], "interrupted");
    let step = record["step"].as_u64().ok_or("no step")? as usize;
    assert!(step < 16, "stopped at step {step}");
    assert!(
        out.join(format!("cut/checkpoints/step_{step:06}/manifest.json"))
            .is_file(),
        "no checkpoint at the stop step {step}: {:?}",
        checkpoints(&out.join("cut"))
    );
    let mut resume = args(&out, "cut", &[]);
    resume.extend(["--resume".into(), "auto".into()]);
    check(&umtune(&resume, &[])?, "resumed run");
    assert_bitwise(&out.join("whole"), &out.join("cut"), 16);
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}
