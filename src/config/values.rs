//! The config values that are more than a number or a word: `model.device` ([`DeviceSpec`]),
//! `checkpoint.best` ([`BestMetric`]) and `train.activation_checkpointing` ([`Checkpointing`]).
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// `model.device`: `auto` (CUDA if present, `cuda:LOCAL_RANK` under a launcher), `cpu`, `cuda`
/// (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    Auto,
    Cpu,
    /// `cuda` (None: device 0) or `cuda:N`.
    Cuda(Option<usize>),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Cuda(Some(i)) => write!(f, "cuda:{i}"),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(spec: String) -> std::result::Result<Self, String> {
        match spec.as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            s => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(|i| DeviceSpec::Cuda(Some(i)))
                .ok_or_else(|| {
                    format!("model.device = `{spec}` is not one of `auto`, `cpu`, `cuda`, `cuda:N`")
                }),
        }
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl DeviceSpec {
    /// The device of the process with `local_rank`. Asking for CUDA where there is none (or for
    /// a device index past the last) is a config error, not a libtorch backtrace.
    pub fn device(self, local_rank: usize) -> Result<tch::Device> {
        let index = match self {
            DeviceSpec::Cpu => return Ok(tch::Device::Cpu),
            DeviceSpec::Auto if !tch::Cuda::is_available() => return Ok(tch::Device::Cpu),
            DeviceSpec::Auto => local_rank,
            DeviceSpec::Cuda(i) => i.unwrap_or(0),
        };
        let count = tch::Cuda::device_count() as usize;
        if index >= count {
            let have = if count == 0 {
                "this machine has no CUDA device (or libtorch was loaded without CUDA)".to_string()
            } else {
                format!("this machine has CUDA devices 0 to {}", count - 1)
            };
            return Err(Error::Config(format!(
                "model.device = `{self}` asks for cuda:{index}, but {have}: use `cpu` or `auto`"
            )));
        }
        Ok(tch::Device::Cuda(index))
    }
}

/// `checkpoint.best`: the validation score the best checkpoint is kept by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BestMetric {
    /// `""`: keep no best checkpoint besides the newest.
    #[serde(rename = "")]
    None,
    #[serde(rename = "accuracy")]
    Accuracy,
    #[serde(rename = "macro_f1")]
    MacroF1,
    #[serde(rename = "loss")]
    Loss,
}

/// `uncertainty.regularizer`: what keeps the feature variance p in check. `kl` (METHOD.md
/// section 1): `0.5 (p / p0 - log(p / p0) - 1)` to the prior relative variance `p0 =
/// uncertainty.prior_var`, zero at the prior and rising on both sides, so p neither grows nor
/// collapses unless the task pays for it; `l1`: the older `mean(p)`, which only pushes p down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum VarRegularizer {
    #[default]
    #[serde(rename = "kl")]
    Kl,
    #[serde(rename = "l1")]
    L1,
}

/// `memory.key_dtype`: how the memory bank holds its keys (values stay f32). `bf16` halves the
/// keys' bytes; scores are then computed from the bf16 keys (a query against its own exact key
/// still scores highest, but near-ties round together more often: the tie rule orders them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum KeyDtype {
    #[default]
    #[serde(rename = "f32")]
    F32,
    #[serde(rename = "bf16")]
    Bf16,
}

impl KeyDtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            KeyDtype::F32 => tch::Kind::Float,
            KeyDtype::Bf16 => tch::Kind::BFloat16,
        }
    }

    pub fn kind_name(self) -> &'static str {
        match self {
            KeyDtype::F32 => "f32",
            KeyDtype::Bf16 => "bf16",
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            KeyDtype::F32 => 4,
            KeyDtype::Bf16 => 2,
        }
    }
}

/// `model.quantize`: how the frozen base's linear layers are held. `int8` and `q4` keep them as
/// blocks of 32 values with f16 scales (ggml's Q8_0 and Q4_1 layouts; a GGUF file's Q8_0, Q4_0 and
/// Q4_1 tensors are taken as they are) and dequantize one layer at a time at use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Quantize {
    #[default]
    #[serde(rename = "none")]
    None,
    #[serde(rename = "int8")]
    Int8,
    #[serde(rename = "q4")]
    Q4,
}

impl Quantize {
    /// Bits per stored value (None: dense).
    pub fn bits(self) -> Option<i64> {
        match self {
            Quantize::None => None,
            Quantize::Int8 => Some(8),
            Quantize::Q4 => Some(4),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Quantize::None => "none",
            Quantize::Int8 => "int8",
            Quantize::Q4 => "q4",
        }
    }
}

/// `train.activation_checkpointing`: 0 (`false`) off, else N: every N-th block is recomputed
/// (`true` is 1). Written back as `false`, `true` or N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpointing(pub usize);

impl Checkpointing {
    pub const OFF: Checkpointing = Checkpointing(0);
    /// N (every N-th block is recomputed), if on.
    pub fn every(self) -> Option<usize> {
        (self.0 > 0).then_some(self.0)
    }
}

impl Serialize for Checkpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0 {
            0 => s.serialize_bool(false),
            1 => s.serialize_bool(true),
            n => s.serialize_u64(n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Checkpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        type R<E> = std::result::Result<Checkpointing, E>;
        impl serde::de::Visitor<'_> for V {
            type Value = Checkpointing;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false, or a number of blocks per checkpoint")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> R<E> {
                Ok(Checkpointing(usize::from(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> R<E> {
                usize::try_from(v).map(Checkpointing).map_err(|_| {
                    E::custom(format!(
                        "train.activation_checkpointing = {v}: use true, false or a number of blocks"
                    ))
                })
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> R<E> {
                Ok(Checkpointing(v as usize))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> R<E> {
                match v {
                    "true" => Ok(Checkpointing(1)),
                    "false" => Ok(Checkpointing(0)),
                    n => n.parse().map(Checkpointing).map_err(|_| {
                        E::custom(format!(
                            "train.activation_checkpointing = `{n}`: use true, false or a number of blocks"
                        ))
                    }),
                }
            }
        }
        d.deserialize_any(V)
    }
}
