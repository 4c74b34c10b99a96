//! LoRA (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>) as Hugging Face PEFT implements it:
//! `y = W x + (B A dropout(x)) * scale`, A kaiming-uniform (a = sqrt 5), B zero, scale alpha / r
//! (or alpha / sqrt r with rsLoRA, Kalajdzievski 2023). Adapters are kept in f32 whatever the
//! backbone's dtype and computed in the backbone's dtype.
//!
//! Adapters that read the same input (q, k and v read the attention norm's output; gate and up
//! the MLP norm's) share one dropout of it ([`SharedDropout`]): one mask and one dropped copy kept
//! for the backward instead of one per adapter. PEFT draws a mask per adapter; the expectation
//! of each adapter's update is the same, only the masks' correlation across q, k and v differs.
use super::TrainingFlag;
use std::sync::{Arc, Mutex};
use tch::{nn, Tensor};

/// The last input dropped, while adapters that read it are still to come.
struct Dropped {
    input: Tensor,
    dropped: Tensor,
    left: usize,
}

/// One dropout of an input shared by the adapters that read it: the first adapter to see an
/// input draws its mask; the others reading the same tensor take the dropped copy; the last one
/// lets it go (nothing outlives the forward pass).
#[derive(Default)]
pub struct SharedDropout {
    /// Adapters reading this input.
    readers: Mutex<usize>,
    last: Mutex<Option<Dropped>>,
}

impl SharedDropout {
    /// One more adapter reads this input.
    pub fn add_reader(&self) {
        *self.readers.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    /// Inverted dropout with rate `p` of `x`, with a per-example mask (dimension 0 runs over the
    /// examples). The mask is a bool (what `masked_fill` keeps for the backward), the dropped copy
    /// in `x`'s dtype.
    fn apply(&self, x: &Tensor, p: f64) -> Tensor {
        let readers = *self.readers.lock().unwrap_or_else(|e| e.into_inner());
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = last.as_mut() {
            // The held input is alive, so an equal address and shape is the same tensor.
            if d.input.data_ptr() == x.data_ptr() && d.input.size() == x.size() {
                d.left -= 1;
                let dropped = d.dropped.shallow_clone();
                if d.left == 0 {
                    *last = None;
                }
                return dropped;
            }
        }
        let drop = crate::ffi::streams::rand(&x.size(), 0, x).lt(p);
        let dropped = x.masked_fill(&drop, 0.0) * (1.0 / (1.0 - p));
        *last = (readers > 1).then(|| Dropped {
            input: x.shallow_clone(),
            dropped: dropped.shallow_clone(),
            left: readers - 1,
        });
        dropped
    }
}

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
    shared: Arc<SharedDropout>,
    training: TrainingFlag,
}

impl LoraLinear {
    /// The adapter of a `n_in -> n_out` layer whose input's dropout is `shared` with the other
    /// adapters reading it.
    pub fn new(
        p: &nn::Path,
        spec: &LoraSpec,
        (n_in, n_out): (i64, i64),
        shared: Arc<SharedDropout>,
        training: TrainingFlag,
    ) -> Self {
        shared.add_reader();
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
            shared,
            training,
        }
    }

    /// The low-rank update for input `x (..., n_in)`, computed in `x`'s dtype with the f32
    /// weights cast at use (as PEFT under autocast): no f32 copy of the activation is made or kept
    /// for the backward (the dropped input is in `x`'s dtype, its mask a bool shared with the
    /// adapters reading the same input, the mask's f32 draw a transient).
    pub fn delta(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = if self.dropout > 0.0 && self.training.get() {
            self.shared.apply(x, self.dropout)
        } else {
            x.shallow_clone()
        };
        h.linear::<&Tensor>(&self.a.to_kind(kind), None)
            .linear::<&Tensor>(&self.b.to_kind(kind), None)
            * self.scale
    }
}
