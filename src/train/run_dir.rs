//! A finished run directory brought back to life (for `eval` and `predict`), and its export as a
//! Hugging Face PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`, the head as
//! `modules_to_save`) that `PeftModel.from_pretrained` loads onto the matching transformers model.
use super::trainer::{write_atomic, TaskModel};
use crate::config::{Config, PeftMethod};
use crate::error::{Error, Result};
use crate::models::ArchConfig;
use crate::peft::{load_named, PEFT_PREFIX};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

pub struct LoadedRun {
    pub dir: PathBuf,
    pub config: Config,
    pub label_names: Vec<String>,
    pub model: TaskModel,
    pub device: Device,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
}

/// The run's resolved config, its label names, and the model with the trained weights.
pub fn load_run(dir: &Path, overrides: &[String]) -> Result<LoadedRun> {
    // The run's own memory file supersedes the prebuilt one it may have started from.
    let mut overrides = overrides.to_vec();
    overrides.push("memory.prebuilt=".into());
    let config = Config::load(Some(&dir.join("config.toml")), &overrides)?;
    let summary_path = dir.join("summary.json");
    let summary = read_json(&summary_path)?;
    let label_names: Vec<String> = serde_json::from_value(summary["label_names"].clone())
        .map_err(|e| Error::format(&summary_path, format!("label_names: {e}")))?;
    let (mut model, device) = TaskModel::build(&config, label_names.len())?;
    // MC sampling at prediction draws from the global generator: same run, same numbers.
    tch::manual_seed(config.run.seed as i64);
    load_named(model.trained_vars(), &dir.join("trainable.safetensors"))?;
    if let Some(m) = &model.memory {
        m.load(&dir.join("memory.safetensors"), false)?;
    }
    let calibration = dir.join("calibration.json");
    if calibration.exists() {
        let c = read_json(&calibration)?;
        let t = c["temperature"]
            .as_f64()
            .filter(|t| *t > 0.0)
            .ok_or_else(|| {
                Error::format(&calibration, "`temperature` must be a positive number")
            })?;
        model.temperature = Some(t);
    }
    Ok(LoadedRun {
        dir: dir.to_path_buf(),
        config,
        label_names,
        model,
        device,
    })
}

/// Writes `out/adapter_config.json` and `out/adapter_model.safetensors` for a LoRA run.
pub fn export_peft(run: &LoadedRun, out: &Path) -> Result<()> {
    let cfg = &run.config;
    if cfg.peft.method != PeftMethod::Lora {
        return Err(Error::Config(format!(
            "{}: peft.method = {:?} has no PEFT adapter format; export needs a LoRA run",
            run.dir.display(),
            cfg.peft.method
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut named: Vec<(String, Tensor)> = run
        .model
        .trainable
        .variables()
        .into_iter()
        .map(|(k, v)| (format!("{PEFT_PREFIX}{k}"), v))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let weights = out.join("adapter_model.safetensors");
    let tmp = weights.with_extension("tmp");
    Tensor::write_safetensors(&named, &tmp).map_err(|e| Error::format(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;
    let mut targets: Vec<String> = named
        .iter()
        .filter_map(|(k, _)| {
            k.strip_suffix(".lora_A.weight")
                .and_then(|m| m.rsplit('.').next())
                .map(String::from)
        })
        .collect();
    targets.sort();
    targets.dedup();
    let gpt2 = matches!(run.model.backbone.arch(), ArchConfig::Gpt2(_));
    let ner = cfg.data.task == crate::config::TaskKind::Ner;
    // The head's module, as GPT2/LlamaFor{Sequence,Token}Classification name it.
    let head = if ner && gpt2 { "classifier" } else { "score" };
    let adapter_config = json!({
        "peft_type": "LORA",
        "task_type": if ner { "TOKEN_CLS" } else { "SEQ_CLS" },
        "base_model_name_or_path": cfg.model.source,
        "r": cfg.peft.r,
        "lora_alpha": cfg.peft.alpha,
        "lora_dropout": cfg.peft.dropout,
        "use_rslora": cfg.peft.rslora,
        "target_modules": targets,
        "modules_to_save": [head],
        // GPT-2's Conv1D stores weights (in, out).
        "fan_in_fan_out": gpt2,
        "bias": "none",
        "inference_mode": true,
        "init_lora_weights": true,
    });
    let text =
        serde_json::to_string_pretty(&adapter_config).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(&out.join("adapter_config.json"), text.as_bytes())
}

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
    fn from_logits(logits: Vec<f64>, label_names: &[String], temperature: Option<f64>) -> Self {
        use crate::uncertainty::metrics::softmax;
        let probabilities = softmax(&logits, 1.0);
        let label_id = probabilities
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        Prediction {
            label: label_names.get(label_id).cloned().unwrap_or_default(),
            label_id,
            probabilities,
            calibrated: temperature.map(|t| softmax(&logits, t)),
        }
    }
}

/// Per-unit class logits of `examples` (one row per example, or one per word that fits
/// after truncation for NER), in batches of `batch_size` with the training truncation.
fn unit_logits(
    run: &LoadedRun,
    examples: &[crate::data::readers::Example],
    batch_size: usize,
) -> Result<Vec<Vec<Vec<f64>>>> {
    use crate::data::batching::{collate, encode, IGNORE};
    let tok = run.model.tokenizer()?;
    let encoded = encode(tok, examples, run.config.data.max_length)?;
    let pad = tok.padding_id();
    run.model.training.set(false);
    let _g = tch::no_grad_guard();
    let mut out = Vec::with_capacity(examples.len());
    for chunk in encoded.chunks(batch_size.max(1)) {
        let items: Vec<_> = chunk.iter().collect();
        let batch = collate(&items, pad, run.device);
        let probs = run
            .model
            .predictive_logits(
                &batch.input_ids,
                &batch.attention_mask,
                Some(&batch.example_ids),
            )?
            .to_kind(tch::Kind::Double)
            .to_device(Device::Cpu);
        for (k, e) in chunk.iter().enumerate() {
            let p = probs.get(k as i64);
            let rows: Vec<Vec<f64>> = if e.token_labels.is_empty() {
                vec![Vec::<f64>::try_from(p).map_err(|e| Error::Config(e.to_string()))?]
            } else {
                // First sub-token of each word: where the encoder put the word's tag.
                let all = Vec::<Vec<f64>>::try_from(p).map_err(|e| Error::Config(e.to_string()))?;
                e.token_labels
                    .iter()
                    .zip(all)
                    .filter(|(&l, _)| l != IGNORE)
                    .map(|(_, row)| row)
                    .collect()
            };
            out.push(rows);
        }
    }
    Ok(out)
}

/// Class probabilities for `texts` (sequence classification).
pub fn predict(run: &LoadedRun, texts: &[String], batch_size: usize) -> Result<Vec<Prediction>> {
    use crate::data::readers::Example;
    let examples: Vec<Example> = texts
        .iter()
        .map(|t| Example::Text {
            text: t.clone(),
            label: 0,
        })
        .collect();
    let t = run.model.temperature;
    Ok(unit_logits(run, &examples, batch_size)?
        .into_iter()
        .map(|mut rows| Prediction::from_logits(rows.remove(0), &run.label_names, t))
        .collect())
}

/// Per-word tags for `sentences` (NER): one prediction per word that fits in
/// `data.max_length` tokens (later words are cut, as in training).
pub fn predict_tags(
    run: &LoadedRun,
    sentences: &[Vec<String>],
    batch_size: usize,
) -> Result<Vec<Vec<Prediction>>> {
    use crate::data::readers::Example;
    let examples: Vec<Example> = sentences
        .iter()
        .map(|words| Example::Tagged {
            tokens: words.clone(),
            tags: vec![0; words.len()],
        })
        .collect();
    let t = run.model.temperature;
    Ok(unit_logits(run, &examples, batch_size)?
        .into_iter()
        .map(|rows| {
            rows.into_iter()
                .map(|z| Prediction::from_logits(z, &run.label_names, t))
                .collect()
        })
        .collect())
}

/// `umtune predict`: reads JSONL (the text column, or for NER the tokens column as a list of
/// words or the text column split on whitespace), writes each line back with the predictions
/// added: `label`, `label_id`, `probabilities`; for NER `tokens`, `tags`, `tag_probabilities`.
pub fn predict_jsonl(run: &LoadedRun, input: &Path, output: &Path) -> Result<usize> {
    let d = &run.config.data;
    let ner = d.task == crate::config::TaskKind::Ner;
    let text = std::fs::read_to_string(input).map_err(|e| Error::io(input, e))?;
    let mut rows: Vec<(Value, Vec<String>)> = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row = i + 1;
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::data(input, Some(row), None, format!("invalid JSON: {e}")))?;
        let words = match (ner, v.get(&d.tokens_column), v.get(&d.text_column)) {
            (true, Some(Value::Array(a)), _) => a
                .iter()
                .map(|w| w.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Error::data(
                        input,
                        Some(row),
                        Some(&d.tokens_column),
                        "words must be strings",
                    )
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
                return Err(Error::data(input, Some(row), None, format!("needs {want}")));
            }
        };
        rows.push((v, words));
    }
    let bs = run.config.train.batch_size * 2;
    let mut out = String::new();
    if ner {
        let sentences: Vec<Vec<String>> = rows.iter().map(|(_, w)| w.clone()).collect();
        for ((mut v, words), tags) in rows.into_iter().zip(predict_tags(run, &sentences, bs)?) {
            v["tokens"] = json!(words);
            v["tags"] = json!(tags.iter().map(|p| &p.label).collect::<Vec<_>>());
            v["tag_probabilities"] =
                json!(tags.iter().map(|p| &p.probabilities).collect::<Vec<_>>());
            if run.model.temperature.is_some() {
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
