//! (IA)^3 (Liu et al. 2022, <https://arxiv.org/abs/2205.05638>) as Hugging Face PEFT implements it:
//! a learned vector `ia3_l` (initialized to ones) scales a layer's output, or, for the MLP's output
//! projection (PEFT's `feedforward_modules`), its input. Kept in f32; shapes as PEFT stores them,
//! `(n_out, 1)` or `(1, n_in)`, so PEFT's adapter files load unchanged.
use tch::{nn, Kind, Tensor};

pub struct Ia3Scale {
    pub l: Tensor,
    feedforward: bool,
}

/// The MLP output projections, whose input (IA)^3 scales (PEFT's defaults for GPT-2 and LLaMA).
pub fn is_feedforward(module: &str) -> bool {
    module.ends_with("mlp.c_proj") || module.ends_with("down_proj")
}

impl Ia3Scale {
    pub fn new(p: &nn::Path, module: &str, n_in: i64, n_out: i64) -> Self {
        let feedforward = is_feedforward(module);
        let shape = if feedforward { [1, n_in] } else { [n_out, 1] };
        Ia3Scale {
            l: p.var("ia3_l", &shape, nn::Init::Const(1.0)),
            feedforward,
        }
    }

    pub fn forward(&self, x: &Tensor, base: impl Fn(&Tensor) -> Tensor) -> Tensor {
        let scale = self.l.flatten(0, -1);
        if self.feedforward {
            base(&(x.to_kind(Kind::Float) * scale).to_kind(x.kind()))
        } else {
            let y = base(x);
            let kind = y.kind();
            (y * scale).to_kind(kind)
        }
    }
}
