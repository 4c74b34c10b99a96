//! Typed experiment configuration: a TOML file, then `UMTUNE__SECTION__KEY` environment variables,
//! then `--set section.key=value` overrides (later wins), merged by the `config` crate and
//! deserialized with serde (`deny_unknown_fields`). `validate()` runs before any tensor exists.
use crate::data::corrupt::Corruption;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the model comes from and how it is held in memory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A local directory (config.json + safetensors), a `.gguf` file, a hub id
    /// (`openai-community/gpt2`), or `default` for the packaged SmolLM2-135M.
    pub source: String,
    pub dtype: Dtype,
    pub device: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            source: "default".into(),
            dtype: Dtype::F32,
            device: "auto".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::F32 => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
            Dtype::F16 => tch::Kind::Half,
        }
    }
}

impl TryFrom<String> for Dtype {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        match s.as_str() {
            "f32" => Ok(Dtype::F32),
            "bf16" => Ok(Dtype::Bf16),
            "f16" => Ok(Dtype::F16),
            other => Err(format!(
                "dtype `{other}` is not one of `f32`, `bf16`, `f16`"
            )),
        }
    }
}

impl From<Dtype> for String {
    fn from(d: Dtype) -> String {
        d.as_str().to_string()
    }
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Dtype::try_from(s.to_string()).map_err(Error::Config)
    }
}

/// Process-level settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Intra-op CPU threads for libtorch; 0 keeps libtorch's default.
    pub threads: usize,
    pub seed: u64,
    pub output_dir: String,
    /// Run directory name under output_dir; empty: `DATASET-METHOD-sSEED`.
    pub name: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            threads: 0,
            seed: 42,
            output_dir: "runs".into(),
            name: String::new(),
        }
    }
}

/// What to train on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A dataset name under `$UMTUNE_CACHE/data` (see scripts/fetch_data.py) or a directory with
    /// `train`, `validation` and `test` files (.parquet, .jsonl, .csv, .tsv or .conll).
    pub dataset: String,
    pub task: TaskKind,
    pub text_column: String,
    pub label_column: String,
    pub tokens_column: String,
    pub tags_column: String,
    /// Label names in index order; empty: from the files.
    pub label_names: Vec<String>,
    /// Tokens per example after truncation.
    pub max_length: usize,
    /// Use only the first N training / evaluation examples (0: all).
    pub train_limit: usize,
    pub eval_limit: usize,
    /// Robustness protocols on the training split (e.g. `label_noise = 0.3`).
    pub train_corruption: Corruption,
    /// Robustness protocols on the evaluated splits (`umtune eval --corrupt drop=0.3` sets it).
    pub eval_corruption: Corruption,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: "uci-sentiment".into(),
            task: TaskKind::Classification,
            text_column: "text".into(),
            label_column: "label".into(),
            tokens_column: "tokens".into(),
            tags_column: "ner_tags".into(),
            label_names: Vec::new(),
            max_length: 64,
            train_limit: 0,
            eval_limit: 0,
            train_corruption: Corruption::default(),
            eval_corruption: Corruption::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Classification,
    Ner,
}

/// Which parameters train.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PeftConfig {
    pub method: PeftMethod,
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    /// Modules that get adapters, by their last path components (`q_proj`, `mlp.c_proj`). Empty:
    /// PEFT's defaults for the method and architecture (LoRA: `c_attn` / `q_proj`,`v_proj`;
    /// (IA)^3: `c_attn`,`mlp.c_proj` / `k_proj`,`v_proj`,`down_proj`; Houlsby: the attention and
    /// MLP output projections).
    pub targets: Vec<String>,
    /// Houlsby adapters: width of the bottleneck.
    pub bottleneck: i64,
    /// Prefix tuning: number of virtual tokens per layer.
    pub num_virtual_tokens: i64,
}

impl Default for PeftConfig {
    fn default() -> Self {
        PeftConfig {
            method: PeftMethod::Lora,
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            rslora: false,
            targets: Vec::new(),
            bottleneck: 64,
            num_virtual_tokens: 20,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PeftMethod {
    /// LoRA adapters plus the task head.
    Lora,
    /// The task head alone (linear probe).
    Head,
    /// Every backbone weight and the head.
    Full,
    /// Bias terms (BitFit) and the head.
    Bitfit,
    /// Houlsby bottleneck adapters and the head.
    Houlsby,
    /// Prefix tuning (trainable keys/values of virtual tokens) and the head.
    Prefix,
    /// (IA)^3 scaling vectors and the head.
    Ia3,
}

impl PeftMethod {
    pub fn name(self) -> &'static str {
        match self {
            PeftMethod::Lora => "lora",
            PeftMethod::Head => "head",
            PeftMethod::Full => "full",
            PeftMethod::Bitfit => "bitfit",
            PeftMethod::Houlsby => "houlsby",
            PeftMethod::Prefix => "prefix",
            PeftMethod::Ia3 => "ia3",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Cosine,
    Linear,
    Constant,
}

/// The optimization loop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Stop after this many optimizer steps (0: run all epochs).
    pub max_steps: usize,
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// AdamW's epsilon (`torch.optim.AdamW`'s `eps`, HF's `adam_epsilon`): the floor of the
    /// update's denominator. Large values make the update proportional to the gradient.
    pub adam_eps: f64,
    pub warmup_ratio: f64,
    pub schedule: ScheduleKind,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// Evaluate on the validation split every N steps (0: only at the end).
    pub eval_every: usize,
    pub log_every: usize,
    /// Stop after this many consecutive steps with a non-finite loss.
    pub max_bad_steps: usize,
    /// Mixed precision for forward passes: "off", "bf16" or "f16" (matmuls in that dtype on
    /// f32 weights, as torch.autocast; meant for CUDA, slow on most CPUs).
    pub autocast: Autocast,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Autocast {
    Off,
    Bf16,
    F16,
}

impl Autocast {
    /// The dtype autocast computes in, if on.
    pub fn kind(self) -> Option<tch::Kind> {
        match self {
            Autocast::Off => None,
            Autocast::Bf16 => Some(tch::Kind::BFloat16),
            Autocast::F16 => Some(tch::Kind::Half),
        }
    }
}

impl TrainConfig {
    /// The batch of inference passes (no gradients are kept, so twice the training batch fits).
    pub fn eval_batch_size(&self) -> usize {
        self.batch_size * 2
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            max_steps: 0,
            batch_size: 16,
            grad_accum: 1,
            lr: 5e-4,
            weight_decay: 0.01,
            adam_eps: 1e-8,
            warmup_ratio: 0.06,
            schedule: ScheduleKind::Cosine,
            max_grad_norm: 1.0,
            eval_every: 0,
            log_every: 10,
            max_bad_steps: 10,
            autocast: Autocast::Off,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub peft: PeftConfig,
    pub train: TrainConfig,
    pub run: RunConfig,
    pub uncertainty: UncertaintyConfig,
    pub memory: MemoryConfig,
    pub dist: DistConfig,
    pub checkpoint: CheckpointConfig,
    /// The `--set` overrides this config was loaded with (recorded in a run's summary; not part
    /// of the config file, nor of its value).
    #[serde(skip)]
    pub overrides: Overrides,
}

/// A config from a file (optional), `--set` overrides and a model reference, as the commands
/// that need no run directory take it.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// TOML experiment config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: OverrideArgs,
    /// Model reference (overrides model.source).
    #[arg(long)]
    pub model: Option<String>,
}

impl ConfigArgs {
    pub fn load(&self) -> Result<Config> {
        let mut overrides = self.overrides.set.clone();
        overrides.extend(self.model.iter().map(|m| format!("model.source={m}")));
        Config::load(self.config.as_deref(), &overrides)
    }
}

/// The `--set section.key=value` flags every subcommand that reads a config takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OverrideArgs {
    /// Override a config value: `--set section.key=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// How a config was loaded: not part of its value, so any two compare equal.
#[derive(Debug, Clone, Default)]
pub struct Overrides(pub Vec<String>);

impl PartialEq for Overrides {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Checkpoints for exact resume (`RUN/checkpoints/step_NNNNNN/`, see `train::checkpoint`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// A checkpoint every this many optimizer steps (0: only at the end and on a stop signal).
    pub every: usize,
    /// The newest checkpoints kept (the best one is kept besides).
    pub keep: usize,
    /// Also keep the checkpoint with the best validation `accuracy`, `macro_f1` or `loss` among
    /// those taken at an evaluation step (`""`: none).
    pub best: String,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every: 500,
            keep: 2,
            best: String::new(),
        }
    }
}

/// Which collective backend a multi-process run talks through.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `nccl` when the device is CUDA, `cpu` otherwise.
    Auto,
    /// libtorch's ProcessGroupNCCL (CUDA tensors).
    Nccl,
    /// umtune's TCP ring (CPU tensors).
    Cpu,
}

/// Multi-process runs (the rank layout comes from the launcher's environment, see
/// `dist::env`); ignored in one process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    pub backend: Backend,
    /// Seconds a rendezvous or a collective waits for the other ranks before it fails, naming
    /// the rank that did not answer.
    pub timeout_s: u64,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            backend: Backend::Auto,
            timeout_s: 300,
        }
    }
}

/// External memory (METHOD.md section 2).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    pub enabled: bool,
    /// Entries in the FIFO ring (all ranks together).
    pub capacity: usize,
    /// d_k of the normalized keys and queries.
    pub key_size: i64,
    /// Entries read per query.
    pub k: usize,
    /// Score temperature tau_m.
    pub tau: f64,
    /// The block (0-based) whose output the memory reads and fuses; -1: the last.
    pub layer: i64,
    /// Weight of the in-batch InfoNCE between queries and keys (0: off; keys then never train).
    pub lambda_mem: f64,
    /// A memory file of `umtune memory build` to start from (empty: an empty memory).
    pub prebuilt: String,
    /// Scale-free fusion: the gate sees RMS-normalized `h` and `r` and `log(p) / 10`, and `W_o`
    /// reads the RMS-normalized `r` (false: METHOD.md's raw formulas).
    pub normalize: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            enabled: false,
            capacity: 16384,
            key_size: 128,
            k: 16,
            tau: 0.07,
            layer: -1,
            lambda_mem: 0.1,
            prebuilt: String::new(),
            normalize: true,
        }
    }
}

/// Uncertainty modeling (METHOD.md section 1); every sub-part has its own switch for ablations.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UncertaintyConfig {
    pub enabled: bool,
    /// Blocks (0-based) that carry the estimator; empty: the top 4.
    pub layers: Vec<usize>,
    /// Bottleneck width r_u of each block's log-variance estimator.
    pub rank: i64,
    /// Cross-layer propagation (p_l mixes p_{l-1}; c_l feeds it into the estimate).
    pub propagation: bool,
    /// Training-time reparameterized noise on the hidden states.
    pub noise: bool,
    pub noise_scale: f64,
    /// Damping of the pooled representation where uncertain.
    pub suppression: bool,
    /// Heteroscedastic logits with the sampled-softmax loss.
    pub heteroscedastic: bool,
    /// Samples of the sampled-softmax loss.
    pub n_mc: i64,
    /// Weight of the variance regularizer mean(p).
    pub lambda_var: f64,
    /// Uncertainty-conditioned temperature T(x) in training and evaluation.
    pub conditioned_temperature: bool,
    /// MC samples at evaluation and prediction (feature noise and heteroscedastic logits drawn
    /// as in training, probabilities averaged); 0: deterministic.
    pub mc_predict: i64,
}

impl Default for UncertaintyConfig {
    fn default() -> Self {
        UncertaintyConfig {
            enabled: false,
            layers: Vec::new(),
            rank: 32,
            propagation: true,
            noise: true,
            noise_scale: 1.0,
            suppression: true,
            heteroscedastic: true,
            n_mc: 8,
            lambda_var: 1e-3,
            conditioned_temperature: true,
            mc_predict: 0,
        }
    }
}

const ENV_PREFIX: &str = "UMTUNE";

impl Config {
    /// Loads `file` (if any), then `UMTUNE__SECTION__KEY` variables, then `section.key=value`
    /// overrides, and validates the result.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Config> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            if !file.exists() {
                return Err(Error::Config(format!(
                    "{}: no such config file",
                    file.display()
                )));
            }
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        let mut parsed = Vec::with_capacity(overrides.len());
        for item in overrides {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                Error::Config(format!("--set `{item}` must look like section.key=value"))
            })?;
            parsed.push((item, key.trim(), value.trim()));
        }
        // Built in layers, so an error names the layer that caused it: the file, the
        // UMTUNE__* environment, or a --set override.
        let file_origin = file.map_or_else(|| "defaults".to_string(), |f| f.display().to_string());
        check_layer(&builder, &file_origin)?;
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        check_layer(&builder, "the UMTUNE__* environment variables")?;
        for (item, key, value) in parsed {
            builder = builder
                .set_override(key, override_value(value))
                .map_err(|e| Error::Config(format!("--set `{item}`: {e}")))?;
            check_layer(&builder, &format!("--set `{item}`"))?;
        }
        let merged = builder.build().map_err(|e| Error::Config(e.to_string()))?;
        let mut cfg: Config = merged
            .try_deserialize()
            .map_err(|e| Error::Config(e.to_string()))?;
        cfg.data.dataset = absolute_dataset(&cfg.data.dataset)?;
        cfg.overrides = Overrides(overrides.to_vec());
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that serde's types cannot express, with messages that say what to change.
    pub fn validate(&self) -> Result<()> {
        if self.model.source.trim().is_empty() {
            return Err(Error::Config(
                "model.source is empty: give a directory, a .gguf file, a hub id or `default`"
                    .into(),
            ));
        }
        parse_device(&self.model.device)?;
        let range = |ok: bool, key: &str, value: String, want: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "{key} = {value} is out of range: use {want}"
                )))
            }
        };
        range(
            self.checkpoint.keep > 0,
            "checkpoint.keep",
            self.checkpoint.keep.to_string(),
            "at least 1",
        )?;
        range(
            ["", "accuracy", "macro_f1", "loss"].contains(&self.checkpoint.best.as_str()),
            "checkpoint.best",
            format!("{:?}", self.checkpoint.best),
            "\"\", \"accuracy\", \"macro_f1\" or \"loss\"",
        )?;
        range(
            self.dist.timeout_s > 0,
            "dist.timeout_s",
            self.dist.timeout_s.to_string(),
            "a positive number of seconds",
        )?;
        range(
            self.data.max_length >= 2,
            "data.max_length",
            self.data.max_length.to_string(),
            "2 or more",
        )?;
        range(
            self.peft.r >= 1,
            "peft.r",
            self.peft.r.to_string(),
            "1 or more",
        )?;
        range(
            self.peft.bottleneck >= 1,
            "peft.bottleneck",
            self.peft.bottleneck.to_string(),
            "1 or more",
        )?;
        range(
            self.peft.num_virtual_tokens >= 1,
            "peft.num_virtual_tokens",
            self.peft.num_virtual_tokens.to_string(),
            "1 or more",
        )?;
        if self.peft.method == PeftMethod::Full && self.model.dtype != Dtype::F32 {
            return Err(Error::Config(format!(
                "peft.method = \"full\" updates the backbone in place and keeps no f32 master copy: set model.dtype = \"f32\" (it is {:?})",
                self.model.dtype
            )));
        }
        range(
            self.peft.alpha > 0.0,
            "peft.alpha",
            self.peft.alpha.to_string(),
            "a positive number",
        )?;
        range(
            (0.0..1.0).contains(&self.peft.dropout),
            "peft.dropout",
            self.peft.dropout.to_string(),
            "0 <= dropout < 1",
        )?;
        range(
            self.train.epochs >= 1,
            "train.epochs",
            self.train.epochs.to_string(),
            "1 or more",
        )?;
        range(
            self.train.batch_size >= 1,
            "train.batch_size",
            self.train.batch_size.to_string(),
            "1 or more",
        )?;
        range(
            self.train.grad_accum >= 1,
            "train.grad_accum",
            self.train.grad_accum.to_string(),
            "1 or more",
        )?;
        range(
            self.train.lr > 0.0 && self.train.lr < 1.0,
            "train.lr",
            self.train.lr.to_string(),
            "0 < lr < 1",
        )?;
        range(
            self.train.weight_decay >= 0.0,
            "train.weight_decay",
            self.train.weight_decay.to_string(),
            "0 or more",
        )?;
        range(
            self.train.adam_eps > 0.0 && self.train.adam_eps.is_finite(),
            "train.adam_eps",
            self.train.adam_eps.to_string(),
            "above 0 (1e-8 is AdamW's usual value)",
        )?;
        range(
            (0.0..=1.0).contains(&self.train.warmup_ratio),
            "train.warmup_ratio",
            self.train.warmup_ratio.to_string(),
            "0 to 1",
        )?;
        range(
            self.train.max_grad_norm >= 0.0,
            "train.max_grad_norm",
            self.train.max_grad_norm.to_string(),
            "0 (off) or more",
        )?;
        range(
            self.train.log_every >= 1,
            "train.log_every",
            self.train.log_every.to_string(),
            "1 or more",
        )?;
        let m = &self.memory;
        range(
            m.capacity >= 1,
            "memory.capacity",
            m.capacity.to_string(),
            "1 or more",
        )?;
        range(
            m.key_size >= 1,
            "memory.key_size",
            m.key_size.to_string(),
            "1 or more",
        )?;
        range(m.k >= 1, "memory.k", m.k.to_string(), "1 or more")?;
        range(
            m.tau > 0.0,
            "memory.tau",
            m.tau.to_string(),
            "a positive number",
        )?;
        range(
            m.layer >= -1,
            "memory.layer",
            m.layer.to_string(),
            "a block index, or -1 for the last",
        )?;
        range(
            m.lambda_mem >= 0.0,
            "memory.lambda_mem",
            m.lambda_mem.to_string(),
            "0 or more",
        )?;
        let u = &self.uncertainty;
        range(
            u.rank >= 1,
            "uncertainty.rank",
            u.rank.to_string(),
            "1 or more",
        )?;
        range(
            u.n_mc >= 1,
            "uncertainty.n_mc",
            u.n_mc.to_string(),
            "1 or more",
        )?;
        if u.mc_predict > 0 && !u.enabled {
            return Err(Error::Config(format!(
                "uncertainty.mc_predict = {}: MC sampling needs uncertainty.enabled = true",
                u.mc_predict
            )));
        }
        range(
            u.mc_predict >= 0,
            "uncertainty.mc_predict",
            u.mc_predict.to_string(),
            "0 (deterministic) or more",
        )?;
        range(
            u.noise_scale >= 0.0,
            "uncertainty.noise_scale",
            u.noise_scale.to_string(),
            "0 or more",
        )?;
        range(
            u.lambda_var >= 0.0,
            "uncertainty.lambda_var",
            u.lambda_var.to_string(),
            "0 or more",
        )?;
        self.data
            .train_corruption
            .validate("data.train_corruption")?;
        self.data.eval_corruption.validate("data.eval_corruption")?;
        if self.data.dataset.trim().is_empty() {
            return Err(Error::Config(
                "data.dataset is empty: give a dataset name or a directory".into(),
            ));
        }
        if m.k > m.capacity {
            return Err(Error::Config(format!(
                "memory.k = {} exceeds memory.capacity = {}: a query cannot read more entries than the memory holds",
                m.k, m.capacity
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = self
            .data
            .label_names
            .iter()
            .find(|n| !seen.insert(n.as_str()))
        {
            return Err(Error::Config(format!(
                "data.label_names has `{dup}` twice: each label needs one name"
            )));
        }
        if !self.run.name.is_empty() && !is_plain_name(&self.run.name) {
            return Err(Error::Config(format!(
                "run.name = `{}` must be a plain directory name (no `/`, no `..`): runs are written inside run.output_dir",
                self.run.name
            )));
        }
        if self.run.threads > 1024 {
            return Err(Error::Config(format!(
                "run.threads = {} is out of range: use 0 (libtorch default) to 1024",
                self.run.threads
            )));
        }
        Ok(())
    }

    /// The config as TOML (what a run directory keeps as `config.toml`).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::Internal(format!("serializing the config as TOML: {e}")))
    }
}

/// An override's value: a TOML literal (`["q_proj", "v_proj"]`, `1e-3`, `true`, `"text"`) when
/// it parses as one, else the raw text.
fn override_value(text: &str) -> config::Value {
    fn convert(v: toml::Value) -> config::Value {
        use config::ValueKind as K;
        let kind = match v {
            toml::Value::String(s) => K::String(s),
            toml::Value::Integer(i) => K::I64(i),
            toml::Value::Float(f) => K::Float(f),
            toml::Value::Boolean(b) => K::Boolean(b),
            toml::Value::Array(a) => K::Array(a.into_iter().map(convert).collect()),
            toml::Value::Table(t) => {
                K::Table(t.into_iter().map(|(k, v)| (k, convert(v))).collect())
            }
            toml::Value::Datetime(d) => K::String(d.to_string()),
        };
        config::Value::new(None, kind)
    }
    match toml::from_str::<toml::Table>(&format!("v = {text}")) {
        Ok(mut t) => t
            .remove("v")
            .map(convert)
            .unwrap_or_else(|| config::Value::new(None, text)),
        Err(_) => config::Value::new(None, text),
    }
}

/// Builds the layers so far and checks them, blaming `origin` (the layer just added) for an
/// error: earlier layers were checked before it was added.
fn check_layer(
    builder: &config::ConfigBuilder<config::builder::DefaultState>,
    origin: &str,
) -> Result<()> {
    let merged = builder
        .build_cloned()
        .map_err(|e| Error::Config(format!("{origin}: {e}")))?;
    check_integers(&merged).map_err(|msg| Error::Config(format!("{origin}: {msg}")))?;
    merged
        .try_deserialize::<Config>()
        .map(drop)
        .map_err(|e| Error::Config(format!("{origin}: {e}")))
}

/// Every leaf of a TOML value by its dotted key (`train.lr` -> 1e-3).
pub fn flatten_toml(v: &toml::Value) -> BTreeMap<String, toml::Value> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", v, &mut out);
    out
}

/// The dotted keys whose values are integers (from the defaults' TOML).
fn integer_keys() -> Vec<String> {
    toml::Value::try_from(Config::default())
        .map(|v| {
            flatten_toml(&v)
                .into_iter()
                .filter(|(_, v)| v.is_integer())
                .map(|(k, _)| k)
                .collect()
        })
        .unwrap_or_default()
}

/// An integer key given a fractional or out-of-range number is an error, not a rounding (the
/// `config` crate would turn `batch_size = 1.5` into 2 and `1e20` into u64::MAX).
fn check_integers(merged: &config::Config) -> std::result::Result<(), String> {
    for key in integer_keys() {
        let Ok(value) = merged.get::<config::Value>(&key) else {
            continue;
        };
        if let config::ValueKind::Float(f) = value.kind {
            return Err(format!("{key} = {f}: expected a whole number (an integer)"));
        }
    }
    Ok(())
}

/// A dataset given as an existing relative directory is kept as an absolute path, so the run can
/// be evaluated from any working directory; names of packaged datasets stay names.
fn absolute_dataset(dataset: &str) -> Result<String> {
    let p = Path::new(dataset);
    if p.is_relative() && p.is_dir() {
        let abs = p.canonicalize().map_err(|e| Error::io(p, e))?;
        Ok(abs.display().to_string())
    } else {
        Ok(dataset.to_string())
    }
}

/// Whether `name` is one plain path component (no `..`, no `/`, not absolute).
fn is_plain_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}

/// `auto` (CUDA if present), `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<tch::Device> {
    let bad = || {
        Error::Config(format!(
            "model.device = `{spec}` is not one of `auto`, `cpu`, `cuda`, `cuda:N`"
        ))
    };
    match spec {
        "auto" => Ok(tch::Device::cuda_if_available()),
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => Ok(tch::Device::Cuda(0)),
        s => {
            let idx = s.strip_prefix("cuda:").ok_or_else(bad)?;
            idx.parse::<usize>()
                .map(tch::Device::Cuda)
                .map_err(|_| bad())
        }
    }
}
