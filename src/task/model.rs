//! The task model: a backbone with its PEFT adapters, the task head, uncertainty modeling and
//! the external memory assembled (METHOD.md sections 1 and 2); its forward pass, the predictive
//! logits evaluation and prediction score, memory recording, and the registry of trained tensors.
use super::loss::Forward;
use crate::config::{Config, PeftMethod, TaskKind};
use crate::data::TextTokenizer;
use crate::dist::RunContext;
use crate::error::{Error, Result};
use crate::ffi::autocast::autocast;
use crate::heads::{head_name, Head, SequenceClassifier, TokenClassifier};
use crate::memory::fusion::FusionMode;
use crate::memory::MemoryFusion;
use crate::models::attention::BatchMask;
use crate::models::resolve::ModelRef;
use crate::models::{ArchConfig, Backbone, NoHook};
use crate::peft::targets::{no_match, resolve_targets};
use crate::peft::{AdapterSpec, Injector, LoraSpec, PrefixKv, TrainingFlag};
use crate::probe::Probe;
use crate::uncertainty::{plugin_layers, UncertainHead, Uncertainty};
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, Device, Tensor};

/// The plug-ins between blocks: UM's estimators, then at block m the memory fusion (which sees
/// UM's p of that block).
struct ModelHook<'a> {
    um: Option<crate::uncertainty::estimation::UncertaintyHook<'a>>,
    memory: Option<&'a MemoryFusion>,
    mask: &'a Tensor,
    example_ids: &'a Tensor,
    training: bool,
    record: bool,
    contrastive: Option<Tensor>,
    error: Option<Error>,
    probe: &'a Probe,
}

impl crate::models::LayerHook for ModelHook<'_> {
    fn after_block(&mut self, layer: usize, hidden: Tensor) -> Tensor {
        let hidden = match &mut self.um {
            Some(um) => um.after_block(layer, hidden),
            None => hidden,
        };
        let Some(memory) = self.memory.filter(|m| m.layer == layer) else {
            return hidden;
        };
        let p = self.um.as_ref().and_then(|um| um.p_at(layer));
        match memory.forward(
            &hidden,
            self.mask,
            self.example_ids,
            p,
            FusionMode {
                training: self.training,
                record: self.record,
                probe: self.probe,
            },
        ) {
            Ok(out) => {
                self.contrastive = out.contrastive;
                out.hidden
            }
            Err(e) => {
                self.error = Some(e);
                hidden
            }
        }
    }
}

/// What a forward pass is for, beyond what the training flag says.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Pass {
    Plain,
    /// One MC sample at prediction: feature noise and a draw of the heteroscedastic logits.
    McSample,
    /// Building a memory: record the entries.
    Record,
}

/// Everything that takes part in a forward pass.
pub struct TaskModel {
    pub backbone: Box<dyn Backbone>,
    pub head: Head,
    pub trainable: nn::VarStore,
    pub training: TrainingFlag,
    /// None for `preset:` models (random weights, benchmarks only).
    pub tokenizer: Option<TextTokenizer>,
    /// Prefix tuning's virtual keys and values.
    pub prefix: Option<PrefixKv>,
    /// Full fine-tuning: the backbone's weights train too.
    pub full: bool,
    /// Forward passes under autocast to this dtype.
    pub autocast: Option<tch::Kind>,
    /// Post-hoc temperature fitted on the validation split (None before fitting).
    pub temperature: Option<f64>,
    /// Uncertainty modeling (METHOD.md section 1), if enabled.
    pub um: Option<Uncertainty>,
    /// The external memory and its fusion (METHOD.md section 2), if enabled.
    pub memory: Option<MemoryFusion>,
    /// MC samples averaged by [`Self::predictive_logits`] (0: deterministic; needs `um`).
    pub mc_samples: i64,
    /// The run seed, which keys each example's MC draws (see [`Self::predictive_logits_of`]).
    pub mc_seed: u64,
    /// What the plug-ins record for the training diagnostics (on for logged steps).
    pub probe: Probe,
    /// The ranks evaluation is sharded over (the run context's collective).
    pub group: std::sync::Arc<dyn crate::dist::Collective>,
    /// Activation checkpointing: blocks per recomputed segment (see [`Self::forward_backward`]).
    pub checkpoint_every: Option<usize>,
    /// Set by a caller whose masks are all right-padded (every real token before every pad, as
    /// `data::batching` collates): the backbone then runs plain causal attention without looking
    /// at the mask, which is what it would decide after reading the mask (a host sync on a GPU).
    pub right_padded: std::sync::atomic::AtomicBool,
}

/// The hidden states entering block `layer`, computed by the caller (the checkpointed path).
pub(super) struct Entry<'a> {
    pub(super) hidden: &'a Tensor,
    pub(super) layer: usize,
    pub(super) batch: &'a BatchMask,
}

impl TaskModel {
    /// Builds the model `cfg` describes on `ctx.device`, its memory sharded over `ctx.group`.
    pub fn build(cfg: &Config, num_labels: usize, ctx: &RunContext) -> Result<TaskModel> {
        Self::build_from(cfg, ModelRef::resolve(&cfg.model.source)?, num_labels, ctx)
    }

    /// [`Self::build`] from the model reference already resolved. The random initialization
    /// starts from `run.seed` whatever ran before: this is the one place the seed is set.
    pub fn build_from(
        cfg: &Config,
        model: ModelRef,
        num_labels: usize,
        ctx: &RunContext,
    ) -> Result<TaskModel> {
        tch::manual_seed(cfg.run.seed as i64);
        let device = ctx.device;
        let trainable = nn::VarStore::new(device);
        let training = TrainingFlag::default();
        let kind = cfg.model.dtype.kind();
        let arch = model.arch.clone();
        if let ArchConfig::Gpt2(c) = &arch {
            let virtual_tokens = if cfg.peft.method == PeftMethod::Prefix {
                cfg.peft.num_virtual_tokens as usize
            } else {
                0
            };
            if cfg.data.max_length + virtual_tokens > c.n_positions {
                return Err(Error::Config(format!(
                    "data.max_length = {} (+ {virtual_tokens} virtual tokens) exceeds the {} positions of `{}`: lower data.max_length",
                    cfg.data.max_length, c.n_positions, cfg.model.source
                )));
            }
        }
        let targets = resolve_targets(&cfg.peft.targets, cfg.peft.method, &arch);
        let spec = match cfg.peft.method {
            PeftMethod::Head | PeftMethod::Full | PeftMethod::Prefix => None,
            PeftMethod::Lora => Some(AdapterSpec::Lora(LoraSpec {
                r: cfg.peft.r,
                alpha: cfg.peft.alpha,
                dropout: cfg.peft.dropout,
                rslora: cfg.peft.rslora,
                targets: targets.clone(),
            })),
            PeftMethod::Ia3 => Some(AdapterSpec::Ia3 {
                targets: targets.clone(),
            }),
            PeftMethod::Bitfit => Some(AdapterSpec::BitFit),
            PeftMethod::Houlsby => Some(AdapterSpec::Houlsby {
                bottleneck: cfg.peft.bottleneck,
                targets: targets.clone(),
            }),
        };
        let inj = match spec {
            Some(spec) => Injector::new(&trainable, spec, training.clone()),
            None => Injector::none(),
        };
        let loaded = (model.without_lm_head())
            .quantized(cfg.model.quantize)
            .load(kind, device, &inj)?;
        // A target list that matches nothing would silently train the head alone.
        if inj.has_spec() && trainable.variables().is_empty() {
            return Err(no_match(&targets, &cfg.model.source, &arch));
        }
        if cfg.peft.method == PeftMethod::Full {
            for (_, var) in loaded.backbone.var_store().variables() {
                let _ = var.set_requires_grad(true);
            }
        }
        let checkpoint_every = cfg.train.activation_checkpointing.every();
        if checkpoint_every.is_some() && cfg.peft.method == PeftMethod::Prefix {
            return Err(Error::Config(
                "train.activation_checkpointing does not work with peft.method = \"prefix\" (its virtual keys ride in the KV cache, which the recomputed blocks do not take): turn one off".into(),
            ));
        }
        let prefix = (cfg.peft.method == PeftMethod::Prefix).then(|| {
            let (layers, kv_heads, head_dim) = arch.kv_shape();
            PrefixKv::new(
                &trainable.root(),
                cfg.peft.num_virtual_tokens,
                layers,
                kv_heads,
                head_dim,
            )
        });
        let tokenizer = loaded.tokenizer;
        let (d, n) = (arch.hidden_size() as i64, num_labels as i64);
        let head = match cfg.data.task {
            TaskKind::Classification => {
                Head::Sequence(SequenceClassifier::new(&trainable.root(), d, n))
            }
            TaskKind::Ner => Head::Token(TokenClassifier::new(
                &trainable.root(),
                head_name(cfg.data.task, &arch),
                d,
                n,
            )),
        };
        // After the head, so that the head's initialization does not depend on this switch.
        let um = if cfg.uncertainty.enabled {
            let n = arch.num_layers();
            let layers = plugin_layers(&cfg.uncertainty, n);
            if let Some(bad) = layers.iter().find(|&&l| l >= n) {
                return Err(Error::Config(format!(
                    "uncertainty.layers has block {bad}; `{}` has blocks 0 to {}",
                    cfg.model.source,
                    n - 1
                )));
            }
            Some(Uncertainty::new(
                &trainable.root(),
                &cfg.uncertainty,
                &layers,
                arch.hidden_size() as i64,
            ))
        } else {
            None
        };
        let memory = if cfg.memory.enabled {
            let n = arch.num_layers();
            let layer = if cfg.memory.layer < 0 {
                n - 1
            } else {
                cfg.memory.layer as usize
            };
            if layer >= n {
                return Err(Error::Config(format!(
                    "memory.layer = {layer}; `{}` has blocks 0 to {}",
                    cfg.model.source,
                    n - 1
                )));
            }
            let with_um = um.is_some() && plugin_layers(&cfg.uncertainty, n).contains(&layer);
            let fusion = MemoryFusion::new(
                &trainable.root(),
                &cfg.memory,
                layer,
                arch.hidden_size() as i64,
                cfg.data.task == TaskKind::Ner,
                with_um,
                ctx.group.clone(),
            );
            let (entries, bytes) = {
                let m = fusion.store()?;
                (m.capacity(), m.bytes())
            };
            tracing::info!(entries, bytes, layer, "external memory");
            if !cfg.memory.prebuilt.is_empty() {
                let path = Path::new(&cfg.memory.prebuilt);
                fusion.load(path, true)?;
                tracing::info!(path = %path.display(), held = fusion.store()?.len(), "prebuilt memory");
            }
            Some(fusion)
        } else {
            None
        };
        Ok(TaskModel {
            backbone: loaded.backbone,
            head,
            trainable,
            training,
            tokenizer,
            prefix,
            full: cfg.peft.method == PeftMethod::Full,
            autocast: cfg.train.autocast.kind(),
            temperature: None,
            um,
            memory,
            mc_samples: cfg.uncertainty.mc_predict,
            mc_seed: cfg.run.seed,
            probe: Probe::default(),
            group: ctx.group.clone(),
            checkpoint_every,
            right_padded: Default::default(),
        })
    }

    /// Makes every rank's trainable tensors rank 0's (after building: LoRA's random A, the
    /// memory projections, the head), so data-parallel ranks start from one model.
    pub fn broadcast_trainable(&self) -> Result<()> {
        if self.group.world_size() == 1 {
            return Ok(());
        }
        for (_, mut v) in self.named_trainable() {
            let mut t = v.detach();
            self.group.broadcast(&mut t, 0)?;
            tch::no_grad(|| v.copy_(&t));
        }
        Ok(())
    }

    /// The device the model computes on.
    pub fn device(&self) -> Device {
        self.backbone.device()
    }

    /// The tokenizer, which every use but benchmarking needs.
    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Config(
                "this model (a `preset:`) has no tokenizer: use a pretrained model.source".into(),
            )
        })
    }

    /// Class logits in f32: `(b, num_labels)`, or `(b, t, num_labels)` for NER.
    pub fn logits(&self, input_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        Ok(self.forward(input_ids, mask, None)?.logits)
    }

    /// One forward pass (under autocast if configured): logits in f32 and, with uncertainty
    /// modeling or the memory, the training-time extras. `example_ids (b,)` keep the memory from
    /// returning an example's own entries (None: ids that match nothing).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        example_ids: Option<&Tensor>,
    ) -> Result<Forward> {
        self.forward_with(input_ids, mask, example_ids, Pass::Plain, None)
    }

    /// A pass without training that records every unit's memory entry and commits them: the
    /// step of building a memory from a corpus. Collective with a sharded memory.
    pub fn record_memory(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        example_ids: &Tensor,
    ) -> Result<()> {
        self.forward_with(input_ids, mask, Some(example_ids), Pass::Record, None)?;
        self.commit_memory()
    }

    /// The mask the backbone's attention needs: none when the caller vouched that masks are
    /// right-padded ([`Self::right_padded`]).
    pub(super) fn attention_mask<'m>(&self, mask: &'m Tensor) -> Option<&'m Tensor> {
        let known = self.right_padded.load(std::sync::atomic::Ordering::Relaxed);
        (!known).then_some(mask)
    }

    /// The backbone's final hidden states: the whole stack, or from `entry` on.
    fn backbone_forward(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        cache: Option<&mut crate::models::KvCache>,
        hook: &mut dyn crate::models::LayerHook,
        entry: Option<&Entry>,
    ) -> Tensor {
        match entry {
            None => self
                .backbone
                .forward(input_ids, self.attention_mask(mask), cache, hook),
            Some(e) => {
                let n = self.backbone.arch().num_layers();
                let x = self
                    .backbone
                    .blocks(e.hidden.shallow_clone(), e.batch, e.layer..n, hook);
                self.backbone.final_norm(&x)
            }
        }
    }

    /// `f` under autocast to [`Self::autocast`] when one is configured, else as it is.
    pub(super) fn in_autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        match self.autocast {
            Some(kind) => autocast(self.backbone.device(), kind, f),
            None => f(),
        }
    }

    pub(super) fn forward_with(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        example_ids: Option<&Tensor>,
        pass: Pass,
        entry: Option<&Entry>,
    ) -> Result<Forward> {
        let run = || self.forward_in_kind(input_ids, mask, example_ids, pass, entry);
        if self.autocast.is_none() {
            return run();
        }
        let f = self.in_autocast(run)?;
        Ok(Forward {
            logits: f.logits.to_kind(tch::Kind::Float),
            ..f
        })
    }

    fn forward_in_kind(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        example_ids: Option<&Tensor>,
        pass: Pass,
        entry: Option<&Entry>,
    ) -> Result<Forward> {
        let sample = pass == Pass::McSample;
        let mut cache = self
            .prefix
            .as_ref()
            .map(|p| p.cache(input_ids.size()[0], self.backbone.kind()));
        if self.um.is_none() && self.memory.is_none() {
            let hidden = self.backbone_forward(input_ids, mask, cache.as_mut(), &mut NoHook, entry);
            return Ok(Forward {
                logits: self.head.forward(&hidden, mask),
                samples: None,
                regularizer: None,
            });
        }
        let b_sz = input_ids.size()[0];
        let unknown;
        let example_ids = match example_ids {
            Some(ids) => ids,
            None => {
                unknown = Tensor::arange(b_sz, (tch::Kind::Int64, input_ids.device()))
                    + crate::data::dataset::ids::UNKNOWN;
                &unknown
            }
        };
        let mut hook = ModelHook {
            um: self
                .um
                .as_ref()
                .map(|um| um.features.hook(sample || self.training.get(), &self.probe)),
            memory: self.memory.as_ref(),
            mask,
            example_ids,
            training: self.training.get(),
            record: self.training.get() || pass == Pass::Record,
            contrastive: None,
            error: None,
            probe: &self.probe,
        };
        let hidden = self.backbone_forward(input_ids, mask, cache.as_mut(), &mut hook, entry);
        if let Some(e) = hook.error.take() {
            return Err(e);
        }
        let mut regularizer = hook.contrastive.take();
        let Some((um, um_hook)) = self.um.as_ref().zip(hook.um.as_ref()) else {
            return Ok(Forward {
                logits: self.head.forward(&hidden, mask),
                samples: None,
                regularizer,
            });
        };
        let z = self.head.pool(&hidden, mask);
        let p_z = match um_hook.last() {
            Some(p) => self.head.pool(p, mask),
            None => z.zeros_like(),
        };
        let mut out = um.head.forward(&self.head, &z, &p_z);
        if self.probe.is_on() {
            if let Some(s2) = &out.variance {
                self.probe.record("um.logit_var_max", || s2.detach().max());
            }
            if let Some(t) = &out.temperature {
                self.probe.record("um.temperature_max", || t.detach().max());
            }
        }
        let samples = if self.training.get() {
            um.head.samples(&out)
        } else {
            None
        };
        if sample && !self.training.get() {
            if let Some(draw) = UncertainHead::draw(&out, 1) {
                out.logits = draw.squeeze_dim(0);
            }
        }
        if !um_hook.p.is_empty() {
            // The penalty (KL to the prior, or p) over the real tokens of each example, then over
            // the examples: padding
            // is not regularized, and the value does not depend on how a batch is padded or
            // split over data-parallel ranks.
            let real = mask.to_kind(tch::Kind::Float); // (b, t)
            let tokens = real
                .sum_dim_intlist(1, false, tch::Kind::Float)
                .clamp_min(1.0);
            let means: Vec<Tensor> = um_hook
                .p
                .iter()
                .map(|p| {
                    let per_token = um.per_token_penalty(p);
                    ((per_token * &real).sum_dim_intlist(1, false, tch::Kind::Float) / &tokens)
                        .mean(tch::Kind::Float)
                })
                .collect();
            let var = Tensor::stack(&means, 0).mean(tch::Kind::Float) * um.lambda_var;
            regularizer = Some(match regularizer {
                Some(r) => r + var,
                None => var,
            });
        }
        Ok(Forward {
            logits: out.logits,
            samples,
            regularizer,
        })
    }

    /// After an optimizer step: the batch's memory entries go into the ring (collective).
    pub fn commit_memory(&self) -> Result<()> {
        match &self.memory {
            Some(m) => m.commit(),
            None => Ok(()),
        }
    }

    /// After a skipped (non-finite) step: the entries its batches recorded are dropped, so they
    /// never reach the ring.
    pub fn discard_memory(&self) -> Result<()> {
        match &self.memory {
            Some(m) => m.discard_pending(),
            None => Ok(()),
        }
    }

    /// The training loss of a forward pass (see [`super::loss::loss`]).
    pub fn loss(&self, f: &Forward, labels: &Tensor) -> Tensor {
        super::loss::loss(f, labels)
    }

    /// The training loss with the cross-entropy normalized by `units` (see
    /// [`super::loss::loss_over`]).
    pub fn loss_over(&self, f: &Forward, labels: &Tensor, units: Option<f64>) -> Tensor {
        super::loss::loss_over(f, labels, units)
    }

    /// Every trained tensor by name: the trainable VarStore, plus the backbone's weights under
    /// full fine-tuning (their Hugging Face names do not collide with adapter or head names).
    pub fn trained_vars(&self) -> HashMap<String, Tensor> {
        let mut vars = self.trainable.variables();
        if self.full {
            vars.extend(self.backbone.var_store().variables());
        }
        vars
    }

    /// [`Self::trained_vars`] sorted by name (a stable order for the optimizer and checkpoints).
    pub fn named_trainable(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self.trained_vars().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    pub fn trainable_params(&self) -> i64 {
        self.trained_vars().values().map(|t| t.numel() as i64).sum()
    }
}
