//! Architecture hyper-parameters, read from a Hugging Face `config.json` (transformers 4 and 5
//! spellings), from GGUF metadata, or taken from a named preset.
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub enum ArchConfig {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
}

impl ArchConfig {
    pub fn num_layers(&self) -> usize {
        match self {
            ArchConfig::Gpt2(c) => c.n_layer,
            ArchConfig::Llama(c) => c.num_hidden_layers,
        }
    }
    pub fn hidden_size(&self) -> usize {
        match self {
            ArchConfig::Gpt2(c) => c.n_embd,
            ArchConfig::Llama(c) => c.hidden_size,
        }
    }
    /// `(layers, key/value heads, head dim)`: the shape of one token's KV cache entry.
    pub fn kv_shape(&self) -> (i64, i64, i64) {
        match self {
            ArchConfig::Gpt2(c) => (
                c.n_layer as i64,
                c.n_head as i64,
                (c.n_embd / c.n_head) as i64,
            ),
            ArchConfig::Llama(c) => (
                c.num_hidden_layers as i64,
                c.num_key_value_heads as i64,
                c.head_dim as i64,
            ),
        }
    }
    pub fn vocab_size(&self) -> usize {
        match self {
            ArchConfig::Gpt2(c) => c.vocab_size,
            ArchConfig::Llama(c) => c.vocab_size,
        }
    }
    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            ArchConfig::Gpt2(c) => c.tie_word_embeddings,
            ArchConfig::Llama(c) => c.tie_word_embeddings,
        }
    }

    /// Named shapes: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `smollm2-135m`, `llama3-8b`,
    /// `llama3.1-8b`.
    pub fn preset(name: &str) -> Result<ArchConfig> {
        let gpt2 = |n_embd, n_layer, n_head| {
            ArchConfig::Gpt2(Gpt2Config {
                n_embd,
                n_layer,
                n_head,
                ..Gpt2Config::default()
            })
        };
        let llama3_8b = |rope_scaling| {
            ArchConfig::Llama(LlamaConfig {
                vocab_size: 128256,
                hidden_size: 4096,
                intermediate_size: 14336,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                head_dim: 128,
                rms_norm_eps: 1e-5,
                rope_theta: 500000.0,
                rope_scaling,
                max_position_embeddings: if rope_scaling.is_some() { 131072 } else { 8192 },
                tie_word_embeddings: false,
                attention_bias: false,
                mlp_bias: false,
            })
        };
        Ok(match name {
            "gpt2" => gpt2(768, 12, 12),
            "gpt2-medium" => gpt2(1024, 24, 16),
            "gpt2-large" => gpt2(1280, 36, 20),
            "gpt2-xl" => gpt2(1600, 48, 25),
            "smollm2-135m" => ArchConfig::Llama(LlamaConfig {
                vocab_size: 49152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                head_dim: 64,
                rms_norm_eps: 1e-5,
                rope_theta: 100000.0,
                rope_scaling: None,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                attention_bias: false,
                mlp_bias: false,
            }),
            "llama3-8b" => llama3_8b(None),
            "llama3.1-8b" => llama3_8b(Some(Llama3RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            })),
            other => {
                return Err(Error::Config(format!(
                    "unknown preset `{other}`: use gpt2, gpt2-medium, gpt2-large, gpt2-xl, smollm2-135m, llama3-8b or llama3.1-8b"
                )))
            }
        })
    }

    pub fn from_file(path: &Path) -> Result<ArchConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        Self::from_json(&json).map_err(|msg| Error::format(path, msg))
    }

    pub fn from_json(json: &Value) -> std::result::Result<ArchConfig, String> {
        let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
        match model_type {
            "gpt2" => Gpt2Config::from_json(json).map(ArchConfig::Gpt2),
            "llama" => LlamaConfig::from_json(json).map(ArchConfig::Llama),
            other => Err(format!(
                "model_type `{other}` is not supported: use gpt2 or llama"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_inner: usize,
    pub layer_norm_epsilon: f64,
    pub tie_word_embeddings: bool,
}

impl Default for Gpt2Config {
    fn default() -> Self {
        Gpt2Config {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: 0,
            layer_norm_epsilon: 1e-5,
            tie_word_embeddings: true,
        }
    }
}

impl Gpt2Config {
    pub fn inner(&self) -> usize {
        if self.n_inner == 0 {
            4 * self.n_embd
        } else {
            self.n_inner
        }
    }

    fn from_json(j: &Value) -> std::result::Result<Self, String> {
        let act = j
            .get("activation_function")
            .and_then(Value::as_str)
            .unwrap_or("gelu_new");
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            return Err(format!(
                "activation_function `{act}` is not supported: use gelu_new"
            ));
        }
        for flag in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
            if j.get(flag).and_then(Value::as_bool).unwrap_or(false) {
                return Err(format!("`{flag}` = true is not supported"));
            }
        }
        let d = Gpt2Config::default();
        let c = Gpt2Config {
            vocab_size: get_usize(j, "vocab_size")?.unwrap_or(d.vocab_size),
            n_positions: get_usize(j, "n_positions")?.unwrap_or(d.n_positions),
            n_embd: get_usize(j, "n_embd")?.unwrap_or(d.n_embd),
            n_layer: get_usize(j, "n_layer")?.unwrap_or(d.n_layer),
            n_head: get_usize(j, "n_head")?.unwrap_or(d.n_head),
            n_inner: get_usize(j, "n_inner")?.unwrap_or(0),
            layer_norm_epsilon: get_f64(j, "layer_norm_epsilon")?.unwrap_or(d.layer_norm_epsilon),
            tie_word_embeddings: j
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        };
        if c.n_head == 0 || !c.n_embd.is_multiple_of(c.n_head) {
            return Err(format!(
                "n_embd {} is not divisible by n_head {}",
                c.n_embd, c.n_head
            ));
        }
        Ok(c)
    }
}

/// The `llama3` rope-scaling rule (Llama 3.1 and later).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
}

impl LlamaConfig {
    fn from_json(j: &Value) -> std::result::Result<Self, String> {
        let need = |k: &str| get_usize(j, k)?.ok_or_else(|| format!("missing `{k}`"));
        let hidden_size = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        if heads == 0 || (!hidden_size.is_multiple_of(heads) && get_usize(j, "head_dim")?.is_none())
        {
            return Err(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {heads}"
            ));
        }
        let kv_heads = get_usize(j, "num_key_value_heads")?.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        // transformers 5 moves rope settings into `rope_parameters`; 4.x uses `rope_theta` and
        // `rope_scaling`.
        let rope = j
            .get("rope_parameters")
            .or_else(|| j.get("rope_scaling"))
            .filter(|v| !v.is_null());
        let rope_theta = get_f64(j, "rope_theta")?
            .or(rope
                .map(|r| get_f64(r, "rope_theta"))
                .transpose()?
                .flatten())
            .unwrap_or(10000.0);
        let rope_scaling = match rope {
            None => None,
            Some(r) => {
                let kind = r
                    .get("rope_type")
                    .or_else(|| r.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| {
                            get_f64(r, k)?.ok_or_else(|| format!("rope scaling: missing `{k}`"))
                        };
                        Some(Llama3RopeScaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: get_usize(
                                r,
                                "original_max_position_embeddings",
                            )?
                            .ok_or("rope scaling: missing `original_max_position_embeddings`")?,
                        })
                    }
                    other => {
                        return Err(format!(
                            "rope_type `{other}` is not supported: use default or llama3"
                        ))
                    }
                }
            }
        };
        Ok(LlamaConfig {
            vocab_size: need("vocab_size")?,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: get_usize(j, "head_dim")?.unwrap_or(hidden_size / heads),
            rms_norm_eps: get_f64(j, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: get_usize(j, "max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: j
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias: j
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            mlp_bias: j.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

fn get_usize(j: &Value, key: &str) -> std::result::Result<Option<usize>, String> {
    match j.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or_else(|| format!("`{key}` must be a non-negative integer, got {v}")),
    }
}

fn get_f64(j: &Value, key: &str) -> std::result::Result<Option<f64>, String> {
    match j.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("`{key}` must be a number, got {v}")),
    }
}
