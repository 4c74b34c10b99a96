//! TensorBoard event files (`RUN/tb/`), read back by TensorBoard's own `EventAccumulator` (the
//! `tensorboard` package of the test virtualenv): every scalar tag and (step, value) equals what
//! `metrics.jsonl` holds (as TensorBoard's f32), and the pictures decode as the run's PNGs. A
//! resumed run's events replace what the first writer logged after the checkpoint.
mod common;
use common::process::python;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use umtune::config::PeftMethod;

/// Scalars by tag as (step, value), the value as the f32 TensorBoard keeps. Both sides are
/// compared as f32: they pass through JSON text (Python's exact repr, parsed by serde_json, which
/// may land an f64 one ulp off), and an f64 one ulp from an f32 rounds back to that f32.
type Scalars = BTreeMap<String, Vec<(i64, f32)>>;

/// What `EventAccumulator` reads from `tb`: the scalars; each image is written to
/// `images_out/TAG-STEP.png` and listed as (tag, step, width, height, file name).
fn accumulate(
    tb: &Path,
    images_out: &Path,
) -> Result<(Scalars, serde_json::Value), Box<dyn std::error::Error>> {
    const SCRIPT: &str = r#"
import json, os, sys
from tensorboard.backend.event_processing import event_accumulator as ea
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
acc.Reload()
tags = acc.Tags()
scalars = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]}
images = []
for t in tags["images"]:
    for e in acc.Images(t):
        name = t.replace("/", "_") + "-" + str(e.step) + ".png"
        with open(os.path.join(sys.argv[2], name), "wb") as f:
            f.write(e.encoded_image_string)
        images.append([t, e.step, e.width, e.height, name])
print(json.dumps({"scalars": scalars, "images": images}))
"#;
    std::fs::create_dir_all(images_out)?;
    let out = Command::new(python())
        .args(["-c", SCRIPT])
        .arg(tb)
        .arg(images_out)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let wide: BTreeMap<String, Vec<(i64, f64)>> = serde_json::from_value(v["scalars"].clone())?;
    let scalars = wide
        .into_iter()
        .map(|(t, pts)| (t, pts.into_iter().map(|(s, x)| (s, x as f32)).collect()))
        .collect();
    Ok((scalars, v["images"].clone()))
}

/// The scalars `metrics.jsonl` implies: a training line's numbers under `train/`, an
/// evaluation's under its split, nested keys joined by `/`, each as the f32 TensorBoard keeps.
fn expected(run: &Path) -> Result<Scalars, Box<dyn std::error::Error>> {
    fn flatten(prefix: String, v: &serde_json::Value, step: i64, out: &mut Scalars) {
        match v {
            serde_json::Value::Number(n) => {
                let x = n.as_f64().unwrap_or(f64::NAN) as f32;
                out.entry(prefix).or_default().push((step, x));
            }
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    flatten(format!("{prefix}/{k}"), v, step, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Scalars::new();
    for line in std::fs::read_to_string(run.join("metrics.jsonl"))?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let step = v["step"].as_i64().ok_or("step")?;
        match v["split"].as_str() {
            Some(split) => flatten(split.to_string(), &v["eval"], step, &mut out),
            None => {
                for (k, x) in v
                    .as_object()
                    .ok_or("object")?
                    .iter()
                    .filter(|(k, _)| *k != "step")
                {
                    flatten(format!("train/{k}"), x, step, &mut out);
                }
            }
        }
    }
    Ok(out)
}

#[test]
fn tensorboard_reads_what_metrics_jsonl_holds() -> TestResult {
    let mut cfg = tiny_config("tb", PeftMethod::Lora)?;
    cfg.uncertainty.enabled = true;
    cfg.train.max_steps = 6;
    cfg.train.log_every = 1;
    cfg.train.eval_every = 3;
    let s = train(&cfg)?;
    let (scalars, images) = accumulate(&s.run_dir.join("tb"), &s.run_dir.join("tb-images"))?;
    let want = expected(&s.run_dir)?;
    assert_eq!(
        scalars.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert_eq!(scalars, want);
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norms/lora",
        "train/probe/um.noise_to_feature",
        "validation/calibrated/ece",
        "test/accuracy",
    ] {
        assert!(scalars.contains_key(tag), "no {tag}");
    }
    assert_eq!(scalars["train/loss"].len(), 6);
    // Each picture of the run once, at the last step, the same bytes, a PNG that decodes.
    let images = images.as_array().ok_or("images")?;
    let tags: Vec<&str> = images.iter().filter_map(|i| i[0].as_str()).collect();
    assert_eq!(
        tags,
        [
            "calibration/reliability",
            "calibration/risk_coverage",
            "curves"
        ]
    );
    for (img, file) in images
        .iter()
        .zip(["reliability.png", "risk_coverage.png", "curves.png"])
    {
        assert_eq!(img[1], 6);
        let got = s
            .run_dir
            .join("tb-images")
            .join(img[4].as_str().ok_or("name")?);
        assert_eq!(std::fs::read(&got)?, std::fs::read(s.run_dir.join(file))?);
        let mut reader = png::Decoder::new(std::fs::File::open(&got)?).read_info()?;
        let mut buf = vec![0; reader.output_buffer_size()];
        let frame = reader.next_frame(&mut buf)?;
        assert_eq!(
            (img[2].as_u64(), img[3].as_u64()),
            (Some(frame.width.into()), Some(frame.height.into()))
        );
    }
    Ok(())
}

/// A run killed in step 6 after its step-4 checkpoint and resumed: TensorBoard shows each step once, with
/// the resumed run's values (the `SessionLog.START` at step 5 orphans the first writer's 5 and 6).
#[test]
fn a_resumed_run_logs_each_step_once() -> TestResult {
    let out = fresh_dir("tb-resume");
    let mut args = process::train_args(
        &out,
        "r",
        4,
        6,
        &["train.log_every=1", "checkpoint.every=4"],
    );
    args.extend(["--resume".into(), "auto".into()]);
    let first = Command::new(process::umtune_bin())
        .args(&args)
        .env("UMTUNE_TEST_ABORT_AT", "6:0")
        .output()?;
    assert!(
        !first.status.success(),
        "the fault did not stop the first run"
    );
    let second = Command::new(process::umtune_bin()).args(&args).output()?;
    process::check(&second, "resumed");
    let run = out.join("r");
    let (scalars, _) = accumulate(&run.join("tb"), &out.join("images"))?;
    assert_eq!(
        std::fs::read_dir(run.join("tb"))?.count(),
        2,
        "one file per writer"
    );
    assert_eq!(scalars, expected(&run)?);
    let steps: Vec<i64> = scalars["train/loss"].iter().map(|p| p.0).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    Ok(())
}
