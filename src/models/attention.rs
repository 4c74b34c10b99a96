//! Pieces both backbones share: position ids and attention masks for padded batches and KV
//! caches, and scaled-dot-product attention through libtorch's fused kernel.
use super::KvCache;
use tch::{Kind, Tensor};

/// What every attention layer of one forward pass needs to know about the batch.
pub struct BatchMask {
    /// `(b, 1, t, s)` boolean (true = attend), or None when plain causal attention is exact.
    pub mask: Option<Tensor>,
    /// Whether to let the kernel apply the causal mask itself (no padding, no cache).
    pub is_causal: bool,
    /// `(b, t)` positions of the new tokens: real tokens count from 0 whatever the padding.
    pub positions: Tensor,
}

impl BatchMask {
    /// For `input_ids (b, t)`; `attention_mask` is `(b, t)` for the new tokens; a cache
    /// contributes its past mask and is extended with this one.
    pub fn new(
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> BatchMask {
        let (b_sz, seq_len) = {
            let s = input_ids.size(); // (b, t)
            (s[0], s[1])
        };
        let device = input_ids.device();
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let past_mask = cache
            .as_ref()
            .and_then(|c| c.mask.as_ref().map(|m| m.shallow_clone()));
        // A fresh sequence without padding, or padded on the right only (every real token before
        // every pad), is plain causal attention for its real tokens, which the fused (flash)
        // kernels run without a materialized (b, 1, t, s) mask. A padding query then attends to
        // the real tokens and the pads before it; its output is never used (the classifier pools
        // the last real token, token labels and UM's regularizer skip padding).
        let attention_mask =
            attention_mask.filter(|m| past > 0 || past_mask.is_some() || !is_right_padded(m));
        let padded = attention_mask.is_some() || past_mask.is_some();
        let full = padded.then(|| {
            let new = match attention_mask {
                Some(m) => m.to_kind(Kind::Int64).to_device(device),
                None => Tensor::ones([b_sz, seq_len], (Kind::Int64, device)),
            };
            let old =
                past_mask.unwrap_or_else(|| Tensor::ones([b_sz, past], (Kind::Int64, device)));
            Tensor::cat(&[old, new], 1) // (b, s)
        });
        if let (Some(c), Some(f)) = (cache, full.as_ref()) {
            c.mask = Some(f.shallow_clone());
        }
        let total = past + seq_len;
        let positions = match &full {
            Some(f) => (f.cumsum(1, Kind::Int64) - 1)
                .clamp_min(0)
                .narrow(1, past, seq_len),
            None => Tensor::arange_start(past, total, (Kind::Int64, device))
                .unsqueeze(0)
                .expand([b_sz, seq_len], false),
        };
        if !padded && (past == 0 || seq_len == 1) {
            // No padding: a fresh sequence is plain causal; one new token sees the whole cache.
            return BatchMask {
                mask: None,
                is_causal: past == 0 && seq_len > 1,
                positions,
            };
        }
        let q_pos = Tensor::arange_start(past, total, (Kind::Int64, device)).view([seq_len, 1]);
        let k_pos = Tensor::arange(total, (Kind::Int64, device)).view([1, total]);
        let causal = k_pos.le_tensor(&q_pos); // (t, s)
        let mut mask = causal.view([1, 1, seq_len, total]);
        if let Some(f) = &full {
            let keys = f.ne(0).view([b_sz, 1, 1, total]);
            // A padding query with no real key before it attends to itself, so that no row is
            // fully masked (which would give NaN); its output is never used.
            let own = k_pos.eq_tensor(&q_pos).view([1, 1, seq_len, total]);
            mask = mask.logical_and(&keys).logical_or(&own);
        }
        BatchMask {
            mask: Some(mask),
            is_causal: false,
            positions,
        }
    }
}

/// Whether every row of `mask (b, t)` is ones then zeros (right padding, or none).
fn is_right_padded(mask: &Tensor) -> bool {
    let t = mask.size()[1];
    if t < 2 {
        return true;
    }
    let m = mask.ne(0);
    // No real token right after a pad.
    let later = m.narrow(1, 1, t - 1);
    let earlier = m.narrow(1, 0, t - 1);
    !crate::host::bool_of(&later.logical_and(&earlier.logical_not()).any())
}

/// `q (b, h, t, d)`, `k`/`v` `(b, h_kv, s, d)` → `(b, h, t, d)`; grouped-query when `h_kv < h`.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, batch: &BatchMask, scale: f64) -> Tensor {
    let gqa = k.size()[1] != q.size()[1];
    Tensor::scaled_dot_product_attention(
        q,
        k,
        v,
        batch.mask.as_ref(),
        0.0,
        batch.is_causal,
        scale,
        gqa,
    )
}

/// Appends `k`, `v` `(b, h_kv, t, d)` to layer `layer` of the cache and returns the full tensors.
pub fn append_cache(
    cache: Option<&mut KvCache>,
    layer: usize,
    k: Tensor,
    v: Tensor,
) -> (Tensor, Tensor) {
    let Some(cache) = cache else { return (k, v) };
    let (k, v) = match cache.layers[layer].take() {
        Some((pk, pv)) => (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2)),
        None => (k, v),
    };
    cache.layers[layer] = Some((k.shallow_clone(), v.shallow_clone()));
    (k, v)
}
