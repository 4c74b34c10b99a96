//! Typed experiment configuration: a TOML file, then `UMTUNE__SECTION__KEY` environment variables,
//! then `--set section.key=value` overrides (later wins), merged by the `config` crate and
//! deserialized with serde (`deny_unknown_fields`). `validate()` runs before any tensor exists.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod corruption;
mod paths;
mod sections;
mod validate;
mod values;

pub use corruption::Corruption;
pub use paths::{asset_cache, hub_offline};
pub use sections::*;
pub use values::{BestMetric, Checkpointing, DeviceSpec, KeyDtype, Quantize, VarRegularizer};

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
    /// The config file `config` with `overrides`.
    pub fn file(config: &Path, overrides: &OverrideArgs) -> ConfigArgs {
        ConfigArgs {
            config: Some(config.to_path_buf()),
            overrides: overrides.clone(),
            model: None,
        }
    }

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
        cfg.model.dtype = cfg.model.dtype.resolve(cfg.model.device);
        cfg.overrides = Overrides(overrides.to_vec());
        cfg.validate()?;
        Ok(cfg)
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
