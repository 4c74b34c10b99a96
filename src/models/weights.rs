//! Where backbone tensors come from: memory-mapped safetensors (one file or sharded with
//! `model.safetensors.index.json`), GGUF (see `gguf.rs`), or seeded random init for benchmarks.
//! Every tensor a model asks for is checked for presence and shape; tensors left over are errors.
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// A store of named tensors a model is built from, named by Hugging Face keys.
pub trait WeightSource {
    /// The tensor `name` with exactly `shape`, as `kind` on `device`.
    fn take(&mut self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor>;
    /// Whether `name` is present (for optional tensors such as an untied `lm_head.weight`).
    fn contains(&self, name: &str) -> bool;
    /// Fails if tensors were left that no model parameter took.
    fn finish(&mut self) -> Result<()>;
}

/// Takes `name` under `p` from `w` and registers it in `p`'s VarStore as a frozen variable, so
/// that the variable path is the checkpoint key.
pub fn frozen_param(
    p: &nn::Path,
    w: &mut dyn WeightSource,
    kind: Kind,
    name: &str,
    shape: &[i64],
) -> Result<Tensor> {
    let t = w.take(&p.path(name), shape, kind, p.device())?;
    Ok(p.add(name, t, false))
}

/// Buffers and caches that Hugging Face checkpoints carry but that are not parameters.
fn is_ignorable(key: &str) -> bool {
    key.ends_with(".attn.bias")
        || key.ends_with(".attn.masked_bias")
        || key.ends_with("rotary_emb.inv_freq")
}

struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<i64>,
    start: usize,
    end: usize,
}

pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
    taken: BTreeSet<String>,
    /// Tensors the model may legitimately skip (a saved copy of a tied `lm_head.weight`).
    optional: BTreeSet<String>,
}

impl SafetensorsSource {
    /// Opens `model.safetensors`, or every shard that `model.safetensors.index.json` names.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&index, e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index, "no `weight_map` object"))?;
            let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            return Self::open(&paths);
        }
        Self::open(&[dir.join("model.safetensors")])
    }

    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is opened read-only and not modified while mapped.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                if entries.contains_key(&name) {
                    return Err(Error::tensor(path, &name, "appears in two shards"));
                }
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        dtype: info.dtype,
                        shape: info.shape.iter().map(|&d| d as i64).collect(),
                        start: base + info.data_offsets.0,
                        end: base + info.data_offsets.1,
                    },
                );
            }
            files.push((path.clone(), mmap));
        }
        Ok(SafetensorsSource {
            files,
            entries,
            taken: BTreeSet::new(),
            optional: BTreeSet::new(),
        })
    }

    /// Marks `name` as allowed to stay unused.
    pub fn allow_unused(&mut self, name: &str) {
        self.optional.insert(name.to_string());
    }

    /// Checkpoints saved from the base model (`GPT2Model`, `LlamaModel`) lack the
    /// `transformer.` / `model.` prefix that the causal-LM layout has.
    fn key_for(&self, name: &str) -> Option<String> {
        if self.entries.contains_key(name) {
            return Some(name.to_string());
        }
        let stripped = name.split_once('.').map(|(_, rest)| rest)?;
        self.entries
            .contains_key(stripped)
            .then(|| stripped.to_string())
    }

    fn describe_files(&self) -> PathBuf {
        match self.files.as_slice() {
            [(p, _)] => p.clone(),
            _ => self
                .files
                .first()
                .map(|(p, _)| p.with_file_name("model.safetensors.index.json"))
                .unwrap_or_default(),
        }
    }
}

/// Writes `tensors` as a safetensors file at `path` atomically (see [`crate::atomic_file`]).
pub fn write_safetensors_atomic<S: AsRef<str>, T: AsRef<Tensor>>(
    path: &Path,
    tensors: &[(S, T)],
) -> Result<()> {
    crate::atomic_file::write_atomic_with(path, |tmp| {
        Tensor::write_safetensors(tensors, tmp).map_err(|e| Error::format(tmp, e.to_string()))
    })
}

/// Every tensor of the safetensors file at `path`, read once through a memory map; with `want`,
/// the file's size and sha256 are checked against it first (`recorded_in` names the record in
/// the error). One pass over the bytes for the check, one copy into the tensors.
pub fn read_safetensors_checked(
    path: &Path,
    want: Option<(&crate::atomic_file::FileDigest, &str)>,
) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is only read; umtune replaces files by renaming, never in place.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    if let Some((want, recorded_in)) = want {
        crate::atomic_file::check_bytes(path, &mmap, want, recorded_in)?;
    }
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::format(path, e.to_string()))?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let kind = kind_of(view.dtype()).ok_or_else(|| {
                Error::tensor(path, &name, format!("unsupported dtype {:?}", view.dtype()))
            })?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
            Ok((name, t))
        })
        .collect()
}

fn kind_of(dtype: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype as D;
    Some(match dtype {
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::F64 => Kind::Double,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        _ => return None,
    })
}

impl WeightSource for SafetensorsSource {
    fn take(&mut self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let key = self.key_for(name).ok_or_else(|| {
            Error::tensor(self.describe_files(), name, "missing from the checkpoint")
        })?;
        let entry = &self.entries[&key];
        let path = &self.files[entry.file].0;
        if entry.shape != shape {
            return Err(Error::tensor(
                path,
                &key,
                format!("has shape {:?}, the model expects {:?}", entry.shape, shape),
            ));
        }
        let file_kind = kind_of(entry.dtype).ok_or_else(|| {
            Error::tensor(path, &key, format!("unsupported dtype {:?}", entry.dtype))
        })?;
        let bytes = &self.files[entry.file].1[entry.start..entry.end];
        let t = Tensor::f_from_data_size(bytes, shape, file_kind)?
            .f_to_kind(kind)?
            .f_to_device(device)?;
        self.taken.insert(key);
        Ok(t)
    }

    fn contains(&self, name: &str) -> bool {
        self.key_for(name).is_some()
    }

    fn finish(&mut self) -> Result<()> {
        let left: Vec<&String> = self
            .entries
            .keys()
            .filter(|k| !self.taken.contains(*k) && !self.optional.contains(*k) && !is_ignorable(k))
            .collect();
        if let Some(first) = left.iter().min() {
            let path = self.files[self.entries[*first].file].0.clone();
            return Err(Error::tensor(
                path,
                first,
                format!(
                    "is unexpected: the model has no such parameter ({} unexpected in all)",
                    left.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Seeded N(0, 0.02) weights (norm scales 1, biases 0) for benchmarks and shape checks.
pub struct RandomSource;

impl WeightSource for RandomSource {
    fn take(&mut self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let is_norm = name.contains("norm") || name.contains("ln_");
        let t = if name.ends_with(".bias") {
            Tensor::zeros(shape, (kind, device))
        } else if is_norm {
            Tensor::ones(shape, (kind, device))
        } else {
            Tensor::randn(shape, (Kind::Float, device))
                .g_mul_scalar(0.02)
                .to_kind(kind)
        };
        Ok(t)
    }
    fn contains(&self, _name: &str) -> bool {
        true
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
