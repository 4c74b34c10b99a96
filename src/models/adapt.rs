//! How a fine-tuning method reaches into a backbone: while a backbone is built, each linear layer
//! (and norm) asks an [`AdapterSource`] for a trainable part, and a linear layer with one runs
//! its frozen weights through it. The backbones know only these traits; `peft` implements them
//! (its `Injector` and `Adapter`), so models never import the methods that adapt them.
use tch::Tensor;

/// The trainable part of one linear layer.
pub trait LinearAdapter: Send {
    /// The adapted layer's output for `x`, where `base` is the frozen layer.
    fn forward(&self, x: &Tensor, base: &dyn Fn(&Tensor) -> Tensor) -> Tensor;
}

/// One linear layer of a backbone being built.
pub struct LinearSite<'a> {
    /// The layer's Hugging Face path (`model.layers.0.self_attn.q_proj`).
    pub module: &'a str,
    /// What the layer reads, named by the module that makes it (`model.layers.0.input_layernorm`
    /// for q, k and v): layers with equal `input` read the same tensor, so a method may share work
    /// on it (LoRA's dropout).
    pub input: &'a str,
    pub n_in: i64,
    pub n_out: i64,
}

/// Hands out adapters while a backbone is built.
pub trait AdapterSource {
    /// The adapter of the linear layer at `site`, if it gets one.
    fn linear(&self, site: &LinearSite) -> Option<Box<dyn LinearAdapter>>;
    /// A trainable shift of the bias of the norm at `module` (BitFit), if it gets one.
    fn norm_bias(&self, module: &str, d: i64) -> Option<Tensor>;
}

/// No adapters: the plain frozen backbone.
pub struct NoAdapters;

impl AdapterSource for NoAdapters {
    fn linear(&self, _: &LinearSite) -> Option<Box<dyn LinearAdapter>> {
        None
    }
    fn norm_bias(&self, _: &str, _: i64) -> Option<Tensor> {
        None
    }
}
