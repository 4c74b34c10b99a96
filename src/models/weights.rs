//! Where backbone tensors come from: memory-mapped safetensors (one file or sharded with
//! `model.safetensors.index.json`), GGUF (see `gguf.rs`), or seeded random init for benchmarks.
//! Every tensor a model asks for is checked for presence and shape; tensors left over are errors.
use super::adapt::{AdapterSource, LinearAdapter, LinearSite};
use super::quant::{FrozenWeight, QuantWeight, Quantized, BLOCK};
use crate::config::Quantize;
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
    /// Leaves `name` unread on purpose (a tensor the task does not use): not an error at
    /// [`Self::finish`].
    fn skip(&mut self, name: &str);
    /// Fails if tensors were left that no model parameter took.
    fn finish(&mut self) -> Result<()>;
    /// The weight `name (n_out, n_in)` as `bits`-quantized blocks on `device` when the source
    /// stores it in that layout already (a GGUF file's Q8_0, Q4_0, Q4_1 tensors), taking it;
    /// None: take it dense and quantize it.
    fn take_quantized(
        &mut self,
        _name: &str,
        _shape: &[i64],
        _bits: i64,
        _device: Device,
    ) -> Result<Option<QuantWeight>> {
        Ok(None)
    }
}

/// What a backbone's constructors read through: the weight source, the working dtype, how the
/// linear layers are held (`model.quantize`) and the adapters a fine-tuning method hands out.
pub struct Loader<'a> {
    pub weights: &'a mut dyn WeightSource,
    pub kind: Kind,
    pub quantize: Quantize,
    pub adapters: &'a dyn AdapterSource,
    /// The weights held quantized so far (they live outside the VarStore).
    pub quantized: Quantized,
}

impl Loader<'_> {
    /// The frozen tensor `name` under `p` (see [`frozen_param`]).
    pub fn param(&mut self, p: &nn::Path, name: &str, shape: &[i64]) -> Result<Tensor> {
        frozen_param(p, self.weights, self.kind, name, shape)
    }

    /// The adapter the fine-tuning method gives the linear layer at `p`, which reads the output
    /// of the module `input` (see [`LinearSite`]).
    pub fn adapter(
        &self,
        p: &nn::Path,
        input: &str,
        n_in: i64,
        n_out: i64,
    ) -> Option<Box<dyn LinearAdapter>> {
        let module = p.components().collect::<Vec<_>>().join(".");
        self.adapters.linear(&LinearSite {
            module: &module,
            input,
            n_in,
            n_out,
        })
    }

    /// The weight of the linear layer at `p`, `(n_out, n_in)`, or `(n_in, n_out)` when the
    /// checkpoint stores it `transposed` (GPT-2's Conv1D; a dense weight stays as stored).
    pub fn linear_weight(
        &mut self,
        p: &nn::Path,
        n_in: i64,
        n_out: i64,
        transposed: bool,
    ) -> Result<FrozenWeight> {
        let shape = if transposed {
            [n_in, n_out]
        } else {
            [n_out, n_in]
        };
        let Some(bits) = self.quantize.bits() else {
            return Ok(FrozenWeight::Dense(self.param(p, "weight", &shape)?));
        };
        let name = p.path("weight");
        if n_in % BLOCK != 0 {
            return Err(Error::Config(format!(
                "model.quantize = \"{}\": `{name}` has {n_in} inputs, not a multiple of the block size {BLOCK}; use model.quantize = \"none\"",
                self.quantize.as_str()
            )));
        }
        let device = p.device();
        let stored = match transposed {
            false => self.weights.take_quantized(&name, &shape, bits, device)?,
            true => None,
        };
        let q = match stored {
            Some(q) => q,
            None => {
                // In f32, so a bf16 run quantizes the checkpoint's values, not their bf16 rounding.
                let w = self.weights.take(&name, &shape, Kind::Float, device)?;
                let w = if transposed { w.tr() } else { w };
                QuantWeight::quantize(&w, bits)
            }
        };
        self.quantized.params += n_in * n_out;
        self.quantized.bytes += q.bytes();
        Ok(FrozenWeight::Quantized(q))
    }
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

/// A tensor's bytes as a file holds them: borrowed from a contiguous CPU tensor (one made for it
/// otherwise), so that writing a file copies its tensors once, into the file.
struct TensorBytes {
    tensor: Tensor,
    dtype: safetensors::Dtype,
}

impl TensorBytes {
    fn new(path: &Path, name: &str, t: &Tensor) -> Result<Self> {
        let dtype = dtype_of(t.kind()).ok_or_else(|| {
            Error::tensor(path, name, format!("cannot be saved as {:?}", t.kind()))
        })?;
        let tensor = if t.device() == Device::Cpu && t.is_contiguous() {
            t.shallow_clone()
        } else {
            t.to_device(Device::Cpu).contiguous()
        };
        Ok(TensorBytes { tensor, dtype })
    }

    fn bytes(&self) -> &[u8] {
        let len = self.tensor.numel() * self.tensor.kind().elt_size_in_bytes();
        if len == 0 {
            return &[];
        }
        // SAFETY: a contiguous CPU tensor of `len` bytes, alive while `self` is borrowed; saving
        // happens between training steps, so nothing writes to it meanwhile.
        unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, len) }
    }
}

/// Writes `tensors` as a safetensors file at `path` atomically (see [`crate::atomic_file`]) and
/// returns the file's digest, hashed while it is written (see [`SafetensorsFile`]).
pub fn write_safetensors_atomic<S: AsRef<str>, T: AsRef<Tensor>>(
    path: &Path,
    tensors: &[(S, T)],
) -> Result<crate::atomic_file::FileDigest> {
    SafetensorsFile::new(path, tensors)?.write()
}

/// A safetensors file ready to be written: made where the tensors live, written (by
/// [`Self::write`]) on any thread, e.g. beside another file's write. The tensors go from their
/// memory to the file without an intermediate buffer: the safetensors crate writes only through
/// a buffer or a path of its own, so the header (the format's JSON: dtype, shape, data offsets,
/// padded with spaces to 8 bytes) is made here, tensors laid out as the crate does (by
/// descending alignment, then name, so every tensor is aligned); the tests read the files back
/// with the crate and with Python's safetensors.
pub struct SafetensorsFile {
    path: PathBuf,
    header: Vec<u8>,
    tensors: Vec<TensorBytes>,
}

impl SafetensorsFile {
    pub fn new<S: AsRef<str>, T: AsRef<Tensor>>(path: &Path, tensors: &[(S, T)]) -> Result<Self> {
        let mut views = tensors
            .iter()
            .map(|(name, t)| {
                Ok((
                    name.as_ref(),
                    TensorBytes::new(path, name.as_ref(), t.as_ref())?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        views.sort_by(|(a, x), (b, y)| {
            let size = |v: &TensorBytes| v.tensor.kind().elt_size_in_bytes();
            size(y).cmp(&size(x)).then(a.cmp(b))
        });
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, v) in &views {
            let end = offset + v.bytes().len();
            let info = serde_json::json!({
                "dtype": v.dtype,
                "shape": v.tensor.size(),
                "data_offsets": [offset, end],
            });
            if header.insert(name.to_string(), info).is_some() {
                return Err(Error::tensor(path, name, "is named twice"));
            }
            offset = end;
        }
        let mut json = serde_json::to_vec(&header)
            .map_err(|e| Error::Internal(format!("{}: header: {e}", path.display())))?;
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut header = (json.len() as u64).to_le_bytes().to_vec();
        header.extend(json);
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            header,
            tensors: views.into_iter().map(|(_, v)| v).collect(),
        })
    }

    /// Writes the file atomically and returns its digest.
    pub fn write(self) -> Result<crate::atomic_file::FileDigest> {
        crate::atomic_file::write_parts_atomic_digest(&self.path, &self.parts())
    }

    /// Writes the file as a new file, synced, not renamed into place (see
    /// [`crate::atomic_file::write_parts_new_digest`]), and returns its digest.
    pub fn write_new(self) -> Result<crate::atomic_file::FileDigest> {
        crate::atomic_file::write_parts_new_digest(&self.path, &self.parts())
    }

    fn parts(&self) -> Vec<&[u8]> {
        let mut parts: Vec<&[u8]> = vec![&self.header];
        parts.extend(self.tensors.iter().map(TensorBytes::bytes));
        parts
    }
}

/// The tensors of a safetensors file, read without a copy: the file is memory-mapped read-only
/// (pages read ahead) and each tensor is a view into the map. A view must not outlive this value,
/// nor be written to (the pages are read-only: a write faults): what a caller keeps, it copies
/// (`copy_` into its own tensors, `index_select`, [`Self::take`]). Read access goes through
/// `Deref` to the name → tensor map.
pub struct MappedSafetensors {
    // Declared before the map: dropped first.
    tensors: HashMap<String, Tensor>,
    map: Option<memmap2::Mmap>,
}

impl MappedSafetensors {
    /// Maps the safetensors file at `path`; with `want`, its size and checksum are checked on the
    /// mapped bytes before it returns (`recorded_in` names the record in errors).
    pub fn open(
        path: &Path,
        want: Option<(&crate::atomic_file::FileDigest, &str)>,
    ) -> Result<Self> {
        let mapped = Self::open_unchecked(path)?;
        if let Some((want, recorded_in)) = want {
            crate::atomic_file::check_bytes(path, mapped.bytes(), want, recorded_in)?;
        }
        Ok(mapped)
    }

    /// Maps the file without checking it: the caller checks [`Self::bytes`] (see
    /// [`while_checking`]) before it trusts anything it read.
    pub fn open_unchecked(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only; umtune replaces files by renaming, never in place.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
            .map_err(|e| Error::io(path, e))?;
        let views: Vec<(String, Kind, Vec<i64>, std::ops::Range<usize>)> = {
            let st = safetensors::SafeTensors::deserialize(&map)
                .map_err(|e| Error::format(path, e.to_string()))?;
            let base = map.as_ptr() as usize;
            st.tensors()
                .into_iter()
                .map(|(name, view)| {
                    let kind = kind_of(view.dtype()).ok_or_else(|| {
                        Error::tensor(path, &name, format!("unsupported dtype {:?}", view.dtype()))
                    })?;
                    let shape = view.shape().iter().map(|&d| d as i64).collect();
                    let start = view.data().as_ptr() as usize - base;
                    Ok((name, kind, shape, start..start + view.data().len()))
                })
                .collect::<Result<_>>()?
        };
        let mut tensors = HashMap::new();
        for (name, kind, shape, bytes) in views {
            let aligned = bytes.start % kind.elt_size_in_bytes() == 0;
            let t = if bytes.is_empty() || !aligned {
                Tensor::f_from_data_size(&map[bytes], &shape, kind)?
            } else {
                let mut strides = vec![1i64; shape.len()];
                for i in (0..shape.len().saturating_sub(1)).rev() {
                    strides[i] = strides[i + 1] * shape[i + 1];
                }
                // SAFETY: in bounds (safetensors checked the offsets against the file's size),
                // aligned for `kind`, alive as long as `self` (see the type's doc).
                unsafe {
                    Tensor::f_from_blob(
                        map.as_ptr().add(bytes.start),
                        &shape,
                        &strides,
                        kind,
                        Device::Cpu,
                    )?
                }
            };
            tensors.insert(name, t);
        }
        Ok(MappedSafetensors {
            tensors,
            map: Some(map),
        })
    }

    /// Tensors already in memory (nothing mapped).
    pub fn owned(tensors: HashMap<String, Tensor>) -> Self {
        MappedSafetensors { tensors, map: None }
    }

    /// The file's bytes (none when [`Self::owned`]).
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or_default()
    }

    /// Removes `name` and returns it as a tensor of its own (a copy when mapped).
    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        let t = self.tensors.remove(name)?;
        Some(if self.map.is_some() { t.copy() } else { t })
    }
}

impl std::ops::Deref for MappedSafetensors {
    type Target = HashMap<String, Tensor>;
    fn deref(&self) -> &Self::Target {
        &self.tensors
    }
}

/// One file to check: its path, its bytes, the digest it must have and where that was recorded.
pub type Check<'a> = (
    &'a Path,
    &'a [u8],
    &'a crate::atomic_file::FileDigest,
    &'a str,
);

/// Runs `work` (which reads the files) while a second thread checks them, so that checking costs
/// no time beside the copy. A failed check wins over whatever `work` returned: what it copied
/// must then not be used, and every caller ends its load with the error.
pub fn while_checking<R>(checks: &[Check], work: impl FnOnce() -> Result<R>) -> Result<R> {
    while_checking_and(checks, || Ok(()), work).map(|((), r)| r)
}

/// [`while_checking`], where the checking thread, once every check passed, also does `after`
/// (its share of the copy: checking takes a few milliseconds, the copy most of the load).
pub fn while_checking_and<A: Send, R>(
    checks: &[Check],
    after: impl FnOnce() -> Result<A> + Send,
    work: impl FnOnce() -> Result<R>,
) -> Result<(A, R)> {
    std::thread::scope(|s| {
        let checker = s.spawn(|| {
            checks
                .iter()
                .try_for_each(|(path, bytes, want, recorded_in)| {
                    crate::atomic_file::check_bytes(path, bytes, want, recorded_in)
                })?;
            after()
        });
        let done = work();
        let side = checker.join().expect("a checksum does not panic")?;
        Ok((side, done?))
    })
}

fn dtype_of(kind: Kind) -> Option<safetensors::Dtype> {
    use safetensors::Dtype as D;
    Some(match kind {
        Kind::Float => D::F32,
        Kind::Half => D::F16,
        Kind::BFloat16 => D::BF16,
        Kind::Double => D::F64,
        Kind::Int64 => D::I64,
        Kind::Int => D::I32,
        Kind::Uint8 => D::U8,
        Kind::Bool => D::BOOL,
        _ => return None,
    })
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

    fn skip(&mut self, name: &str) {
        let key = self.key_for(name).unwrap_or_else(|| name.to_string());
        self.optional.insert(key);
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
    fn skip(&mut self, _name: &str) {}
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
