//! Houlsby adapters (Houlsby et al. 2019, <https://arxiv.org/abs/1902.00751>): a bottleneck MLP
//! `h + up(gelu(down(h)))` on the output of the attention and MLP output projections, before the
//! residual sum. `down` has PyTorch's Linear init, `up` is zero, so a fresh adapter is the exact
//! identity. Kept in f32. (The paper also trains the layer norms; here they stay frozen.)
use tch::{nn, Kind, Tensor};

pub struct Bottleneck {
    down: nn::Linear,
    up: nn::Linear,
}

impl Bottleneck {
    pub fn new(p: &nn::Path, d: i64, bottleneck: i64) -> Self {
        let a = p / "adapter";
        let zero = nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        };
        Bottleneck {
            down: nn::linear(&a / "down", d, bottleneck, Default::default()),
            up: nn::linear(&a / "up", bottleneck, d, zero),
        }
    }

    /// `h (..., d)` in any dtype → same shape and dtype.
    pub fn forward(&self, h: &Tensor) -> Tensor {
        use tch::nn::Module;
        let z = self
            .up
            .forward(&self.down.forward(&h.to_kind(Kind::Float)).gelu("none"));
        h + z.to_kind(h.kind())
    }
}
