//! The `umtune` binary as a user runs it: logging formats, exit codes and error messages.
mod common;
use std::process::Command;

fn umtune(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new(env!("CARGO_BIN_EXE_umtune"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
}

#[test]
fn json_logs_are_one_object_per_line() -> Result<(), Box<dyn std::error::Error>> {
    let args = [
        "--log-format",
        "json",
        "bench-forward",
        "--model",
        "preset:gpt2",
        "--batch",
        "1",
        "--seq-len",
        "4",
        "--iters",
        "1",
        "--warmup",
        "0",
    ];
    let out = umtune(&args)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8(out.stderr)?;
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{line}: {e}"))?;
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "loaded");
        assert_eq!(
            v["parameters"], 124_439_808,
            "GPT-2 small has 124,439,808 parameters (tied)"
        );
    }
    let result: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(result["batch"], 1);
    assert!(result["tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0);
    Ok(())
}

#[test]
fn text_logs_are_plain_when_not_a_terminal() -> Result<(), Box<dyn std::error::Error>> {
    let out = umtune(&[
        "bench-forward",
        "--model",
        "preset:gpt2",
        "--batch",
        "1",
        "--seq-len",
        "2",
        "--iters",
        "1",
        "--warmup",
        "0",
    ])?;
    let stderr = String::from_utf8(out.stderr)?;
    assert!(
        stderr.contains("INFO") && stderr.contains("loaded"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escapes in a pipe: {stderr:?}"
    );
    Ok(())
}

#[test]
fn bad_input_exits_nonzero_with_one_clear_line() -> Result<(), Box<dyn std::error::Error>> {
    let out = umtune(&["config", "--set", "model.dtype=f64"])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr)?;
    assert!(
        stderr.starts_with("error: config:") && stderr.contains("model.dtype"),
        "{stderr}"
    );
    assert!(!stderr.contains("Stack backtrace"), "{stderr}");
    let out = umtune(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "hi",
    ])?;
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)?.contains("/nonexistent/model.gguf"));
    Ok(())
}

#[test]
fn progress_bar_only_on_a_terminal() -> Result<(), Box<dyn std::error::Error>> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out_dir = common::fresh_dir("progress");
    let args = format!(
        "{bin} train {dir}/configs/default.toml --set model.source={dir}/tests/fixtures/llama-tiny-gguf/tiny.gguf \
         --set data.train_limit=32 --set data.eval_limit=8 --set train.max_steps=3 --set train.log_every=1 \
         --set run.output_dir={out}",
        bin = env!("CARGO_BIN_EXE_umtune"),
        out = out_dir.display()
    );
    // Under a pseudo-terminal (util-linux `script`) the bar is drawn with its fields.
    let tty = Command::new("script")
        .args(["-qec", &args, "/dev/null"])
        .env_remove("RUST_LOG")
        .output()?;
    let screen = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{screen}");
    assert!(
        screen.contains("/3 steps") && screen.contains("tok/s") && screen.contains("loss"),
        "{screen}"
    );
    // In a pipe: log lines, no bar.
    let piped = Command::new("sh")
        .args(["-c", &args])
        .env_remove("RUST_LOG")
        .output()?;
    let stderr = String::from_utf8(piped.stderr)?;
    assert!(piped.status.success(), "{stderr}");
    assert!(
        !stderr.contains("steps  loss") && !stderr.contains('\r'),
        "{stderr}"
    );
    assert!(
        stderr.contains("train") && stderr.contains("tokens_per_s"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn eval_mc_sampling_is_reproducible_and_plots_on_request() -> Result<(), Box<dyn std::error::Error>>
{
    let dir = env!("CARGO_MANIFEST_DIR");
    let out_dir = common::fresh_dir("mc");
    let model = format!("model.source={dir}/tests/fixtures/llama-tiny-gguf/tiny.gguf");
    let out = format!("run.output_dir={}", out_dir.display());
    let mut args = vec![
        "train",
        "configs/default.toml",
        "--set",
        &model,
        "--set",
        &out,
    ];
    for s in [
        "data.train_limit=32",
        "data.eval_limit=32",
        "train.max_steps=3",
        "uncertainty.enabled=true",
        "uncertainty.noise_scale=4",
    ] {
        args.extend(["--set", s]);
    }
    let trained = Command::new(env!("CARGO_BIN_EXE_umtune"))
        .current_dir(dir)
        .args(&args)
        .output()?;
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    let run = std::fs::read_dir(&out_dir)?
        .next()
        .ok_or("no run directory")??
        .path();
    let run = run.to_str().ok_or("path")?;
    let table = |extra: &[&str]| -> Result<String, Box<dyn std::error::Error>> {
        let mut a = vec!["eval", run];
        a.extend(extra);
        let o = umtune(&a)?;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Ok(String::from_utf8(o.stdout)?)
    };
    let plain = table(&[])?;
    let mc = table(&["--mc", "4"])?;
    assert_eq!(
        mc,
        table(&["--mc", "4"])?,
        "MC evaluation is seeded by the run"
    );
    assert_ne!(mc, plain, "--mc 4 changed nothing");
    let plots = out_dir.join("plots");
    table(&["--plots", plots.to_str().ok_or("path")?])?;
    assert!(plots.join("reliability.png").is_file() && plots.join("risk_coverage.png").is_file());
    // Without a usable font the pictures are skipped with a warning, and nothing half-drawn stays.
    let no_fonts = out_dir.join("no-fonts.conf");
    std::fs::write(
        &no_fonts,
        "<?xml version=\"1.0\"?><fontconfig></fontconfig>",
    )?;
    let bare = out_dir.join("bare");
    let o = Command::new(env!("CARGO_BIN_EXE_umtune"))
        .args(["eval", run, "--plots", bare.to_str().ok_or("path")?])
        .env("FONTCONFIG_FILE", &no_fonts)
        .env_remove("RUST_LOG")
        .output()?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && stderr.contains("calibration plots skipped"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&bare)?.count(),
        0,
        "a half-drawn picture was left"
    );
    // A run without uncertainty modeling has nothing to sample.
    let lora = Command::new(env!("CARGO_BIN_EXE_umtune"))
        .current_dir(dir)
        .args(&args[..6])
        .args(["--set", "data.train_limit=16", "--set", "train.max_steps=1"])
        .args(["--set", "run.name=plain"])
        .output()?;
    assert!(
        lora.status.success(),
        "{}",
        String::from_utf8_lossy(&lora.stderr)
    );
    let plain_run = out_dir.join("plain");
    let e = umtune(&["eval", plain_run.to_str().ok_or("path")?, "--mc", "4"])?;
    let stderr = String::from_utf8(e.stderr)?;
    assert!(
        !e.status.success() && stderr.contains("uncertainty.mc_predict"),
        "{stderr}"
    );
    Ok(())
}

fn tiny_train_args(out_dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let mut args: Vec<String> = vec![
        "train".into(),
        format!("{dir}/configs/default.toml"),
        "--set".into(),
        format!("model.source={dir}/tests/fixtures/llama-tiny-gguf/tiny.gguf"),
        "--set".into(),
        format!("run.output_dir={}", out_dir.display()),
        "--set".into(),
        "data.train_limit=32".into(),
        "--set".into(),
        "data.eval_limit=8".into(),
    ];
    for e in extra {
        args.extend(["--set".to_string(), e.to_string()]);
    }
    args
}

/// SIGTERM during training: the step finishes, the weights are saved, the process exits with
/// 128 + 15 and says where they are; eval then uses them, marked unfinished; predict refuses to
/// overwrite its input.
#[test]
fn sigterm_saves_and_the_run_stays_usable() -> Result<(), Box<dyn std::error::Error>> {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let out_dir = common::fresh_dir("sigterm");
    let args = tiny_train_args(&out_dir, &["train.max_steps=100000", "train.log_every=1"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_umtune"))
        .args(&args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    // Wait until training steps are logged, then ask it to stop.
    for line in lines.by_ref() {
        let line = line?;
        let stepping = line.contains("train") && line.contains("step=2");
        seen.push(line);
        if stepping {
            break;
        }
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    seen.extend(lines.map_while(Result::ok));
    let status = child.wait()?;
    let log = seen.join("\n");
    assert_eq!(status.code(), Some(143), "{log}");
    let last = seen.last().ok_or("no output")?;
    assert!(
        last.starts_with("error: interrupted by SIGTERM at step") && last.contains("saved in"),
        "{log}"
    );
    let run = std::fs::read_dir(&out_dir)?
        .next()
        .ok_or("no run directory")??
        .path();
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json"))?)?;
    assert_eq!(record["state"], "interrupted");
    assert_eq!(record["weights_step"], record["step"]);
    let run = run.to_str().ok_or("path")?;
    let eval = umtune(&["eval", run])?;
    let table = String::from_utf8(eval.stdout)?;
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    assert!(table.contains("unfinished run, weights of step"), "{table}");
    // predict --output equal to --input is refused and the input stays.
    let input = out_dir.join("texts.jsonl");
    std::fs::write(&input, "{\"text\": \"fine\"}\n")?;
    let same = input.to_str().ok_or("path")?;
    let p = umtune(&["predict", run, "--input", same, "--output", same])?;
    assert!(!p.status.success());
    assert!(String::from_utf8(p.stderr)?.contains("is the input file"));
    assert_eq!(std::fs::read_to_string(&input)?, "{\"text\": \"fine\"}\n");
    Ok(())
}

/// CUDA asked for where there is none: one config error line and exit code 2, no backtrace.
#[test]
fn cuda_without_cuda_is_a_config_error() -> Result<(), Box<dyn std::error::Error>> {
    if tch::Cuda::is_available() {
        return Ok(()); // this machine has CUDA: the request is valid here
    }
    let out_dir = common::fresh_dir("nocuda");
    let args = tiny_train_args(&out_dir, &["model.device=cuda"]);
    let out = Command::new(env!("CARGO_BIN_EXE_umtune"))
        .args(&args)
        .output()?;
    let stderr = String::from_utf8(out.stderr)?;
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: config: model.device = `cuda`"),
        "{stderr}"
    );
    Ok(())
}

/// `doctor` fails when what `make run` needs is missing; a closed stdout is no panic; with JSON
/// logs the final error is a JSON line too.
#[test]
fn doctor_pipes_and_json_errors() -> Result<(), Box<dyn std::error::Error>> {
    let out = Command::new(env!("CARGO_BIN_EXE_umtune"))
        .arg("doctor")
        .env("UMTUNE_CACHE", "/nonexistent-umtune-cache")
        .output()?;
    let stderr = String::from_utf8(out.stderr)?;
    assert!(
        !out.status.success(),
        "doctor passed without the default model"
    );
    assert!(
        stderr.contains("default model") && stderr.contains("default dataset"),
        "{stderr}"
    );
    assert!(String::from_utf8(out.stdout)?.contains("missing: run `make assets`"));
    // The reader of stdout is gone before umtune writes.
    let piped = Command::new("bash")
        .args([
            "-c",
            &format!(
                "set -o pipefail; {} config | true",
                env!("CARGO_BIN_EXE_umtune")
            ),
        ])
        .output()?;
    let stderr = String::from_utf8(piped.stderr)?;
    assert!(
        piped.status.success() && !stderr.contains("panicked"),
        "{stderr}"
    );
    let json = umtune(&["--log-format", "json", "config", "--set", "model.dtype=f64"])?;
    assert_eq!(json.status.code(), Some(2));
    let line: serde_json::Value = serde_json::from_slice(&json.stderr)?;
    assert_eq!(line["level"], "ERROR");
    assert!(
        line["message"]
            .as_str()
            .is_some_and(|m| m.contains("model.dtype")),
        "{line}"
    );
    Ok(())
}

/// A training split with one class trains, with a warning that says so.
#[test]
fn a_single_class_dataset_warns() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = common::fresh_dir("oneclass");
    let data = out_dir.join("data");
    std::fs::create_dir_all(&data)?;
    let rows: String = (0..8)
        .map(|i| format!("{{\"text\": \"text number {i}\", \"label\": \"pos\"}}\n"))
        .collect();
    for split in ["train", "validation"] {
        std::fs::write(data.join(format!("{split}.jsonl")), &rows)?;
    }
    let set = format!("data.dataset={}", data.display());
    let args = tiny_train_args(&out_dir, &[&set, "train.max_steps=1"]);
    let out = Command::new(env!("CARGO_BIN_EXE_umtune"))
        .args(&args)
        .env_remove("RUST_LOG")
        .output()?;
    let stderr = String::from_utf8(out.stderr)?;
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("only one class") && stderr.contains("train.jsonl"),
        "{stderr}"
    );
    Ok(())
}
