//! GGUF (llama.cpp's format, <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>):
//! header, metadata, tensor directory, and dequantization of F32, F16, BF16, Q8_0, Q4_0 and Q4_1
//! to the working dtype (or the blocks as stored, for a quantized base), for the `llama`
//! architecture. The weight source over it is `gguf_source.rs`.
//!
//! Written by hand: the crates that read GGUF come inside whole frameworks (candle, llama.cpp
//! bindings) whose tensor types we do not use; the format and these block layouts are small.
use crate::data::tokenizer::GgufVocab;
use crate::error::{Error, Result};
use crate::models::hf_config::{ArchConfig, LlamaConfig};
use crate::models::quant::QuantWeight;
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(v) => Some(*v),
            _ => None,
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(v) => Some(*v),
            Value::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// ggml tensor types this reader dequantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    /// (elements per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Row-major shape (GGUF stores dimensions innermost first; this is reversed).
    pub shape: Vec<i64>,
    pub dtype: GgmlType,
    pub offset: usize,
    pub n_bytes: usize,
}

pub struct GgufFile {
    pub path: PathBuf,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    mmap: Mmap,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                Error::format(
                    self.path,
                    format!("truncated GGUF: need {n} bytes at offset {}", self.pos),
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            Error::format(
                self.path,
                format!("invalid UTF-8 string at offset {}", self.pos),
            )
        })
    }
    fn value(&mut self, ty: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::Int(self.take(1)?[0] as i64),
            1 => Value::Int(self.take(1)?[0] as i8 as i64),
            2 => {
                let s = self.take(2)?;
                Value::Int(u16::from_le_bytes([s[0], s[1]]) as i64)
            }
            3 => {
                let s = self.take(2)?;
                Value::Int(i16::from_le_bytes([s[0], s[1]]) as i64)
            }
            4 => Value::Int(self.u32()? as i64),
            5 => Value::Int(self.u32()? as i32 as i64),
            6 => Value::Float(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let item_ty = self.u32()?;
                let n = self.u64()? as usize;
                let mut items = Vec::with_capacity(n.min(1 << 24));
                for _ in 0..n {
                    items.push(self.value(item_ty)?);
                }
                Value::Array(items)
            }
            10 => Value::Int(self.u64()? as i64),
            11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            other => {
                return Err(Error::format(
                    self.path,
                    format!("unknown metadata type {other}"),
                ))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of a file we do not modify.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path,
        };
        if c.take(4)? != b"GGUF" {
            return Err(Error::format(path, "not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        let n_tensors = c.u64()? as usize;
        let n_kv = c.u64()? as usize;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            metadata.insert(key, c.value(ty)?);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64()? as i64);
            }
            dims.reverse();
            let ty_id = c.u32()?;
            let offset = c.u64()? as usize;
            infos.push((name, dims, ty_id, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_i64)
            .unwrap_or(32) as usize;
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, shape, ty_id, offset) in infos {
            let dtype = GgmlType::from_id(ty_id).ok_or_else(|| {
                Error::tensor(
                    path,
                    &name,
                    format!(
                        "ggml type {ty_id} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1)"
                    ),
                )
            })?;
            let numel: i64 = shape.iter().product();
            let (per_block, block_bytes) = dtype.block();
            if !(numel as usize).is_multiple_of(per_block) {
                return Err(Error::tensor(
                    path,
                    &name,
                    "element count is not a whole number of blocks",
                ));
            }
            let n_bytes = numel as usize / per_block * block_bytes;
            let start = data_start + offset;
            if start + n_bytes > mmap.len() {
                return Err(Error::tensor(
                    path,
                    &name,
                    "data runs past the end of the file",
                ));
            }
            tensors.insert(
                name,
                TensorInfo {
                    shape,
                    dtype,
                    offset: start,
                    n_bytes,
                },
            );
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            metadata,
            tensors,
            mmap,
        })
    }

    fn meta_i64(&self, key: &str) -> Option<i64> {
        self.metadata.get(key).and_then(Value::as_i64)
    }

    fn meta_str_array(&self, key: &str) -> Option<Vec<String>> {
        match self.metadata.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => None,
        }
    }

    /// The tensor dequantized to f32 on the CPU.
    pub fn dequantize(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "missing from the GGUF file"))?;
        let bytes = &self.mmap[info.offset..info.offset + info.n_bytes];
        let values = dequantize(info.dtype, bytes);
        Ok(Tensor::from_slice(&values).reshape(&info.shape))
    }

    /// A 2-d tensor's blocks as stored, when its type is the layout of `bits` (8: Q8_0; 4: Q4_0 or
    /// Q4_1), on the CPU; None for any other type (it is then dequantized and quantized at load).
    pub fn blocks(&self, name: &str, bits: i64) -> Result<Option<QuantWeight>> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "missing from the GGUF file"))?;
        let (header, values) = match (info.dtype, bits) {
            (GgmlType::Q8_0, 8) => (2, 32),
            (GgmlType::Q4_0, 4) => (2, 16),
            (GgmlType::Q4_1, 4) => (4, 16),
            _ => return Ok(None),
        };
        let &[n, k] = info.shape.as_slice() else {
            return Ok(None);
        };
        let nb = k / 32;
        let bytes = &self.mmap[info.offset..info.offset + info.n_bytes];
        // (blocks, bytes per block): an f16 scale, Q4_1's f16 min, then the values (little-endian).
        let raw = Tensor::from_slice(bytes).view([n * nb, header + values]);
        let half = |start| {
            (raw.narrow(1, start, 2).contiguous())
                .view_dtype(Kind::Half)
                .view([n, nb])
        };
        let q = raw.narrow(1, header, values).contiguous();
        let q = match bits {
            8 => q.view_dtype(Kind::Int8).view([n, k]),
            _ => q.view([n, k / 2]),
        };
        let min = (header == 4).then(|| half(2));
        Ok(Some(QuantWeight::from_blocks(q, half(0), min, bits)))
    }

    /// LLaMA hyper-parameters from `llama.*` metadata.
    pub fn arch_config(&self) -> Result<ArchConfig> {
        let arch = self
            .metadata
            .get("general.architecture")
            .and_then(Value::as_str)
            .unwrap_or("");
        if arch != "llama" {
            return Err(Error::format(
                &self.path,
                format!("general.architecture `{arch}` is not supported: use llama"),
            ));
        }
        if self.tensors.contains_key("rope_freqs.weight") {
            return Err(Error::format(
                &self.path,
                "rope_freqs.weight (llama3 rope scaling baked into GGUF) is not supported yet",
            ));
        }
        let need = |k: &str| {
            self.meta_i64(k)
                .map(|v| v as usize)
                .ok_or_else(|| Error::format(&self.path, format!("metadata `{k}` is missing")))
        };
        let hidden_size = need("llama.embedding_length")?;
        let heads = need("llama.attention.head_count")?;
        let vocab_size = match self.meta_i64("llama.vocab_size") {
            Some(v) => v as usize,
            None => self
                .meta_str_array("tokenizer.ggml.tokens")
                .map(|t| t.len())
                .unwrap_or(0),
        };
        let f = |k: &str, default: f64| {
            self.metadata
                .get(k)
                .and_then(Value::as_f64)
                .unwrap_or(default)
        };
        Ok(ArchConfig::Llama(LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: need("llama.feed_forward_length")?,
            num_hidden_layers: need("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: self
                .meta_i64("llama.attention.head_count_kv")
                .map(|v| v as usize)
                .unwrap_or(heads),
            head_dim: self
                .meta_i64("llama.rope.dimension_count")
                .map(|v| v as usize)
                .unwrap_or(hidden_size / heads),
            // GGUF keeps this as f32; the f64 of the same f32 is what transformers reads too.
            rms_norm_eps: f("llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: f("llama.rope.freq_base", 10000.0),
            rope_scaling: None,
            max_position_embeddings: self.meta_i64("llama.context_length").unwrap_or(2048) as usize,
            tie_word_embeddings: !self.tensors.contains_key("output.weight"),
            attention_bias: self.tensors.contains_key("blk.0.attn_q.bias"),
            mlp_bias: false,
        }))
    }

    /// The embedded tokenizer description.
    pub fn vocab(&self) -> Result<GgufVocab> {
        let m = |k: &str| self.metadata.get(k);
        let tokens = self
            .meta_str_array("tokenizer.ggml.tokens")
            .ok_or_else(|| {
                Error::format(&self.path, "metadata `tokenizer.ggml.tokens` is missing")
            })?;
        let token_types = match m("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_i64().unwrap_or(1) as i32)
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let id = |k: &str| self.meta_i64(k).map(|v| v as u32);
        Ok(GgufVocab {
            model: m("tokenizer.ggml.model")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            pre: m("tokenizer.ggml.pre")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string(),
            merges: self
                .meta_str_array("tokenizer.ggml.merges")
                .unwrap_or_default(),
            tokens,
            token_types,
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            pad_id: id("tokenizer.ggml.padding_token_id"),
            add_bos: matches!(m("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true))),
        })
    }
}

/// Blocks to f32, following ggml's reference `dequantize_row_*`.
pub fn dequantize(dtype: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let (per_block, block_bytes) = dtype.block();
    let mut out = vec![0f32; bytes.len() / block_bytes * per_block];
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    out.par_chunks_mut(per_block * 1024)
        .zip(bytes.par_chunks(block_bytes * 1024))
        .for_each(|(dst, src)| {
            for (y, x) in dst.chunks_mut(per_block).zip(src.chunks(block_bytes)) {
                match dtype {
                    GgmlType::F32 => y[0] = f32::from_le_bytes([x[0], x[1], x[2], x[3]]),
                    GgmlType::F16 => y[0] = h(x),
                    GgmlType::BF16 => y[0] = bf16::from_le_bytes([x[0], x[1]]).to_f32(),
                    GgmlType::Q8_0 => {
                        let d = h(x);
                        for (yi, &q) in y.iter_mut().zip(&x[2..34]) {
                            *yi = q as i8 as f32 * d;
                        }
                    }
                    GgmlType::Q4_0 => {
                        let d = h(x);
                        for (j, &q) in x[2..18].iter().enumerate() {
                            y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                            y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                        }
                    }
                    GgmlType::Q4_1 => {
                        let (d, m) = (h(x), h(&x[2..4]));
                        for (j, &q) in x[4..20].iter().enumerate() {
                            y[j] = (q & 0x0F) as f32 * d + m;
                            y[j + 16] = (q >> 4) as f32 * d + m;
                        }
                    }
                }
            }
        });
    out
}
