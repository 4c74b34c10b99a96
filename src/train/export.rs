//! A LoRA run exported as a Hugging Face PEFT adapter (`adapter_config.json` +
//! `adapter_model.safetensors`, the head as `modules_to_save`) that `PeftModel.from_pretrained`
//! loads onto the matching transformers model.
use super::restore::LoadedRun;
use crate::atomic_file::write_atomic;
use crate::config::{PeftMethod, TaskKind};
use crate::error::{Error, Result};
use crate::heads::head_name;
use crate::models::weights::write_safetensors_atomic;
use crate::models::ArchConfig;
use crate::peft::PEFT_PREFIX;
use serde_json::json;
use std::path::Path;
use tch::Tensor;

/// The formats a run exports to.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A Hugging Face PEFT LoRA adapter.
    Peft,
    /// A Hugging Face model directory with LoRA merged into the base weights.
    Merged,
}

/// `umtune export`'s arguments.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    pub run_dir: std::path::PathBuf,
    #[arg(long, value_enum, default_value = "peft")]
    pub format: Format,
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// `merged`: export a run with uncertainty modeling or the memory without them.
    #[arg(long)]
    pub drop_method_modules: bool,
    /// `merged`: the largest weight file before the model is sharded (as save_pretrained).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
}

/// Exports the run `args.run_dir` names in `args.format`; returns what was written, in words.
pub fn export(args: &ExportArgs) -> Result<String> {
    match args.format {
        Format::Peft => {
            let run = super::restore::load_run(&args.run_dir, &[])?;
            export_peft(&run, &args.out)?;
            Ok(format!("PEFT adapter written to {}", args.out.display()))
        }
        Format::Merged => {
            let max = super::plan::parse_memory(&args.max_shard_size)?;
            // A quantized base is merged into its dequantized weights.
            let run = super::restore::load_run(&args.run_dir, &["model.quantize=none".into()])?;
            let files = super::export_merged::export_merged(
                &run,
                &args.out,
                args.drop_method_modules,
                max,
            )?;
            Ok(format!(
                "merged model written to {}: {}",
                args.out.display(),
                files.join(", ")
            ))
        }
    }
}

/// Writes `out/adapter_config.json` and `out/adapter_model.safetensors` for a LoRA run.
pub fn export_peft(run: &LoadedRun, out: &Path) -> Result<()> {
    let cfg = &run.config;
    if cfg.peft.method != PeftMethod::Lora {
        return Err(Error::run(
            &run.dir,
            format!(
                "peft.method = \"{}\" has no PEFT adapter format; export needs a LoRA run",
                cfg.peft.method.name()
            ),
        ));
    }
    let extras = super::export_merged::method_modules(run);
    if !extras.is_empty() {
        tracing::warn!(
            run = %run.dir.display(),
            "the PEFT adapter carries LoRA and the head only: transformers + peft ignore {} (their tensors are in the file under umtune's names), so its outputs are those of the model without them",
            extras.join(" and ")
        );
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
    write_safetensors_atomic(&out.join("adapter_model.safetensors"), &named)?;
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
    let arch = run.model.backbone.arch();
    let ner = cfg.data.task == TaskKind::Ner;
    let adapter_config = json!({
        "peft_type": "LORA",
        "task_type": if ner { "TOKEN_CLS" } else { "SEQ_CLS" },
        "base_model_name_or_path": cfg.model.source,
        "r": cfg.peft.r,
        "lora_alpha": cfg.peft.alpha,
        "lora_dropout": cfg.peft.dropout,
        "use_rslora": cfg.peft.rslora,
        "target_modules": targets,
        "modules_to_save": [head_name(cfg.data.task, arch)],
        // GPT-2's Conv1D stores weights (in, out).
        "fan_in_fan_out": matches!(arch, ArchConfig::Gpt2(_)),
        "bias": "none",
        "inference_mode": true,
        "init_lora_weights": true,
    });
    let text = serde_json::to_string_pretty(&adapter_config)
        .map_err(|e| Error::Internal(format!("adapter_config.json: {e}")))?;
    write_atomic(&out.join("adapter_config.json"), text.as_bytes())
}
