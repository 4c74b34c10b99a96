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
    let config = Config::load(Some(&dir.join("config.toml")), overrides)?;
    let summary_path = dir.join("summary.json");
    let summary = read_json(&summary_path)?;
    let label_names: Vec<String> = serde_json::from_value(summary["label_names"].clone())
        .map_err(|e| Error::format(&summary_path, format!("label_names: {e}")))?;
    let (model, device) = TaskModel::build(&config, label_names.len())?;
    load_named(model.trained_vars(), &dir.join("trainable.safetensors"))?;
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
    let adapter_config = json!({
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": cfg.model.source,
        "r": cfg.peft.r,
        "lora_alpha": cfg.peft.alpha,
        "lora_dropout": cfg.peft.dropout,
        "use_rslora": cfg.peft.rslora,
        "target_modules": targets,
        "modules_to_save": ["score"],
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
}

/// Class probabilities for `texts`, in batches of `batch_size` (same truncation as training).
pub fn predict(run: &LoadedRun, texts: &[String], batch_size: usize) -> Result<Vec<Prediction>> {
    use crate::data::batching::{collate, encode};
    use crate::data::readers::Example;
    let examples: Vec<Example> = texts
        .iter()
        .map(|t| Example::Text {
            text: t.clone(),
            label: 0,
        })
        .collect();
    let tok = run.model.tokenizer()?;
    let encoded = encode(tok, &examples, run.config.data.max_length)?;
    let pad = tok.padding_id();
    run.model.training.set(false);
    let _g = tch::no_grad_guard();
    let mut out = Vec::with_capacity(texts.len());
    for chunk in encoded.chunks(batch_size.max(1)) {
        let items: Vec<_> = chunk.iter().collect();
        let batch = collate(&items, pad, run.device);
        let probs = run
            .model
            .logits(&batch.input_ids, &batch.attention_mask)
            .softmax(-1, tch::Kind::Double);
        let rows: Vec<Vec<f64>> = Vec::<Vec<f64>>::try_from(probs.to_device(Device::Cpu))
            .map_err(|e| Error::Config(e.to_string()))?;
        for p in rows {
            let label_id = p
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap_or(0);
            out.push(Prediction {
                label: run.label_names.get(label_id).cloned().unwrap_or_default(),
                label_id,
                probabilities: p,
            });
        }
    }
    Ok(out)
}
