//! Prefix tuning (Li & Liang 2021, <https://arxiv.org/abs/2101.00190>) as Hugging Face PEFT
//! implements it without the reparametrization MLP: `prompt_embeddings (P, layers * 2 * kv_dim)`,
//! initialized N(0, 1) as PEFT's `nn.Embedding`, read as every layer's key and value for P virtual
//! tokens that all real tokens attend to. The backbone sees them as a pre-filled KV cache, so real
//! tokens take positions P, P+1, ... exactly as in PEFT.
use crate::models::KvCache;
use tch::{nn, Kind, Tensor};

pub struct PrefixKv {
    pub embeddings: Tensor,
    num_layers: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl PrefixKv {
    pub fn new(
        root: &nn::Path,
        num_virtual_tokens: i64,
        num_layers: i64,
        num_kv_heads: i64,
        head_dim: i64,
    ) -> Self {
        let width = num_layers * 2 * num_kv_heads * head_dim;
        PrefixKv {
            embeddings: root.var(
                "prompt_embeddings",
                &[num_virtual_tokens, width],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            ),
            num_layers,
            num_kv_heads,
            head_dim,
        }
    }

    /// A cache holding every layer's prefix keys and values `(b, h_kv, P, hd)` in `kind`.
    pub fn cache(&self, b_sz: i64, kind: Kind) -> KvCache {
        let p = self.embeddings.size()[0];
        // (P, 2L, h_kv, hd) -> (2L, h_kv, P, hd), PEFT's permute without the batch axis.
        let kv = self
            .embeddings
            .to_kind(kind)
            .view([p, 2 * self.num_layers, self.num_kv_heads, self.head_dim])
            .permute([1, 2, 0, 3]);
        let per_batch = |i: i64| {
            kv.get(i)
                .unsqueeze(0)
                .expand([b_sz, self.num_kv_heads, p, self.head_dim], false)
        };
        let mut cache = KvCache::new(self.num_layers as usize);
        for (layer, slot) in cache.layers.iter_mut().enumerate() {
            let l = layer as i64;
            *slot = Some((per_batch(2 * l), per_batch(2 * l + 1)));
        }
        cache
    }
}
