//! Parameter-efficient fine-tuning: which backbone modules get trainable parts, and those parts.
//! The backbone asks an [`Injector`] for each linear layer it builds; the injector answers with
//! an adapter (or none) whose variables live in the trainable VarStore under the module's
//! Hugging Face path, with PEFT's names (`...q_proj.lora_A.weight`), so export is a prefix.
pub mod lora;

pub use lora::{LoraLinear, LoraSpec};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::nn;

/// Train/eval switch shared by every adapter of a model (dropout is active only in training).
#[derive(Clone, Default)]
pub struct TrainingFlag(Arc<AtomicBool>);

impl TrainingFlag {
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed)
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Hands out adapters while a backbone is built.
pub struct Injector<'a> {
    trainable: Option<&'a nn::VarStore>,
    lora: Option<LoraSpec>,
    pub training: TrainingFlag,
}

impl<'a> Injector<'a> {
    /// No adapters: the plain frozen backbone.
    pub fn none() -> Self {
        Injector {
            trainable: None,
            lora: None,
            training: TrainingFlag::default(),
        }
    }

    /// LoRA on the modules `spec` targets, variables in `trainable`.
    pub fn lora(trainable: &'a nn::VarStore, spec: LoraSpec, training: TrainingFlag) -> Self {
        Injector {
            trainable: Some(trainable),
            lora: Some(spec),
            training,
        }
    }

    /// The adapter for the linear layer at `module` (its HF path, e.g.
    /// `model.layers.0.self_attn.q_proj`), if it is targeted.
    pub fn linear(&self, module: &str, n_in: i64, n_out: i64) -> Option<LoraLinear> {
        let (vs, spec) = (self.trainable?, self.lora.as_ref()?);
        let name = module.rsplit('.').next().unwrap_or(module);
        if !spec.targets.iter().any(|t| t == name) {
            return None;
        }
        let path = module.split('.').fold(vs.root(), |p, c| p.sub(c));
        Some(LoraLinear::new(
            &path,
            spec,
            n_in,
            n_out,
            self.training.clone(),
        ))
    }
}

/// PEFT's key prefix in `adapter_model.safetensors`: trainable paths are the keys without it.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Loads trainable weights (a run's `trainable.safetensors`, or PEFT's `adapter_model.safetensors`
/// whose keys carry the `base_model.model.` prefix) into the trainable VarStore; every variable
/// must be present with its shape and no tensor may be left over.
pub fn load_peft_adapter(trainable: &nn::VarStore, path: &std::path::Path) -> crate::Result<()> {
    use crate::error::Error;
    let tensors =
        tch::Tensor::read_safetensors(path).map_err(|e| Error::format(path, e.to_string()))?;
    let mut vars = trainable.variables();
    for (key, value) in tensors {
        let name = key.strip_prefix(PEFT_PREFIX).unwrap_or(&key);
        let mut var = vars.remove(name).ok_or_else(|| {
            Error::tensor(path, &key, "is unexpected: no such adapter in the model")
        })?;
        if var.size() != value.size() {
            return Err(Error::tensor(
                path,
                &key,
                format!(
                    "has shape {:?}, the adapter is {:?}",
                    value.size(),
                    var.size()
                ),
            ));
        }
        tch::no_grad(|| var.copy_(&value));
    }
    if let Some(name) = vars.keys().min() {
        return Err(Error::tensor(
            path,
            &format!("{PEFT_PREFIX}{name}"),
            "missing from the adapter file",
        ));
    }
    Ok(())
}
