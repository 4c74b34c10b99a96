//! BitFit (Ben Zaken et al. 2022, <https://arxiv.org/abs/2106.10199>): only the bias terms train.
//! Each bias gets a zero-initialized trainable shift in f32 (`{module}.bias_delta`), so the frozen
//! bias stays bitwise unchanged, step 0 equals the backbone exactly, and layers without a bias
//! (LLaMA's projections) get one. Training the shift has the same gradient as training the bias.
use tch::{nn, Tensor};

/// A zero `(n,)` trainable shift under `p`.
pub fn bias_delta(p: &nn::Path, n: i64) -> Tensor {
    p.var("bias_delta", &[n], nn::Init::Const(0.0))
}
