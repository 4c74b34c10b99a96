//! A quantized frozen base (`model.quantize`; QLoRA, Dettmers et al. 2023, trains adapters over a
//! 4-bit base the same way): a linear layer's weight stays resident as blocks of 32 values along
//! its input dimension with f16 scales, in ggml's layouts so that a GGUF file's blocks are taken
//! as they are:
//! - `int8`: Q8_0, value = q * scale, q in [-127, 127] (quantized at load with scale =
//!   absmax / 127, rounded to nearest);
//! - `q4`: Q4_1, value = nibble * scale + min (quantized at load with min = the block's minimum,
//!   scale = (max - min) / 15, rounded to nearest), or Q4_0 from a GGUF file, value =
//!   (nibble - 8) * scale.
//!
//! At use the layer dequantizes its weight into the working dtype, one layer at a time (the
//! transient), and the backward dequantizes again (`ffi::quant`): autograd never keeps a dense
//! copy, so activation checkpointing's recompute dequantizes a third time. ATen's int8/int4 pack
//! GEMMs (`_weight_int8pack_mm`, `_weight_int4pack_mm`) take per-channel or group layouts tuned
//! for decoding a few rows; training multiplies thousands, so umtune dequantizes and calls the
//! dense GEMM (`bench/quantized.py` measures both).
use crate::ffi::quant::{self, Blocks};
use tch::{Kind, Tensor};

/// Values per block (along the input dimension), as in ggml.
pub const BLOCK: i64 = 32;

/// One linear layer's weight `(n_out, n_in)` as quantized blocks.
pub struct QuantWeight {
    /// int8 `(n_out, n_in)` (8 bits) or uint8 `(n_out, n_in / 2)` of packed nibbles in ggml's
    /// order (a block's 16 bytes hold its values 0..15 in the low nibbles, 16..31 in the high).
    q: Tensor,
    /// f16 `(n_out, n_in / 32)`.
    scale: Tensor,
    /// f16 `(n_out, n_in / 32)`: Q4_1's offsets (None for Q8_0 and Q4_0).
    min: Option<Tensor>,
    bits: i64,
}

/// `1 / d`, 0 where `d` is 0 (an all-zero block).
fn inverse(d: &Tensor) -> Tensor {
    d.reciprocal().masked_fill(&d.eq(0.0), 0.0)
}

impl QuantWeight {
    /// Quantizes `w (n_out, n_in)` (any float dtype; n_in a multiple of [`BLOCK`]) to `bits` 8
    /// or 4. The values are computed from the stored (f16-rounded) scale and min, so rounding to
    /// nearest holds for what is dequantized.
    pub fn quantize(w: &Tensor, bits: i64) -> QuantWeight {
        let (n, k) = (w.size()[0], w.size()[1]);
        let blocks = w.to_kind(Kind::Float).view([n, k / BLOCK, BLOCK]);
        if bits == 8 {
            let scale = (blocks.abs().amax(-1, false) / 127.0).to_kind(Kind::Half);
            let inv = inverse(&scale.to_kind(Kind::Float)).unsqueeze(-1);
            let q = (blocks * inv).round().clamp(-127, 127).to_kind(Kind::Int8);
            return QuantWeight {
                q: q.view([n, k]),
                scale,
                min: None,
                bits,
            };
        }
        let lo = blocks.amin(-1, false);
        let scale = ((blocks.amax(-1, false) - &lo) / 15.0).to_kind(Kind::Half);
        let min = lo.to_kind(Kind::Half);
        let inv = inverse(&scale.to_kind(Kind::Float)).unsqueeze(-1);
        let v = ((blocks - min.to_kind(Kind::Float).unsqueeze(-1)) * inv)
            .round()
            .clamp(0, 15)
            .to_kind(Kind::Uint8); // (n, nb, 32)
        let packed = v
            .narrow(2, 0, 16)
            .bitwise_or_tensor(&v.narrow(2, 16, 16).bitwise_left_shift_tensor_scalar(4));
        QuantWeight {
            q: packed.view([n, k / 2]),
            scale,
            min: Some(min),
            bits,
        }
    }

    /// Blocks already in ggml's layout (a GGUF tensor), validated by the caller's shapes.
    pub fn from_blocks(q: Tensor, scale: Tensor, min: Option<Tensor>, bits: i64) -> QuantWeight {
        QuantWeight {
            q,
            scale,
            min,
            bits,
        }
    }

    /// The same weight with its rows reordered by `f` (applied to every per-row tensor).
    pub fn map_rows(self, f: impl Fn(&Tensor) -> Tensor) -> QuantWeight {
        QuantWeight {
            q: f(&self.q),
            scale: f(&self.scale),
            min: self.min.as_ref().map(&f),
            bits: self.bits,
        }
    }

    pub fn to_device(self, device: tch::Device) -> QuantWeight {
        self.map_rows(|t| t.to_device(device))
    }

    fn blocks(&self) -> Blocks<'_> {
        Blocks {
            q: &self.q,
            scale: &self.scale,
            min: self.min.as_ref(),
            bits: self.bits,
        }
    }

    /// `x (..., n_in) W^T`, differentiable in `x`, keeping no dense W.
    pub fn linear(&self, x: &Tensor) -> Tensor {
        quant::linear(x, &self.blocks())
    }

    /// The dense weight `(n_out, n_in)` in `kind` (exactly what [`Self::linear`] multiplies by).
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        let like = Tensor::empty([0], (kind, self.q.device()));
        quant::dequantize(&self.blocks(), &like)
    }

    /// `(n_out, n_in)`.
    pub fn shape(&self) -> (i64, i64) {
        (self.scale.size()[0], self.scale.size()[1] * BLOCK)
    }

    /// Bytes resident.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        size(&self.q) + size(&self.scale) + self.min.as_ref().map_or(0, size)
    }
}

/// Resident bytes per weight of a `bits`-quantized layer: the values, an f16 scale per block and,
/// for 4 bits quantized at load (Q4_1), an f16 min per block.
pub fn bytes_per_param(bits: i64) -> f64 {
    match bits {
        8 => 1.0 + 2.0 / BLOCK as f64,
        _ => 0.5 + 4.0 / BLOCK as f64,
    }
}

/// What a backbone holds quantized: weights and resident bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quantized {
    pub params: i64,
    pub bytes: u64,
}

/// The weight of a frozen linear layer: dense (a VarStore variable) or quantized.
pub enum FrozenWeight {
    Dense(Tensor),
    Quantized(QuantWeight),
}

impl FrozenWeight {
    /// `x W^T + bias` for a weight stored `(n_out, n_in)`.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        match self {
            FrozenWeight::Dense(w) => x.linear(w, bias),
            FrozenWeight::Quantized(q) => match bias {
                Some(b) => q.linear(x) + b,
                None => q.linear(x),
            },
        }
    }
}
