//! The files of a run directory, as types: their names, `run.json` ([`RunRecord`]),
//! `summary.json` ([`Summary`]) and `calibration.json` ([`Calibration`]), and their readers.
//! `run_dir::RunDir` is their one writer; `report`, `restore` and `evaluate` read them here.
use super::eval::EvalResult;
pub use crate::atomic_file::{digest, FileDigest};
use crate::config::Config;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.toml";
pub const RUN_FILE: &str = "run.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
/// The memory's index (its shards are `memory.gN-0000R-of-0000W.safetensors` beside it).
pub const MEMORY_INDEX: &str = "memory.index.json";
/// The whole memory in one file, as runs from before memory shards saved it (still read).
pub const MEMORY_FILE: &str = "memory.safetensors";
pub const CALIBRATION_FILE: &str = "calibration.json";
/// Held (flock) by the process that writes the run; names its host and pid.
pub const LOCK_FILE: &str = "lock";

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Training (or killed without a chance to say so: kill -9, a node failure).
    Running,
    Finished,
    /// Stopped by SIGINT/SIGTERM after saving.
    Interrupted,
    /// Stopped after too many consecutive non-finite losses.
    Diverged,
    /// Stopped by an error (a full disk, a lost rank); the message says which.
    Failed,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Finished => "finished",
            RunState::Interrupted => "interrupted",
            RunState::Diverged => "diverged",
            RunState::Failed => "failed",
        }
    }
}

/// `run.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub label_names: Vec<String>,
    pub state: RunState,
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    /// The step the saved weights are from (None: no weights saved yet).
    #[serde(default)]
    pub weights_step: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The weight files, by name.
    #[serde(default)]
    pub files: BTreeMap<String, FileDigest>,
}

/// `calibration.json`: the post-hoc temperature and the weights it belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    pub temperature: f64,
    pub fitted_on: String,
    /// The step of the weights whose outputs it was fitted on (absent in runs from before it
    /// was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_step: Option<usize>,
}

/// `calibration.json` of run `dir`, if there is one and it belongs to the weights of
/// `weights_step` (a save cut off after the temperature was fitted leaves older weights beside
/// it: that temperature is not theirs, and is not used).
pub fn read_calibration(dir: &Path, weights_step: Option<usize>) -> Result<Option<f64>> {
    let path = dir.join(CALIBRATION_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let c: Calibration =
        serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    if !(c.temperature.is_finite() && c.temperature > 0.0) {
        return Err(Error::format(
            &path,
            "`temperature` must be a positive number",
        ));
    }
    if c.weights_step.is_some() && c.weights_step != weights_step {
        tracing::warn!(
            file = %path.display(),
            "the temperature was fitted on the weights of step {}, the saved weights are of step {}: not used (outputs uncalibrated)",
            c.weights_step.unwrap_or_default(),
            weights_step.map_or("none".into(), |s| s.to_string())
        );
        return Ok(None);
    }
    Ok(Some(c.temperature))
}

/// `run.json` of `dir`; a run from before it existed has its labels in `summary.json` and is
/// finished.
pub fn read_record(dir: &Path) -> Result<RunRecord> {
    let run = dir.join(RUN_FILE);
    if run.is_file() {
        let text = std::fs::read_to_string(&run).map_err(|e| Error::io(&run, e))?;
        return serde_json::from_str(&text).map_err(|e| Error::format(&run, e.to_string()));
    }
    let summary = read_summary(dir)?;
    Ok(RunRecord {
        label_names: summary.label_names,
        state: RunState::Finished,
        step: summary.steps,
        total_steps: summary.steps,
        weights_step: Some(summary.steps),
        message: None,
        files: BTreeMap::new(),
    })
}

/// `summary.json` of a finished run.
pub fn read_summary(dir: &Path) -> Result<Summary> {
    let path = dir.join(SUMMARY_FILE);
    if !path.is_file() {
        return Err(Error::run(
            dir,
            format!("no {SUMMARY_FILE} and no {RUN_FILE}: not a run directory, or one that never started"),
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))
}

/// `summary.json`: a finished run's numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub model: String,
    pub dataset: String,
    pub method: String,
    pub label_names: Vec<String>,
    pub trainable_params: i64,
    pub backbone_params: i64,
    #[serde(with = "crate::finite_json")]
    pub trainable_share: f64,
    pub steps: usize,
    pub skipped_steps: usize,
    #[serde(with = "crate::finite_json")]
    pub train_tokens_per_s: f64,
    #[serde(with = "crate::finite_json")]
    pub seconds: f64,
    pub validation: EvalResult,
    pub test: Option<EvalResult>,
    /// The `--set` overrides the run was started with (a sweep's grid point among them).
    #[serde(default)]
    pub overrides: Vec<String>,
    /// The resolved hyper-parameters reports group by (see [`hyper_parameters`]).
    #[serde(default)]
    pub hyper: BTreeMap<String, serde_json::Value>,
    /// Uncertainty modeling at the last logged step: the noise-to-feature ratio, and per block
    /// the mean relative variance and the share of tokens whose variance moved from the prior
    /// (the `um.*` probes of metrics.jsonl; empty without UM).
    #[serde(default)]
    pub um: BTreeMap<String, f64>,
}

impl Summary {
    /// What `cfg` and the model's sizes say of a run; its steps, throughput and scores start at
    /// zero for the caller to fill in.
    pub fn of(
        cfg: &Config,
        run_dir: &Path,
        label_names: Vec<String>,
        trainable_params: i64,
        backbone_params: i64,
    ) -> Self {
        Summary {
            run_dir: run_dir.to_path_buf(),
            model: cfg.model.source.clone(),
            dataset: cfg.data.dataset.clone(),
            method: cfg.peft.method.name().to_string(),
            label_names,
            trainable_params,
            backbone_params,
            trainable_share: trainable_params as f64 / backbone_params.max(1) as f64,
            steps: 0,
            skipped_steps: 0,
            train_tokens_per_s: 0.0,
            seconds: 0.0,
            validation: Default::default(),
            test: None,
            overrides: cfg.overrides.0.clone(),
            hyper: hyper_parameters(cfg),
            um: BTreeMap::new(),
        }
    }
}

/// The hyper-parameters of `cfg` a report groups runs by: optimization, the PEFT method, the
/// seed, and which parts of the method are on.
/// The hyper-parameter key of the training labels' noise (the robustness protocol's third axis).
pub const TRAIN_LABEL_NOISE: &str = "data.train_corruption.label_noise";

pub fn hyper_parameters(cfg: &Config) -> BTreeMap<String, serde_json::Value> {
    use serde_json::json;
    let t = &cfg.train;
    BTreeMap::from([
        ("train.lr".to_string(), json!(t.lr)),
        ("train.batch_size".into(), json!(t.batch_size)),
        ("train.grad_accum".into(), json!(t.grad_accum)),
        ("train.epochs".into(), json!(t.epochs)),
        ("train.max_steps".into(), json!(t.max_steps)),
        ("train.warmup_ratio".into(), json!(t.warmup_ratio)),
        ("train.weight_decay".into(), json!(t.weight_decay)),
        ("peft.method".into(), json!(cfg.peft.method.name())),
        ("peft.r".into(), json!(cfg.peft.r)),
        ("run.seed".into(), json!(cfg.run.seed)),
        ("uncertainty.enabled".into(), json!(cfg.uncertainty.enabled)),
        ("memory.enabled".into(), json!(cfg.memory.enabled)),
        (
            TRAIN_LABEL_NOISE.into(),
            json!(cfg.data.train_corruption.label_noise),
        ),
    ])
}

impl Summary {
    /// The fraction of training labels flipped (0 for runs older than the key).
    pub fn train_label_noise(&self) -> f64 {
        self.hyper
            .get(TRAIN_LABEL_NOISE)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    }

    /// Whether every metric is a finite number.
    pub fn is_finite(&self) -> bool {
        self.validation.is_finite() && self.test.as_ref().is_none_or(EvalResult::is_finite)
    }
}
