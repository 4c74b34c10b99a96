//! Frozen decoder backbones (GPT-2, LLaMA-3) and how their weights arrive.
//!
//! A backbone never knows its rank or reads the environment; it sees token ids, an attention
//! mask and a [`LayerHook`] through which the plug-in modules of METHOD.md sit between blocks.
pub mod adapt;
pub mod attention;
pub mod generate;
pub mod gguf;
pub mod gguf_source;
pub mod gpt2;
pub mod hf_config;
pub mod llama;
pub mod quant;
pub mod resolve;
pub mod weights;

use tch::{nn, Device, Kind, Tensor};

pub use hf_config::ArchConfig;
pub use resolve::{resolve, ModelFiles};
pub use weights::WeightSource;

/// Called after every block with its output hidden states `(b, t, d)`; returns what the next
/// block sees. The backbone itself has no idea what the hook does.
pub trait LayerHook {
    fn after_block(&mut self, layer: usize, hidden: Tensor) -> Tensor;
}

/// The identity hook.
pub struct NoHook;

impl LayerHook for NoHook {
    fn after_block(&mut self, _layer: usize, hidden: Tensor) -> Tensor {
        hidden
    }
}

/// Records every block's output (for tests and feature extraction).
#[derive(Default)]
pub struct RecordHook {
    pub hidden: Vec<Tensor>,
}

impl LayerHook for RecordHook {
    fn after_block(&mut self, _layer: usize, hidden: Tensor) -> Tensor {
        self.hidden.push(hidden.shallow_clone());
        hidden
    }
}

/// Per-layer key/value cache for incremental decoding, plus the padding mask seen so far.
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// `(b, s)` with 1 for real tokens, over every position already in the cache.
    pub mask: Option<Tensor>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            mask: None,
        }
    }
    pub fn seq_len(&self) -> i64 {
        match self.layers.first() {
            Some(Some((k, _))) => k.size()[2],
            _ => 0,
        }
    }
}

/// A decoder-only transformer with a frozen VarStore whose paths equal the HF safetensors keys.
pub trait Backbone: Send {
    fn arch(&self) -> &ArchConfig;
    /// Final hidden states `(b, t, d)` after the last norm. `attention_mask` is `(b, t)` (1 = real
    /// token, 0 = padding) for the new tokens; `cache`, if given, is read and extended.
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        hook: &mut dyn LayerHook,
    ) -> Tensor;
    /// The stack one piece at a time (activation checkpointing): [`Self::embed`], then
    /// [`Self::blocks`] over consecutive ranges, then [`Self::final_norm`] compute what
    /// [`Self::forward`] does without a cache. `batch` is [`attention::BatchMask::new`] of the
    /// input without a cache.
    fn embed(&self, input_ids: &Tensor, batch: &attention::BatchMask) -> Tensor;
    /// Blocks `range` on `x`, the input of block `range.start`, each output through `hook`.
    fn blocks(
        &self,
        x: Tensor,
        batch: &attention::BatchMask,
        range: std::ops::Range<usize>,
        hook: &mut dyn LayerHook,
    ) -> Tensor;
    /// The norm after the last block.
    fn final_norm(&self, x: &Tensor) -> Tensor;
    /// The output embedding `(vocab, d)` (the input embedding when tied).
    fn lm_head(&self) -> &Tensor;
    /// Language-model logits `(b, t, vocab)` for hidden states `(b, t, d)`.
    fn lm_logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<&Tensor>(self.lm_head(), None)
    }
    fn var_store(&self) -> &nn::VarStore;
    fn device(&self) -> Device {
        self.var_store().device()
    }
    fn kind(&self) -> Kind;
    /// The weights held as quantized blocks (`model.quantize`), outside the VarStore.
    fn quantized(&self) -> quant::Quantized;
    fn num_parameters(&self) -> i64 {
        let dense: i64 = (self.var_store().variables().values())
            .map(|t| t.numel() as i64)
            .sum();
        dense + self.quantized().params
    }
    /// Bytes the frozen weights hold: the VarStore's tensors and the quantized blocks.
    fn weight_bytes(&self) -> u64 {
        let dense: usize = (self.var_store().variables().values())
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum();
        dense as u64 + self.quantized().bytes
    }
}

/// Builds the backbone that `arch` describes on `device`, taking every tensor through `loader`;
/// without `lm_head`, an untied output embedding is left unread.
pub fn build(
    arch: &ArchConfig,
    loader: &mut weights::Loader,
    device: Device,
    lm_head: bool,
) -> crate::Result<Box<dyn Backbone>> {
    let vs = nn::VarStore::new(device);
    let l = &mut *loader;
    let model: Box<dyn Backbone> = match arch {
        ArchConfig::Gpt2(c) => Box::new(gpt2::Gpt2::new(vs, c.clone(), l, lm_head)?),
        ArchConfig::Llama(c) => Box::new(llama::Llama::new(vs, c.clone(), l, lm_head)?),
    };
    loader.weights.finish()?;
    Ok(model)
}
