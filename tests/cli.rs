//! The `umtune` binary as a user runs it: logging formats, exit codes and error messages.
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
    let out_dir = std::env::temp_dir().join(format!("umtune-progress-{}", std::process::id()));
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
    let out_dir = std::env::temp_dir().join(format!("umtune-mc-{}", std::process::id()));
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
