//! `umtune export --format peft`: Hugging Face peft loads the adapter onto the transformers
//! model and predicts what `umtune predict` predicts, for a GPT-2 and a LLaMA fixture.
mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use umtune::config::Config;
use umtune::train::export::export_peft;
use umtune::train::predict::predict;
use umtune::train::restore::load_run;

const TEXTS: &[&str] = &[
    "the food was great",
    "Terrible service, never again.",
    "ok",
    "I loved the acting and the plot!",
];

fn peft_probabilities<T: serde::de::DeserializeOwned>(
    base: &std::path::Path,
    adapter: &std::path::Path,
    ids: &[Vec<i64>],
    args: &[&str],
) -> Result<Vec<T>, Box<dyn std::error::Error>> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peft_reference.py");
    let mut child = Command::new(python)
        .args([
            script,
            base.to_str().ok_or("path")?,
            adapter.to_str().ok_or("path")?,
        ])
        .args(args)
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

/// Three LoRA steps on `base` (plus `extra` settings), written under `out`, and the run loaded
/// back as `eval`/`predict` see it.
fn short_lora_run(
    base: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> Result<
    (
        umtune::train::run_files::Summary,
        umtune::train::restore::LoadedRun,
    ),
    Box<dyn std::error::Error>,
> {
    let mut sets: Vec<String> = vec![
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
    sets.extend(extra.iter().map(|s| s.to_string()));
    let summary = train(&Config::load(None, &sets)?)?;
    let run = load_run(&summary.run_dir, &[])?;
    Ok((summary, run))
}

#[test]
fn peft_predictions_equal_umtune_predict() -> TestResult {
    for name in ["gpt2-tiny", "llama-tiny-untied"] {
        let base = fixture(name)?;
        let out = common::fresh_dir(&format!("export-{name}"));
        let (_, run) = short_lora_run(&base, &out, &[])?;
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
        let ids: Vec<Vec<i64>> = texts
            .iter()
            .map(|t| {
                Ok(run
                    .model
                    .tokenizer()?
                    .encode(t)?
                    .into_iter()
                    .map(i64::from)
                    .collect())
            })
            .collect::<Result<_, Box<dyn std::error::Error>>>()?;
        let theirs: Vec<Vec<f64>> = peft_probabilities(&base, &adapter, &ids, &["2"])?;
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

/// umtune's per-word predictions against a reference's per-token probabilities, read at each
/// word's first token (the tokens whose label is not IGNORE).
fn assert_word_probabilities(
    name: &str,
    ours: &[Vec<umtune::train::predict::Prediction>],
    theirs: &[Vec<Vec<f64>>],
    encoded: &[umtune::data::batching::Encoded],
    tol: f64,
) {
    for ((o, t), e) in ours.iter().zip(theirs).zip(encoded) {
        let first: Vec<&Vec<f64>> = t
            .iter()
            .zip(&e.token_labels)
            .filter(|(_, &l)| l != umtune::data::batching::IGNORE)
            .map(|(p, _)| p)
            .collect();
        assert_eq!(o.len(), first.len(), "{name}: one prediction per word");
        for (word, (a, b)) in o.iter().zip(first).enumerate() {
            for (x, y) in a.probabilities.iter().zip(b) {
                assert!((x - y).abs() < tol, "{name} word {word}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn ner_predictions_per_word_equal_peft_token_classification() -> TestResult {
    use umtune::data::batching::encode;
    use umtune::data::readers::Example;
    use umtune::train::predict::{predict_jsonl, predict_tags};
    let sentences: Vec<Vec<String>> = [
        "EU rejects German call to boycott British lamb .",
        "Peter Blackburn",
        "The European Commission said on Thursday it disagreed with German advice .",
    ]
    .iter()
    .map(|s| s.split(' ').map(String::from).collect())
    .collect();
    for name in ["gpt2-tiny", "llama-tiny-untied"] {
        let base = fixture(name)?;
        let out = common::fresh_dir(&format!("ner-{name}"));
        let ner = [
            "data.dataset=conll2003",
            "data.task=ner",
            "data.max_length=48",
        ];
        let (summary, run) = short_lora_run(&base, &out, &ner)?;
        let adapter = out.join("peft");
        export_peft(&run, &adapter)?;
        let ours = predict_tags(&run, &sentences, 2)?;
        let tok = run.model.tokenizer()?;
        let examples: Vec<Example> = sentences
            .iter()
            .map(|w| Example::Tagged {
                tokens: w.clone(),
                tags: vec![0; w.len()],
            })
            .collect();
        let encoded = encode(tok, &examples, run.config.data.max_length)?;
        let ids: Vec<Vec<i64>> = encoded.iter().map(|e| e.ids.clone()).collect();
        let n = summary.label_names.len().to_string();
        let theirs: Vec<Vec<Vec<f64>>> = peft_probabilities(&base, &adapter, &ids, &[&n, "token"])?;
        assert_word_probabilities(name, &ours, &theirs, &encoded, 1e-4);
        // The CLI path: JSONL with a word list or a text, tags and probabilities per word.
        let input = out.join("in.jsonl");
        std::fs::write(
            &input,
            "{\"tokens\": [\"Peter\", \"Blackburn\"]}\n{\"text\": \"EU rejects German call\"}\n",
        )?;
        let output = out.join("out.jsonl");
        assert_eq!(predict_jsonl(&run, &input, &output)?, 2);
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(lines[0]["tags"].as_array().map(Vec::len), Some(2));
        assert_eq!(lines[1]["tokens"].as_array().map(Vec::len), Some(4));
        assert_eq!(lines[1]["tags"][2], serde_json::json!(ours[0][2].label));
        let sum: f64 = lines[1]["tag_probabilities"][0]
            .as_array()
            .ok_or("probabilities")?
            .iter()
            .filter_map(|p| p.as_f64())
            .sum();
        assert!((sum - 1.0).abs() < 1e-9);
    }
    Ok(())
}

/// What transformers alone makes of a merged export: per example the probabilities (per token
/// with `token`), the tokenizer's ids of each text, and the config's labels and class.
fn merged_reference(
    model: &std::path::Path,
    ids: &[Vec<i64>],
    texts: &[&str],
    token: bool,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/merged_reference.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(model)
        .args(token.then_some("token"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let request = serde_json::json!({"ids": ids, "texts": texts});
    child
        .stdin
        .take()
        .ok_or("stdin")?
        .write_all(request.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!(
            "merged_reference.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn token_ids(
    run: &umtune::train::restore::LoadedRun,
    texts: &[&str],
) -> Result<Vec<Vec<i64>>, Box<dyn std::error::Error>> {
    texts
        .iter()
        .map(|t| {
            Ok(run
                .model
                .tokenizer()?
                .encode(t)?
                .into_iter()
                .map(i64::from)
                .collect())
        })
        .collect()
}

/// The merged model's probabilities equal `umtune predict`'s within 1e-5: both compute in f32
/// from the same weights, umtune as `W x + s B (A x)` and transformers as `(W + s B A) x`, which
/// differ by rounding (a few 1e-7 relative per product) through two tiny blocks — orders of
/// magnitude under 1e-5 on probabilities.
const MERGED_TOLERANCE: f64 = 1e-5;

/// `umtune export --format merged` of a classification run on a GPT-2, a LLaMA and a GGUF LLaMA
/// base: transformers' AutoModelForSequenceClassification loads it without peft and predicts what
/// `umtune predict` predicts; its tokenizer gives umtune's ids; labels and class are in
/// config.json; a forced small shard size gives shards and an index that load the same.
#[test]
fn merged_export_loads_in_transformers_and_predicts_the_same() -> TestResult {
    use umtune::train::export_merged::export_merged;
    let gguf = fixture("llama-tiny-gguf")?.join("tiny.gguf");
    for (name, base) in [
        ("gpt2-tiny", fixture("gpt2-tiny")?),
        ("llama-tiny-untied", fixture("llama-tiny-untied")?),
        ("llama-tiny-gguf", gguf),
    ] {
        let out = common::fresh_dir(&format!("merged-{name}"));
        let (summary, run) = short_lora_run(&base, &out, &[])?;
        let texts: Vec<String> = TEXTS.iter().map(|s| s.to_string()).collect();
        let ours = predict(&run, &texts, 3)?;
        let ids = token_ids(&run, TEXTS)?;
        for (shard, dir) in [(5u64 << 30, "merged"), (40 << 10, "sharded")] {
            let model = out.join(dir);
            let files = export_merged(&run, &model, false, shard)?;
            let sharded = files.iter().any(|f| f.ends_with(".index.json"));
            assert_eq!(sharded, dir == "sharded", "{name}: {files:?}");
            let theirs = merged_reference(&model, &ids, TEXTS, false)?;
            let class = theirs["class"].as_str().unwrap_or("");
            assert!(
                class.ends_with("ForSequenceClassification"),
                "{name}: {class}"
            );
            for (i, label) in summary.label_names.iter().enumerate() {
                assert_eq!(theirs["id2label"][i.to_string()], *label, "{name}");
            }
            assert_eq!(
                theirs["tokenized"],
                serde_json::json!(ids),
                "{name}: tokenizer"
            );
            for ((o, t), text) in ours
                .iter()
                .zip(theirs["probabilities"].as_array().ok_or("probs")?)
                .zip(TEXTS)
            {
                let t: Vec<f64> = serde_json::from_value(t.clone())?;
                for (a, b) in o.probabilities.iter().zip(&t) {
                    assert!(
                        (a - b).abs() < MERGED_TOLERANCE,
                        "{name} {dir} {text:?}: umtune {:?} vs transformers {t:?}",
                        o.probabilities
                    );
                }
            }
        }
    }
    Ok(())
}

/// The same for NER: AutoModelForTokenClassification's per-token probabilities at each word's
/// first token equal `umtune predict`'s per word.
#[test]
fn merged_ner_export_loads_as_a_token_classifier() -> TestResult {
    use umtune::data::batching::encode;
    use umtune::data::readers::Example;
    use umtune::train::export_merged::export_merged;
    use umtune::train::predict::predict_tags;
    let sentences: Vec<Vec<String>> = [
        "EU rejects German call to boycott British lamb .",
        "Peter Blackburn",
    ]
    .iter()
    .map(|s| s.split(' ').map(String::from).collect())
    .collect();
    for name in ["gpt2-tiny", "llama-tiny-untied"] {
        let base = fixture(name)?;
        let out = common::fresh_dir(&format!("merged-ner-{name}"));
        let ner = [
            "data.dataset=conll2003",
            "data.task=ner",
            "data.max_length=48",
        ];
        let (_, run) = short_lora_run(&base, &out, &ner)?;
        let model = out.join("merged");
        export_merged(&run, &model, false, 5 << 30)?;
        let ours = predict_tags(&run, &sentences, 2)?;
        let examples: Vec<Example> = sentences
            .iter()
            .map(|w| Example::Tagged {
                tokens: w.clone(),
                tags: vec![0; w.len()],
            })
            .collect();
        let encoded = encode(
            run.model.tokenizer()?,
            &examples,
            run.config.data.max_length,
        )?;
        let ids: Vec<Vec<i64>> = encoded.iter().map(|e| e.ids.clone()).collect();
        let theirs = merged_reference(&model, &ids, &[], true)?;
        assert!(theirs["class"]
            .as_str()
            .unwrap_or("")
            .ends_with("ForTokenClassification"));
        let probs: Vec<Vec<Vec<f64>>> = serde_json::from_value(theirs["probabilities"].clone())?;
        assert_word_probabilities(name, &ours, &probs, &encoded, MERGED_TOLERANCE);
    }
    Ok(())
}

/// A run with uncertainty modeling: the merged export is refused, naming what would be lost and
/// the flag; with `--drop-method-modules` it is written.
#[test]
fn merged_export_refuses_what_transformers_cannot_carry() -> TestResult {
    use umtune::train::export_merged::export_merged;
    let out = common::fresh_dir("merged-um");
    let (_, run) = short_lora_run(&fixture("gpt2-tiny")?, &out, &["uncertainty.enabled=true"])?;
    let e = export_merged(&run, &out.join("m"), false, 5 << 30)
        .err()
        .ok_or("not refused")?;
    let msg = e.to_string();
    assert!(
        msg.contains("uncertainty modeling") && msg.contains("--drop-method-modules"),
        "{msg}"
    );
    assert!(!out.join("m").join("model.safetensors").exists());
    let files = export_merged(&run, &out.join("m"), true, 5 << 30)?;
    assert!(files.contains(&"model.safetensors".to_string()));
    Ok(())
}

/// An (IA)^3 run folds into the weights it scales (rows and bias, or a feed-forward layer's input
/// columns; Conv1D transposed): transformers predicts what `umtune predict` predicts. (The tiny
/// GPT-2's biases are zero, as transformers initializes them, so the bias fold is not exercised
/// here.)
#[test]
fn merged_ia3_export_predicts_the_same() -> TestResult {
    use umtune::train::export_merged::export_merged;
    for name in ["gpt2-tiny", "llama-tiny-untied"] {
        let out = common::fresh_dir(&format!("merged-ia3-{name}"));
        let (_, run) = short_lora_run(&fixture(name)?, &out, &["peft.method=ia3"])?;
        // Training moved the vectors away from their ones, so the fold is exercised.
        let moved: f64 = run
            .model
            .trainable
            .variables()
            .iter()
            .filter(|(k, _)| k.ends_with("ia3_l"))
            .map(|(_, t)| (t - 1.0).abs().sum(tch::Kind::Float).double_value(&[]))
            .sum();
        assert!(moved > 0.0, "{name}: ia3_l still ones");
        let model = out.join("merged");
        export_merged(&run, &model, false, 5 << 30)?;
        let texts: Vec<String> = TEXTS.iter().map(|s| s.to_string()).collect();
        let ours = predict(&run, &texts, 3)?;
        let theirs = merged_reference(&model, &token_ids(&run, TEXTS)?, TEXTS, false)?;
        let probs: Vec<Vec<f64>> = serde_json::from_value(theirs["probabilities"].clone())?;
        for (o, t) in ours.iter().zip(&probs) {
            for (a, b) in o.probabilities.iter().zip(t) {
                assert!(
                    (a - b).abs() < MERGED_TOLERANCE,
                    "{name}: {:?} vs {t:?}",
                    o.probabilities
                );
            }
        }
    }
    Ok(())
}
