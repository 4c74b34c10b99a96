//! Greedy decoding with a KV cache: the quickest proof that a pretrained model loaded right.
use super::{Backbone, KvCache, NoHook};
use tch::{Kind, Tensor};

/// Greedily extends `prompt` by up to `max_new_tokens` ids, stopping after any id in `stop`.
pub fn greedy(
    model: &dyn Backbone,
    prompt: &[i64],
    max_new_tokens: usize,
    stop: &[i64],
) -> Vec<i64> {
    let _guard = tch::no_grad_guard();
    let mut cache = KvCache::new(model.arch().num_layers());
    let mut input = Tensor::from_slice(prompt)
        .to_device(model.device())
        .unsqueeze(0); // (1, t)
    let mut out = Vec::with_capacity(max_new_tokens);
    for _ in 0..max_new_tokens {
        let hidden = model.forward(&input, None, Some(&mut cache), &mut NoHook);
        let last = hidden.narrow(1, hidden.size()[1] - 1, 1); // (1, 1, d)
        let next = model
            .lm_logits(&last)
            .to_kind(Kind::Float)
            .argmax(-1, false)
            .int64_value(&[0, 0]);
        out.push(next);
        if stop.contains(&next) {
            break;
        }
        input = Tensor::from_slice(&[next])
            .to_device(model.device())
            .unsqueeze(0);
    }
    out
}
