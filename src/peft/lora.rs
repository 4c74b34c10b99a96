//! LoRA (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>) as Hugging Face PEFT implements it:
//! `y = W x + (B A dropout(x)) * scale`, A kaiming-uniform (a = sqrt 5), B zero, scale alpha / r
//! (or alpha / sqrt r with rsLoRA, Kalajdzievski 2023). Adapters are kept in f32 whatever the
//! backbone's dtype and computed in the backbone's dtype.
use super::TrainingFlag;
use tch::{nn, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    /// Module names (last path component) that get adapters, e.g. `q_proj`, `c_attn`.
    pub targets: Vec<String>,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

pub struct LoraLinear {
    pub a: Tensor,
    pub b: Tensor,
    scale: f64,
    dropout: f64,
    training: TrainingFlag,
}

impl LoraLinear {
    pub fn new(
        p: &nn::Path,
        spec: &LoraSpec,
        n_in: i64,
        n_out: i64,
        training: TrainingFlag,
    ) -> Self {
        let bound = 1.0 / (n_in as f64).sqrt(); // kaiming_uniform(a = sqrt(5)) on fan_in
        let a = (p / "lora_A").var(
            "weight",
            &[spec.r, n_in],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let b = (p / "lora_B").var("weight", &[n_out, spec.r], nn::Init::Const(0.0));
        LoraLinear {
            a,
            b,
            scale: spec.scale(),
            dropout: spec.dropout,
            training,
        }
    }

    /// The low-rank update for input `x (..., n_in)`, computed in `x`'s dtype with the f32
    /// weights cast at use (as PEFT under autocast): no f32 copy of the activation is made or kept
    /// for the backward (in bf16 the dropped input and its mask are bf16, the mask's draw a
    /// transient).
    pub fn delta(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = if self.dropout > 0.0 && self.training.get() {
            // Inverted dropout with a per-example mask (dimension 0 runs over the examples).
            let keep = crate::ffi::streams::rand(&x.size(), 0, x).ge(self.dropout);
            x * keep.to_kind(kind) / (1.0 - self.dropout)
        } else {
            x.shallow_clone()
        };
        h.linear::<&Tensor>(&self.a.to_kind(kind), None)
            .linear::<&Tensor>(&self.b.to_kind(kind), None)
            * self.scale
    }
}
