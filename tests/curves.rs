//! Training curves: `curves.png` in every run directory, drawn from exactly what `metrics.jsonl`
//! holds, smoothed as TensorBoard smooths, and one picture of several runs from `umtune report`.
mod common;
use common::*;
use std::path::Path;
use umtune::config::PeftMethod;
use umtune::train::curves::{read_curves, smooth, CURVES_FILE};

/// The picture's (width, height) after decoding every row (the png crate checks the chunks' CRCs
/// and the zlib stream); fails on a truncated or corrupt file.
fn decoded_size(path: &Path) -> Result<(u32, u32), Box<dyn std::error::Error>> {
    let decoder = png::Decoder::new(std::fs::File::open(path)?);
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf)?;
    // Not one colour: something was drawn on the white canvas.
    let bytes = &buf[..frame.buffer_size()];
    assert!(
        bytes.iter().any(|&b| b != bytes[0]),
        "{} is blank",
        path.display()
    );
    Ok((frame.width, frame.height))
}

#[test]
fn smoothing_is_a_debiased_moving_average() {
    // Constant input stays constant from the first point on (the debiasing).
    let flat: Vec<(f64, f64)> = (1..=5).map(|s| (s as f64, 2.5)).collect();
    for (x, y) in smooth(&flat, 0.9) {
        assert!((y - 2.5).abs() < 1e-12, "step {x}: {y}");
    }
    // Weight 0.5 over [1, 3]: the weighted mean (0.5 * 1 + 1 * 3) / 1.5; NaN is skipped.
    let s = smooth(&[(1.0, 1.0), (2.0, f64::NAN), (3.0, 3.0)], 0.5);
    assert_eq!(s.len(), 2);
    assert!((s[1].1 - 3.5 / 1.5).abs() < 1e-12, "{s:?}");
}

#[test]
fn every_run_draws_its_curves_from_its_log() -> TestResult {
    let mut cfg = tiny_config("curves", PeftMethod::Lora)?;
    cfg.train.max_steps = 6;
    cfg.train.log_every = 1;
    cfg.train.eval_every = 3;
    let s = train(&cfg)?;
    let c = read_curves(&s.run_dir)?;
    let log = std::fs::read_to_string(s.run_dir.join("metrics.jsonl"))?;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let train: Vec<(f64, f64)> = lines
        .iter()
        .filter(|v| v.get("split").is_none())
        .map(|v| {
            (
                v["step"].as_f64().unwrap_or(-1.0),
                v["loss"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect();
    assert_eq!(c.loss, train);
    assert_eq!(c.loss.len(), 6);
    let val: Vec<f64> = lines
        .iter()
        .filter(|v| v["split"] == "validation")
        .map(|v| v["step"].as_f64().unwrap_or(-1.0))
        .collect();
    assert_eq!(c.val_accuracy.iter().map(|p| p.0).collect::<Vec<_>>(), val);
    assert!(val.len() >= 2, "evaluations at 3 and 6: {val:?}");
    let png = s.run_dir.join(CURVES_FILE);
    assert!(
        std::fs::metadata(&png)?.len() > 20_000,
        "{} is too small",
        png.display()
    );
    assert_eq!(decoded_size(&png)?, (1000, 760));
    Ok(())
}

#[test]
fn report_draws_every_runs_curves() -> TestResult {
    let base = tiny_config("curves-report", PeftMethod::Lora)?;
    for seed in [1, 2] {
        let mut c = base.clone();
        c.run.seed = seed;
        c.run.name = format!("lora-s{seed}");
        train(&c)?;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_umtune"))
        .args(["report", &base.run.output_dir])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = Path::new(&base.run.output_dir).join(CURVES_FILE);
    assert!(String::from_utf8(out.stdout)?.contains(&format!("plot: {}", png.display())));
    assert_eq!(decoded_size(&png)?, (1000, 380));
    Ok(())
}
