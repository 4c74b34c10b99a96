//! `umtune export --format peft`: Hugging Face peft loads the adapter onto the transformers
//! model and predicts what `umtune predict` predicts, for a GPT-2 and a LLaMA fixture.
mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use umtune::config::Config;
use umtune::train::run_dir::{export_peft, load_run, predict};
use umtune::train::trainer::train;

const TEXTS: &[&str] = &[
    "the food was great",
    "Terrible service, never again.",
    "ok",
    "I loved the acting and the plot!",
];

fn peft_probabilities(
    base: &std::path::Path,
    adapter: &std::path::Path,
    ids: &[Vec<u32>],
) -> Result<Vec<Vec<f64>>, Box<dyn std::error::Error>> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peft_reference.py");
    let mut child = Command::new(python)
        .args([
            script,
            base.to_str().ok_or("path")?,
            adapter.to_str().ok_or("path")?,
            "2",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{python}: {e} (run `make test-venv`)"))?;
    child
        .stdin
        .take()
        .ok_or("stdin")?
        .write_all(serde_json::to_string(ids)?.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!(
            "peft_reference.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn peft_predictions_equal_umtune_predict() -> TestResult {
    for name in ["gpt2-tiny", "llama-tiny-untied"] {
        let base = fixture(name)?;
        let out = std::env::temp_dir().join(format!("umtune-export-{name}-{}", std::process::id()));
        let sets: Vec<String> = vec![
            format!("model.source={}", base.display()),
            "model.device=cpu".into(),
            "data.train_limit=64".into(),
            "data.eval_limit=16".into(),
            "train.max_steps=3".into(),
            "train.batch_size=8".into(),
            "train.lr=0.05".into(),
            "peft.dropout=0.0".into(),
            format!("run.output_dir={}", out.display()),
        ];
        let summary = train(&Config::load(None, &sets)?)?;
        let run = load_run(&summary.run_dir, &[])?;
        // Training moved the adapters away from B = 0, so the comparison covers them.
        let b_norm: f64 = run
            .model
            .trainable
            .variables()
            .iter()
            .filter(|(k, _)| k.contains("lora_B"))
            .map(|(_, t)| t.abs().sum(tch::Kind::Float).double_value(&[]))
            .sum();
        assert!(b_norm > 0.0, "{name}: lora_B still zero");
        let adapter = out.join("peft");
        export_peft(&run, &adapter)?;
        let texts: Vec<String> = TEXTS.iter().map(|s| s.to_string()).collect();
        let ours = predict(&run, &texts, 3)?;
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| run.model.tokenizer()?.encode(t))
            .collect::<Result<_, _>>()?;
        let theirs = peft_probabilities(&base, &adapter, &ids)?;
        for ((o, t), text) in ours.iter().zip(&theirs).zip(TEXTS) {
            for (a, b) in o.probabilities.iter().zip(t) {
                assert!(
                    (a - b).abs() < 1e-4,
                    "{name} {text:?}: umtune {:?} vs peft {t:?}",
                    o.probabilities
                );
            }
        }
    }
    Ok(())
}
