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
    common::fresh_dir(&format!("ckpt-{tag}"))
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
    let step5 = run.join("checkpoints/step_000005");
    let by_path = || {
        let mut a = args(&out, "cut", &[]);
        a.extend(["--resume".into(), step5.display().to_string()]);
        umtune(&a, &[])
    };
    // A flipped byte in its memory shard is caught while the shard is restored, naming it.
    let shard = std::fs::read_dir(&step5)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with("memory.") && n.ends_with(".safetensors")
        })
        .ok_or("step 5 has no memory shard")?;
    let good = std::fs::read(&shard)?;
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x10;
    std::fs::write(&shard, &bad)?;
    let refused = by_path()?;
    let e = String::from_utf8_lossy(&refused.stderr);
    let name = shard.file_name().unwrap_or_default().to_string_lossy();
    assert!(
        !refused.status.success() && e.contains(&*name) && e.contains("corrupt"),
        "{e}"
    );
    std::fs::write(&shard, &good)?;
    // One flipped byte in step 5's optimizer state: named when asked for by path...
    let file = step5.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&file)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&file, &bytes)?;
    let refused = by_path()?;
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

/// umtune's safetensors writer and mapped reader: what it writes, Python's safetensors reads
/// alike (and tch's reader); its recorded sha256 and xxh3 are the standard ones (Python's
/// hashlib and xxhash, so `sha256sum` and `xxhsum -H3` check a checkpoint); a view after an
/// odd-sized tensor (unaligned) reads right; a flipped byte is caught through the xxh3, and
/// through the sha256 in records without an xxh3 (older umtune).
#[test]
fn checkpoint_files_are_standard_safetensors_with_standard_checksums() -> TestResult {
    use umtune::atomic_file::FileDigest;
    use umtune::models::weights::{write_safetensors_atomic, MappedSafetensors};
    let out = out_dir("files");
    std::fs::create_dir_all(&out)?;
    let path = out.join("t.safetensors");
    let tensors = vec![
        (
            "a_odd_bf16",
            tch::Tensor::arange(7, (tch::Kind::BFloat16, tch::Device::Cpu)),
        ),
        (
            "b_f32",
            tch::Tensor::randn([5, 3], (tch::Kind::Float, tch::Device::Cpu)),
        ),
        (
            "c_i64",
            tch::Tensor::arange(4, (tch::Kind::Int64, tch::Device::Cpu)) - 2,
        ),
        (
            "d_empty",
            tch::Tensor::zeros([0, 4], (tch::Kind::Float, tch::Device::Cpu)),
        ),
        (
            "e_view",
            tch::Tensor::randn([4, 6], (tch::Kind::Float, tch::Device::Cpu)).transpose(0, 1),
        ),
    ];
    let digest = write_safetensors_atomic(&path, &tensors)?;
    let script = r#"
import hashlib, json, sys, xxhash
from safetensors.torch import load_file
b = open(sys.argv[1], "rb").read()
print(len(b), hashlib.sha256(b).hexdigest(), xxhash.xxh3_64_hexdigest(b))
for k, t in sorted(load_file(sys.argv[1]).items()):
    print(json.dumps([k, list(t.shape), float(t.double().sum())]))
"#;
    let py = Command::new(python())
        .args(["-c", script])
        .arg(&path)
        .output()?;
    check(&py, "python safetensors + hashlib + xxhash");
    let text = String::from_utf8_lossy(&py.stdout).into_owned();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(
            format!(
                "{} {} {}",
                digest.bytes,
                digest.sha256,
                digest.xxh3.clone().unwrap_or_default()
            )
            .as_str()
        )
    );
    let mapped = MappedSafetensors::open(&path, Some((&digest, "the test")))?;
    let by_tch: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(&path)?.into_iter().collect();
    let mut seen = 0;
    for ((name, t), line) in tensors.iter().zip(lines) {
        let got = &mapped[*name];
        assert!(
            got.equal(t) && by_tch[*name].equal(t),
            "{name}: {got} vs {t}"
        );
        let py: (String, Vec<i64>, f64) = serde_json::from_str(line)?;
        let sum = t
            .to_kind(tch::Kind::Double)
            .sum(tch::Kind::Double)
            .double_value(&[]);
        assert!(
            py.0 == *name && py.1 == t.size() && (py.2 - sum).abs() < 1e-9,
            "python read {line}; umtune wrote {name} {:?} sum {sum}",
            t.size()
        );
        seen += 1;
    }
    assert_eq!(seen, tensors.len(), "python read {text}");
    drop(mapped);
    let mut bytes = std::fs::read(&path)?;
    let last = bytes.len() - 5;
    bytes[last] ^= 0x04;
    std::fs::write(&path, &bytes)?;
    let e = MappedSafetensors::open(&path, Some((&digest, "the test")))
        .err()
        .ok_or("a flipped byte passed the xxh3")?
        .to_string();
    assert!(
        e.contains("xxh3") && e.contains("corrupt") && e.contains("t.safetensors"),
        "{e}"
    );
    let legacy = FileDigest {
        xxh3: None,
        ..digest.clone()
    };
    let e = MappedSafetensors::open(&path, Some((&legacy, "an old record")))
        .err()
        .ok_or("a flipped byte passed the sha256")?
        .to_string();
    assert!(e.contains("sha256") && e.contains("an old record"), "{e}");
    bytes[last] ^= 0x04;
    std::fs::write(&path, &bytes)?;
    MappedSafetensors::open(&path, Some((&legacy, "an old record")))?;
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// A kill after `run.json` recorded new weights but before they were moved into place (the run
/// directory's two-phase save): the next reader completes the save, so the recorded weights are
/// the ones used; a staged file that `run.json` does not record (a save cut off before its
/// commit) is left alone and the recorded weights still load.
#[test]
fn a_kill_between_recording_and_moving_the_weights_loses_nothing() -> TestResult {
    let out = out_dir("commit");
    let mut a = train_args(&out, "cut", 4, 6, &["train.eval_every=2"]);
    a.extend(["--set".into(), "checkpoint.every=0".into()]);
    let died = umtune(&a, &[("UMTUNE_TEST_ABORT_AFTER_COMMIT", "4")])?;
    assert!(!died.status.success(), "the abort did not happen");
    let run = out.join("cut");
    let record = common::read_json(run.join("run.json"))?;
    assert_eq!(record["weights_step"], 4);
    let staged = run.join("trainable.safetensors.next");
    let step4 = std::fs::read(&staged)?;
    assert!(run.join("memory.index.json.next").is_file());
    assert_ne!(std::fs::read(run.join("trainable.safetensors"))?, step4);
    let eval = umtune(&["eval".into(), run.display().to_string()], &[])?;
    check(&eval, "eval after the cut-off save");
    assert!(!staged.exists() && !run.join("memory.index.json.next").exists());
    assert_eq!(std::fs::read(run.join("trainable.safetensors"))?, step4);
    // An uncommitted staged file is not used, nor removed by a reader.
    std::fs::write(&staged, b"a save that never committed")?;
    check(
        &umtune(&["eval".into(), run.display().to_string()], &[])?,
        "eval beside an uncommitted staged file",
    );
    assert!(staged.is_file());
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}
