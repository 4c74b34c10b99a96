//! `umtune export --format merged`: a run as a Hugging Face model directory that
//! `AutoModelForSequenceClassification` / `AutoModelForTokenClassification` (and servers that read
//! that layout) load without peft: `config.json` (the architecture, `id2label` / `label2id`,
//! `pad_token_id`, the dtype), the base weights with the LoRA deltas merged in
//! (`W + scale B A`; GPT-2's Conv1D stores `W` as (in, out), so `(B A)^T` there) or the (IA)^3
//! vectors folded into the weights they scale, the head under
//! the name transformers gives it, `model.safetensors` or shards of at most `--max-shard-size` with
//! `model.safetensors.index.json`, and `tokenizer.json` (with the BOS the model expects) plus
//! `tokenizer_config.json`. A quantized base is loaded dequantized for the export; a GGUF base's
//! `config.json` is written from its architecture. Uncertainty modeling and the memory have no
//! transformers counterpart: a run that uses them is refused unless `--drop-method-modules`.
use super::restore::LoadedRun;
use crate::atomic_file::write_atomic;
use crate::config::{PeftMethod, TaskKind};
use crate::error::{Error, Result};
use crate::heads::head_name;
use crate::models::weights::write_safetensors_atomic;
use crate::models::ArchConfig;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

/// What a merged export would lose of a run, in words (empty: nothing).
pub fn method_modules(run: &LoadedRun) -> Vec<&'static str> {
    let cfg = &run.config;
    [
        (cfg.memory.enabled, "the external memory (its entries and gated fusion)"),
        (
            cfg.uncertainty.enabled,
            "uncertainty modeling (feature noise estimators, heteroscedastic head, conditioned temperature)",
        ),
    ]
    .into_iter()
    .filter_map(|(on, what)| on.then_some(what))
    .collect()
}

/// The merged tensors under transformers' names, in name order.
fn merged_tensors(run: &LoadedRun) -> Result<Vec<(String, Tensor)>> {
    let cfg = &run.config;
    let backbone = run.model.backbone.var_store();
    let gpt2 = matches!(run.model.backbone.arch(), ArchConfig::Gpt2(_));
    let mut weights: BTreeMap<String, Tensor> = backbone
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach()))
        .collect();
    let trainable = run.model.trainable.variables();
    let scale = crate::peft::LoraSpec {
        r: cfg.peft.r,
        alpha: cfg.peft.alpha,
        dropout: 0.0,
        rslora: cfg.peft.rslora,
        targets: Vec::new(),
    }
    .scale();
    let head = format!("{}.", head_name(cfg.data.task, run.model.backbone.arch()));
    for (name, a) in &trainable {
        if let Some(module) = name.strip_suffix(".lora_A.weight") {
            let b = trainable
                .get(&format!("{module}.lora_B.weight"))
                .ok_or_else(|| Error::run(&run.dir, format!("{module}: lora_A without lora_B")))?;
            let target = format!("{module}.weight");
            let w = weights.get(&target).ok_or_else(|| {
                Error::run(
                    &run.dir,
                    format!("{target}: no base weight to merge LoRA into"),
                )
            })?;
            let delta = b
                .to_kind(tch::Kind::Float)
                .matmul(&a.to_kind(tch::Kind::Float))
                * scale;
            let delta = if gpt2 { delta.tr() } else { delta };
            if delta.size() != w.size() {
                return Err(Error::run(
                    &run.dir,
                    format!(
                        "{target}: LoRA delta {:?} does not match the weight {:?}",
                        delta.size(),
                        w.size()
                    ),
                ));
            }
            let merged = (w.to_kind(tch::Kind::Float) + delta).to_kind(w.kind());
            weights.insert(target, merged);
        } else if let Some(module) = name.strip_suffix(".ia3_l") {
            merge_ia3(&mut weights, module, a, gpt2).map_err(|e| Error::run(&run.dir, e))?;
        } else if name.starts_with(&head) {
            weights.insert(name.clone(), a.detach().to_kind(backbone_kind(&weights)));
        }
    }
    Ok(weights.into_iter().collect())
}

/// Folds an (IA)^3 vector into its layer. PEFT's shapes broadcast against a `Linear` weight
/// `(out, in)` as they are: `(out, 1)` scales the output rows (and the bias, which the output
/// includes), `(1, in)` of a feed-forward layer the input columns; GPT-2's Conv1D `(in, out)`
/// takes the transposed vector.
fn merge_ia3(
    weights: &mut BTreeMap<String, Tensor>,
    module: &str,
    l: &Tensor,
    gpt2: bool,
) -> std::result::Result<(), String> {
    let target = format!("{module}.weight");
    let w = weights
        .get(&target)
        .ok_or_else(|| format!("{target}: no base weight to merge (IA)^3 into"))?;
    let l = l.to_kind(tch::Kind::Float);
    let scale = if gpt2 { l.tr() } else { l.shallow_clone() };
    let merged = (w.to_kind(tch::Kind::Float) * &scale).to_kind(w.kind());
    if merged.size() != w.size() {
        return Err(format!(
            "{target}: (IA)^3 vector {:?} does not fit {:?}",
            l.size(),
            w.size()
        ));
    }
    weights.insert(target, merged);
    if !crate::peft::ia3::is_feedforward(module) {
        let bias = format!("{module}.bias");
        if let Some(b) = weights.get(&bias) {
            let scaled = (b.to_kind(tch::Kind::Float) * l.flatten(0, -1)).to_kind(b.kind());
            weights.insert(bias, scaled);
        }
    }
    Ok(())
}

/// The dtype of the backbone's floating-point weights (f32 when it has none).
fn backbone_kind(weights: &BTreeMap<String, Tensor>) -> tch::Kind {
    float_kind(weights.values())
}

fn float_kind<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> tch::Kind {
    use tch::Kind::{BFloat16, Double, Float, Half};
    tensors
        .map(Tensor::kind)
        .find(|k| matches!(k, Float | Double | Half | BFloat16))
        .unwrap_or(Float)
}

fn dtype_name(kind: tch::Kind) -> &'static str {
    match kind {
        tch::Kind::BFloat16 => "bfloat16",
        tch::Kind::Half => "float16",
        _ => "float32",
    }
}

/// `config.json`: the base's own when the model source is a directory holding one, else written
/// from the architecture; then the task's class, labels, padding id and dtype.
fn config_json(run: &LoadedRun, kind: tch::Kind) -> Result<Value> {
    let cfg = &run.config;
    let arch = run.model.backbone.arch();
    let own = Path::new(&cfg.model.source).join("config.json");
    let mut c: Value = if own.is_file() {
        let text = std::fs::read_to_string(&own).map_err(|e| Error::io(&own, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(&own, e.to_string()))?
    } else {
        arch_config(arch)
    };
    let ner = cfg.data.task == TaskKind::Ner;
    let class = match (arch, ner) {
        (ArchConfig::Gpt2(_), false) => "GPT2ForSequenceClassification",
        (ArchConfig::Gpt2(_), true) => "GPT2ForTokenClassification",
        (_, false) => "LlamaForSequenceClassification",
        (_, true) => "LlamaForTokenClassification",
    };
    let labels = &run.label_names;
    let id2label: BTreeMap<String, &String> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l))
        .collect();
    let label2id: BTreeMap<&String, usize> =
        labels.iter().enumerate().map(|(i, l)| (l, i)).collect();
    let o = c
        .as_object_mut()
        .ok_or_else(|| Error::format(&own, "config.json is not an object".to_string()))?;
    o.insert("architectures".into(), json!([class]));
    o.insert("id2label".into(), json!(id2label));
    o.insert("label2id".into(), json!(label2id));
    o.insert("num_labels".into(), json!(labels.len()));
    o.insert(
        "pad_token_id".into(),
        json!(run.model.tokenizer()?.padding_id()),
    );
    o.insert("torch_dtype".into(), json!(dtype_name(kind)));
    if !ner {
        o.insert("problem_type".into(), json!("single_label_classification"));
    }
    Ok(c)
}

/// A transformers `config.json` for a backbone that came without one (GGUF).
fn arch_config(arch: &ArchConfig) -> Value {
    match arch {
        ArchConfig::Gpt2(g) => json!({
            "model_type": "gpt2",
            "vocab_size": g.vocab_size,
            "n_positions": g.n_positions,
            "n_ctx": g.n_positions,
            "n_embd": g.n_embd,
            "n_layer": g.n_layer,
            "n_head": g.n_head,
            "n_inner": g.n_inner,
            "layer_norm_epsilon": g.layer_norm_epsilon,
            "activation_function": "gelu_new",
            "tie_word_embeddings": g.tie_word_embeddings,
        }),
        ArchConfig::Llama(l) => json!({
            "model_type": "llama",
            "vocab_size": l.vocab_size,
            "hidden_size": l.hidden_size,
            "intermediate_size": l.intermediate_size,
            "num_hidden_layers": l.num_hidden_layers,
            "num_attention_heads": l.num_attention_heads,
            "num_key_value_heads": l.num_key_value_heads,
            "head_dim": l.head_dim,
            "rms_norm_eps": l.rms_norm_eps,
            "rope_theta": l.rope_theta,
            "rope_scaling": l.rope_scaling.as_ref().map(|r| json!({
                "rope_type": "llama3",
                "factor": r.factor,
                "low_freq_factor": r.low_freq_factor,
                "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
            })),
            "max_position_embeddings": l.max_position_embeddings,
            "tie_word_embeddings": l.tie_word_embeddings,
            "attention_bias": l.attention_bias,
            "mlp_bias": l.mlp_bias,
            "hidden_act": "silu",
        }),
    }
}

/// The tokenizer as `AutoTokenizer` loads it: umtune's, with the BOS it prepends for the model
/// made the tokenizer's own post-processing, and the special tokens named.
fn write_tokenizer(run: &LoadedRun, out: &Path) -> Result<()> {
    use tokenizers::processors::template::TemplateProcessing;
    let tok = run.model.tokenizer()?;
    let mut inner = tok.inner.clone();
    let token = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i));
    let (bos, eos, pad) = (token(tok.bos_id), token(tok.eos_id), token(tok.pad_id));
    if let (true, Some(bos), Some(id)) = (tok.add_bos, bos.clone(), tok.bos_id) {
        let template = TemplateProcessing::builder()
            .try_single(format!("{bos}:0 $A:0"))
            .and_then(|b| b.try_pair(format!("{bos}:0 $A:0 $B:1")))
            .map_err(|e| Error::Internal(format!("tokenizer template: {e}")))?
            .special_tokens(vec![(bos.clone(), id)])
            .build()
            .map_err(|e| Error::Internal(format!("tokenizer template: {e}")))?;
        inner.with_post_processor(Some(template));
    }
    let path = out.join("tokenizer.json");
    let json = inner
        .to_string(false)
        .map_err(|e| Error::Internal(format!("tokenizer.json: {e}")))?;
    write_atomic(&path, json.as_bytes())?;
    let pad = pad.or_else(|| eos.clone());
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "model_max_length": run.config.data.max_length,
    });
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Internal(format!("tokenizer_config.json: {e}")))?;
    write_atomic(&out.join("tokenizer_config.json"), text.as_bytes())
}

/// Writes the merged model directory; returns the files written (weights first).
pub fn export_merged(
    run: &LoadedRun,
    out: &Path,
    drop_method_modules: bool,
    max_shard_bytes: u64,
) -> Result<Vec<String>> {
    let cfg = &run.config;
    if !matches!(
        cfg.peft.method,
        PeftMethod::Lora | PeftMethod::Ia3 | PeftMethod::Head
    ) {
        return Err(Error::run(
            &run.dir,
            format!(
                "peft.method = \"{}\" has no merged form here; a merged export takes a LoRA, (IA)^3 or head-only run",
                cfg.peft.method.name()
            ),
        ));
    }
    let lost = method_modules(run);
    if !lost.is_empty() && !drop_method_modules {
        return Err(Error::run(
            &run.dir,
            format!(
                "a transformers model cannot carry {}: the merged model would predict what the run's model predicts without them. Pass --drop-method-modules to export it anyway",
                lost.join(" or ")
            ),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tensors = merged_tensors(run)?;
    let kind = float_kind(tensors.iter().map(|(_, t)| t));
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    let mut total = 0u64;
    for (name, t) in tensors {
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        total += bytes;
        if let Some(s) = shards.last_mut() {
            s.push((name, t));
        }
    }
    let mut files = Vec::new();
    if shards.len() == 1 {
        write_safetensors_atomic(&out.join("model.safetensors"), &shards[0])?;
        files.push("model.safetensors".to_string());
    } else {
        let n = shards.len();
        let mut weight_map = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            write_safetensors_atomic(&out.join(&file), shard)?;
            for (name, _) in shard {
                weight_map.insert(name.clone(), file.clone());
            }
            files.push(file);
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| Error::Internal(format!("safetensors index: {e}")))?;
        write_atomic(&out.join("model.safetensors.index.json"), text.as_bytes())?;
        files.push("model.safetensors.index.json".into());
    }
    let config = serde_json::to_string_pretty(&config_json(run, kind)?)
        .map_err(|e| Error::Internal(format!("config.json: {e}")))?;
    write_atomic(&out.join("config.json"), config.as_bytes())?;
    write_tokenizer(run, out)?;
    files.extend(["config.json", "tokenizer.json", "tokenizer_config.json"].map(String::from));
    if !lost.is_empty() {
        tracing::warn!(run = %run.dir.display(), "merged export without {}", lost.join(" and "));
    }
    Ok(files)
}
