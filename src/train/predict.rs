//! `umtune predict`: labels and probabilities for new texts (or per-word tags for NER) from a
//! run, through the same inference loop as evaluation ([`super::eval::outputs`]). Inputs get
//! ids that no memory entry has, so the external memory reads for them exactly as it does for
//! evaluation examples.
use super::eval::outputs;
use super::restore::LoadedRun;
use crate::atomic_file::write_atomic;
use crate::config::TaskKind;
use crate::data::batching::encode;
use crate::data::dataset::ids;
use crate::data::readers::{read_text, Example};
use crate::error::{Error, Loc, Result};
use crate::uncertainty::metrics::{argmax, softmax};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// One prediction: the label, its index and the probability of every label.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    pub label: String,
    pub label_id: usize,
    pub probabilities: Vec<f64>,
    /// The probabilities at the run's fitted temperature (the label is the same).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibrated: Option<Vec<f64>>,
}

impl Prediction {
    fn from_logits(logits: &[f64], label_names: &[String], temperature: Option<f64>) -> Self {
        let probabilities = softmax(logits, 1.0);
        let label_id = argmax(&probabilities);
        Prediction {
            label: label_names[label_id].clone(),
            label_id,
            probabilities,
            calibrated: temperature.map(|t| softmax(logits, t)),
        }
    }
}

/// Per-unit predictions of `examples` (one per example, or one per word that fits after
/// truncation for NER).
fn unit_predictions(
    run: &LoadedRun,
    examples: &[Example],
    batch_size: usize,
) -> Result<Vec<Vec<Prediction>>> {
    let mut encoded = encode(run.model.tokenizer()?, examples, run.config.data.max_length)?;
    for e in &mut encoded {
        e.id += ids::PREDICT;
    }
    let out = outputs(&run.model, &encoded, batch_size)?;
    let t = run.model.temperature;
    Ok(out
        .logits
        .iter()
        .map(|rows| {
            rows.iter()
                .map(|z| Prediction::from_logits(z, &run.label_names, t))
                .collect()
        })
        .collect())
}

/// Class probabilities for `texts` (sequence classification).
pub fn predict(run: &LoadedRun, texts: &[String], batch_size: usize) -> Result<Vec<Prediction>> {
    let examples: Vec<Example> = texts
        .iter()
        .map(|t| Example::Text {
            text: t.clone(),
            label: 0,
        })
        .collect();
    unit_predictions(run, &examples, batch_size)?
        .into_iter()
        .map(|mut rows| {
            rows.pop()
                .ok_or_else(|| Error::Internal("a text without a prediction".into()))
        })
        .collect()
}

/// Per-word tags for `sentences` (NER): one prediction per word that fits in
/// `data.max_length` tokens (later words are cut, as in training).
pub fn predict_tags(
    run: &LoadedRun,
    sentences: &[Vec<String>],
    batch_size: usize,
) -> Result<Vec<Vec<Prediction>>> {
    let examples: Vec<Example> = sentences
        .iter()
        .map(|words| Example::Tagged {
            tokens: words.clone(),
            tags: vec![0; words.len()],
        })
        .collect();
    unit_predictions(run, &examples, batch_size)
}

/// The same file, however it is spelled (the output may not exist yet).
fn same_file(a: &Path, b: &Path) -> bool {
    let resolve = |p: &Path| -> Option<PathBuf> {
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some(parent.canonicalize().ok()?.join(p.file_name()?))
    };
    resolve(a).is_some_and(|x| Some(x) == resolve(b))
}

/// `umtune predict`'s arguments.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    pub run_dir: std::path::PathBuf,
    #[arg(long)]
    pub input: std::path::PathBuf,
    #[arg(long)]
    pub output: std::path::PathBuf,
    /// Average N stochastic passes (MC sampling; runs with uncertainty modeling).
    #[arg(long, value_name = "N")]
    pub mc: Option<i64>,
}

/// Loads the run and predicts `args.input` into `args.output`; returns the examples predicted.
pub fn predict_file(args: &PredictArgs) -> Result<usize> {
    let overrides: Vec<String> = args
        .mc
        .map(|n| format!("uncertainty.mc_predict={n}"))
        .into_iter()
        .collect();
    let run = super::restore::load_run(&args.run_dir, &overrides)?;
    predict_jsonl(&run, &args.input, &args.output)
}

/// `umtune predict`: reads JSONL (the text column, or for NER the tokens column as a list of
/// words or the text column split on whitespace), writes each line back with the predictions
/// added: `label`, `label_id`, `probabilities`; for NER `tokens`, `tags`, `tag_probabilities`.
pub fn predict_jsonl(run: &LoadedRun, input: &Path, output: &Path) -> Result<usize> {
    if same_file(input, output) {
        return Err(Error::Config(format!(
            "predict --output {} is the input file: choose another path (the input would be lost)",
            output.display()
        )));
    }
    let d = &run.config.data;
    let ner = d.task == TaskKind::Ner;
    let text = read_text(input)?;
    let mut rows: Vec<(Value, Vec<String>)> = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let loc = Some(Loc::Line(i + 1));
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::data(input, loc, None, format!("invalid JSON: {e}")))?;
        let words = match (ner, v.get(&d.tokens_column), v.get(&d.text_column)) {
            (true, Some(Value::Array(a)), _) => a
                .iter()
                .map(|w| w.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Error::data(input, loc, Some(&d.tokens_column), "words must be strings")
                })?,
            (true, _, Some(Value::String(t))) => t.split_whitespace().map(String::from).collect(),
            (false, _, Some(Value::String(t))) => vec![t.clone()],
            _ => {
                let want = if ner {
                    format!(
                        "a list `{}` or a string `{}`",
                        d.tokens_column, d.text_column
                    )
                } else {
                    format!("a string `{}`", d.text_column)
                };
                return Err(Error::data(input, loc, None, format!("needs {want}")));
            }
        };
        rows.push((v, words));
    }
    let bs = run.config.train.eval_batch_size();
    let calibrated = run.model.temperature.is_some();
    let mut out = String::new();
    if ner {
        let sentences: Vec<Vec<String>> = rows.iter().map(|(_, w)| w.clone()).collect();
        for ((mut v, words), tags) in rows.into_iter().zip(predict_tags(run, &sentences, bs)?) {
            v["tokens"] = json!(words);
            v["tags"] = json!(tags.iter().map(|p| &p.label).collect::<Vec<_>>());
            v["tag_probabilities"] =
                json!(tags.iter().map(|p| &p.probabilities).collect::<Vec<_>>());
            if calibrated {
                v["calibrated_tag_probabilities"] =
                    json!(tags.iter().map(|p| &p.calibrated).collect::<Vec<_>>());
            }
            out.push_str(&format!("{v}\n"));
        }
    } else {
        let texts: Vec<String> = rows.iter().map(|(_, w)| w[0].clone()).collect();
        for ((mut v, _), p) in rows.into_iter().zip(predict(run, &texts, bs)?) {
            v["label"] = p.label.into();
            v["label_id"] = p.label_id.into();
            v["probabilities"] = p.probabilities.into();
            if let Some(c) = p.calibrated {
                v["calibrated_probabilities"] = c.into();
            }
            out.push_str(&format!("{v}\n"));
        }
    }
    write_atomic(output, out.as_bytes())?;
    Ok(out.lines().count())
}
