//! Typed experiment configuration: a TOML file, then `UMTUNE__SECTION__KEY` environment variables,
//! then `--set section.key=value` overrides (later wins), merged by the `config` crate and
//! deserialized with serde (`deny_unknown_fields`). `validate()` runs before any tensor exists.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            threads: 0,
            seed: 42,
            output_dir: "runs".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub run: RunConfig,
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
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        for item in overrides {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                Error::Config(format!(
                    "override `{item}` must look like section.key=value"
                ))
            })?;
            builder = builder
                .set_override(key.trim(), value.trim())
                .map_err(|e| Error::Config(format!("override `{item}`: {e}")))?;
        }
        let merged = builder
            .build()
            .map_err(|e| Error::Config(describe(file, &e)))?;
        let cfg: Config = merged
            .try_deserialize()
            .map_err(|e| Error::Config(describe(file, &e)))?;
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
        if self.run.threads > 1024 {
            return Err(Error::Config(format!(
                "run.threads = {} is out of range: use 0 (libtorch default) to 1024",
                self.run.threads
            )));
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

fn describe(file: Option<&Path>, e: &config::ConfigError) -> String {
    match file {
        Some(f) => format!("{}: {e}", f.display()),
        None => e.to_string(),
    }
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
