//! Parameter-efficient fine-tuning: which backbone modules get trainable parts, and those parts.
//! The backbone asks an [`Injector`] for each linear layer (and norm) it builds; the injector
//! answers with an [`Adapter`] (or none) whose variables live in the trainable VarStore under the
//! module's Hugging Face path, with PEFT's names (`...q_proj.lora_A.weight`, `...k_proj.ia3_l`),
//! so export is a prefix. Prefix tuning touches no module: see [`prefix`].
pub mod bitfit;
pub mod houlsby;
pub mod ia3;
pub mod lora;
pub mod prefix;
pub mod targets;

pub use houlsby::Bottleneck;
pub use ia3::Ia3Scale;
pub use lora::{LoraLinear, LoraSpec, SharedDropout};
pub use prefix::PrefixKv;

use crate::models::adapt::{AdapterSource, LinearAdapter, LinearSite};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::{nn, Tensor};

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

/// Which adapters the injector hands out.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterSpec {
    Lora(LoraSpec),
    /// (IA)^3 scaling vectors on `targets`; the MLP's output projection scales its input.
    Ia3 {
        targets: Vec<String>,
    },
    /// A zero-initialized trainable shift of every bias (added where the layer has none).
    BitFit,
    /// Houlsby bottleneck adapters of width `bottleneck` on the outputs of `targets`.
    Houlsby {
        bottleneck: i64,
        targets: Vec<String>,
    },
}

/// PEFT's target rule: a target names a module by its last path components (`c_attn`,
/// `mlp.c_proj`).
pub fn matches_target(module: &str, targets: &[String]) -> bool {
    targets
        .iter()
        .any(|t| module == t || module.ends_with(&format!(".{t}")))
}

/// The trainable part of one linear layer; `forward` wraps the frozen layer `base`.
pub enum Adapter {
    Lora(LoraLinear),
    Ia3(Ia3Scale),
    Bias(Tensor),
    Bottleneck(Bottleneck),
}

impl LinearAdapter for Adapter {
    fn forward(&self, x: &Tensor, base: &dyn Fn(&Tensor) -> Tensor) -> Tensor {
        match self {
            Adapter::Lora(lora) => base(x) + lora.delta(x),
            Adapter::Ia3(ia3) => ia3.forward(x, base),
            Adapter::Bias(delta) => {
                let y = base(x);
                let kind = y.kind();
                y + delta.to_kind(kind)
            }
            Adapter::Bottleneck(adapter) => adapter.forward(&base(x)),
        }
    }
}

/// Hands out adapters while a backbone is built.
pub struct Injector<'a> {
    trainable: Option<&'a nn::VarStore>,
    spec: Option<AdapterSpec>,
    pub training: TrainingFlag,
    /// LoRA's dropouts by the input they drop (see [`SharedDropout`]).
    dropouts: RefCell<HashMap<String, Arc<SharedDropout>>>,
}

impl<'a> Injector<'a> {
    /// No adapters: the plain frozen backbone.
    pub fn none() -> Self {
        Injector {
            trainable: None,
            spec: None,
            training: TrainingFlag::default(),
            dropouts: RefCell::default(),
        }
    }

    /// Adapters as `spec` says, variables in `trainable`.
    pub fn new(trainable: &'a nn::VarStore, spec: AdapterSpec, training: TrainingFlag) -> Self {
        Injector {
            trainable: Some(trainable),
            spec: Some(spec),
            training,
            dropouts: RefCell::default(),
        }
    }

    /// LoRA on the modules `spec` targets.
    pub fn lora(trainable: &'a nn::VarStore, spec: LoraSpec, training: TrainingFlag) -> Self {
        Self::new(trainable, AdapterSpec::Lora(spec), training)
    }

    /// Whether this injector adds adapters at all.
    pub fn has_spec(&self) -> bool {
        self.spec.is_some()
    }

    fn path<'v>(vs: &'v nn::VarStore, module: &str) -> nn::Path<'v> {
        module.split('.').fold(vs.root(), |p, c| p.sub(c))
    }
}

impl AdapterSource for Injector<'_> {
    /// The adapter for the linear layer at `site` (its HF path, e.g.
    /// `model.layers.0.self_attn.q_proj`), if it gets one.
    fn linear(&self, site: &LinearSite) -> Option<Box<dyn LinearAdapter>> {
        let (vs, spec) = (self.trainable?, self.spec.as_ref()?);
        let (module, n_in, n_out) = (site.module, site.n_in, site.n_out);
        let path = Self::path(vs, module);
        let adapter = match spec {
            AdapterSpec::Lora(lora) => matches_target(module, &lora.targets).then(|| {
                let mut dropouts = self.dropouts.borrow_mut();
                let shared = dropouts.entry(site.input.to_string()).or_default();
                Adapter::Lora(LoraLinear::new(
                    &path,
                    lora,
                    (n_in, n_out),
                    shared.clone(),
                    self.training.clone(),
                ))
            }),
            AdapterSpec::Ia3 { targets } => matches_target(module, targets)
                .then(|| Adapter::Ia3(Ia3Scale::new(&path, module, n_in, n_out))),
            AdapterSpec::BitFit => Some(Adapter::Bias(bitfit::bias_delta(&path, n_out))),
            AdapterSpec::Houlsby {
                bottleneck,
                targets,
            } => matches_target(module, targets)
                .then(|| Adapter::Bottleneck(Bottleneck::new(&path, n_out, *bottleneck))),
        };
        adapter.map(|a| Box::new(a) as Box<dyn LinearAdapter>)
    }

    /// A trainable shift for the bias of the norm at `module` (BitFit on LayerNorm).
    fn norm_bias(&self, module: &str, d: i64) -> Option<Tensor> {
        let (vs, spec) = (self.trainable?, self.spec.as_ref()?);
        (*spec == AdapterSpec::BitFit).then(|| bitfit::bias_delta(&Injector::path(vs, module), d))
    }
}

/// PEFT's key prefix in `adapter_model.safetensors`: trainable paths are the keys without it.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Loads trainable weights (a run's `trainable.safetensors`, or PEFT's `adapter_model.safetensors`
/// whose keys carry the `base_model.model.` prefix) into the trainable VarStore; every variable
/// must be present with its shape and no tensor may be left over.
pub fn load_peft_adapter(trainable: &nn::VarStore, path: &std::path::Path) -> crate::Result<()> {
    load_named(trainable.variables(), path, None)
}

/// [`load_peft_adapter`] into any set of named tensors; with `want`, the file is checked against
/// that digest while it is copied.
pub fn load_named(
    vars: HashMap<String, Tensor>,
    path: &std::path::Path,
    want: Option<(&crate::atomic_file::FileDigest, &str)>,
) -> crate::Result<()> {
    use crate::models::weights::{while_checking, MappedSafetensors};
    let tensors = MappedSafetensors::open_unchecked(path)?;
    let checks: Vec<_> = want
        .iter()
        .map(|(digest, recorded_in)| (path, tensors.bytes(), *digest, *recorded_in))
        .collect();
    while_checking(&checks, || copy_named(vars, path, &tensors))
}

/// Copies the tensors of the file at `path`, already read into `tensors`, into `vars`: every
/// variable must be there with its shape (keys with or without PEFT's prefix) and nothing else.
pub fn copy_named(
    mut vars: HashMap<String, Tensor>,
    path: &std::path::Path,
    tensors: &HashMap<String, Tensor>,
) -> crate::Result<()> {
    use crate::error::Error;
    for (key, value) in tensors.iter() {
        let name = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
        let mut var = vars.remove(name).ok_or_else(|| {
            Error::tensor(path, key, "is unexpected: no such adapter in the model")
        })?;
        if var.size() != value.size() {
            return Err(Error::tensor(
                path,
                key,
                format!(
                    "has shape {:?}, the adapter is {:?}",
                    value.size(),
                    var.size()
                ),
            ));
        }
        tch::no_grad(|| var.copy_(value));
    }
    match vars.keys().min() {
        Some(name) => Err(Error::tensor(
            path,
            &format!("{PEFT_PREFIX}{name}"),
            "missing from the adapter file",
        )),
        None => Ok(()),
    }
}
