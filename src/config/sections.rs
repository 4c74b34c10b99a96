//! The sections of the experiment config (`[model]`, `[data]`, ...), their defaults, and the
//! enums their string values parse into.
use super::values::{BestMetric, Checkpointing, DeviceSpec, Quantize};
use super::Corruption;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Where the model comes from and how it is held in memory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A local directory (config.json + safetensors), a `.gguf` file, a hub id
    /// (`openai-community/gpt2`), or `default` for the packaged SmolLM2-135M.
    pub source: String,
    pub dtype: Dtype,
    pub device: DeviceSpec,
    /// The frozen base's linear layers held as int8 or 4-bit blocks (QLoRA-like), or dense.
    pub quantize: Quantize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            source: "default".into(),
            dtype: Dtype::F32,
            device: DeviceSpec::Auto,
            quantize: Quantize::None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
    /// bf16 on CUDA, f32 on the CPU: replaced by one of them when the config is loaded.
    Auto,
}

impl Dtype {
    /// `auto` made concrete for `device`: bf16 where it will run on CUDA, else f32.
    pub fn resolve(self, device: DeviceSpec) -> Dtype {
        let cuda = match device {
            DeviceSpec::Cpu => false,
            DeviceSpec::Cuda(_) => true,
            DeviceSpec::Auto => tch::Cuda::is_available(),
        };
        match self {
            Dtype::Auto if cuda => Dtype::Bf16,
            Dtype::Auto => Dtype::F32,
            d => d,
        }
    }

    pub fn kind(self) -> tch::Kind {
        match self {
            // (`auto` is resolved at load; f32 if it ever is not.)
            Dtype::F32 | Dtype::Auto => tch::Kind::Float,
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
            "auto" => Ok(Dtype::Auto),
            other => Err(format!(
                "dtype `{other}` is not one of `f32`, `bf16`, `f16`, `auto`"
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
            Dtype::Auto => "auto",
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
    /// Also log to TensorBoard event files in `RUN/tb/` (rank 0).
    pub tensorboard: bool,
    /// Stop after this many consecutive steps with a non-finite loss.
    pub max_bad_steps: usize,
    /// Mixed precision for forward passes: "off", "bf16" or "f16" (matmuls in that dtype on
    /// f32 weights, as torch.autocast; meant for CUDA, slow on most CPUs).
    pub autocast: Autocast,
    /// Activation checkpointing: `false`, `true` (every block), or N (every N-th block, as
    /// torchtune's `ac_option`): those blocks, below the first one carrying uncertainty modeling
    /// or the memory, keep only their inputs and are recomputed in the backward pass.
    pub activation_checkpointing: Checkpointing,
    /// On CUDA, let f32 matmuls (adapters, uncertainty modeling, the memory, the head) run in
    /// TF32 on the tensor cores (`torch.backends.cuda.matmul.allow_tf32`). No effect on CPU.
    pub tf32: bool,
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
            tensorboard: true,
            max_bad_steps: 10,
            autocast: Autocast::Off,
            activation_checkpointing: Checkpointing::OFF,
            tf32: true,
        }
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
    pub best: BestMetric,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every: 500,
            keep: 2,
            best: BestMetric::None,
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
    /// The bank's key dtype: `f32` or `bf16` (values stay f32).
    pub key_dtype: super::KeyDtype,
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
            key_dtype: Default::default(),
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
    /// The noise relative to each token's feature RMS (`s sqrt(p) rms(h) eps`, rms detached), so
    /// p is a relative variance; false: the older absolute `s sqrt(p) eps`.
    pub relative: bool,
    /// Damping of the pooled representation where uncertain.
    pub suppression: bool,
    /// Heteroscedastic logits with the sampled-softmax loss.
    pub heteroscedastic: bool,
    /// Samples of the sampled-softmax loss.
    pub n_mc: i64,
    /// Weight of the variance regularizer.
    pub lambda_var: f64,
    /// The variance regularizer: `kl` to `prior_var`, or the older `l1` (mean(p)).
    pub regularizer: super::VarRegularizer,
    /// The prior relative variance p0 of the `kl` regularizer (0.01: noise of 10% of the RMS).
    pub prior_var: f64,
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
            relative: true,
            suppression: true,
            heteroscedastic: true,
            n_mc: 8,
            lambda_var: 1e-3,
            regularizer: Default::default(),
            prior_var: 0.01,
            conditioned_temperature: true,
            mc_predict: 0,
        }
    }
}
