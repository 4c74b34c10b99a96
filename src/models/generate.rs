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
        let next = crate::host::i64_of(
            &model
                .lm_logits(&last)
                .to_kind(Kind::Float)
                .argmax(-1, false),
        );
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

/// `umtune generate`'s arguments.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub cfg: crate::config::ConfigArgs,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Print the token ids as JSON instead of text.
    #[arg(long)]
    pub ids: bool,
}

/// What [`complete`] did: the prompt's ids, the ids it added, and the prompt continued in text.
pub struct Completion {
    pub prompt_ids: Vec<i64>,
    pub generated_ids: Vec<i64>,
    pub text: String,
}

impl Completion {
    /// The text, or with `ids` the ids as one JSON object.
    pub fn output(&self, ids: bool) -> String {
        if ids {
            serde_json::json!({"prompt_ids": self.prompt_ids, "generated_ids": self.generated_ids})
                .to_string()
        } else {
            self.text.clone()
        }
    }
}

/// Loads the model `reference` names and greedily continues `args.prompt` by up to
/// `args.max_new_tokens` tokens (stopping at its end-of-sequence token); logs the load time and
/// tokens/s.
pub fn complete(
    reference: &str,
    kind: Kind,
    device: tch::Device,
    args: &GenerateArgs,
) -> crate::error::Result<Completion> {
    let (prompt, max_new_tokens) = (args.prompt.as_str(), args.max_new_tokens);
    let start = std::time::Instant::now();
    let loaded = super::resolve::load(reference, kind, device)?;
    tracing::info!(model = %reference, ?device, secs = start.elapsed().as_secs_f64(), "loaded");
    let tok = loaded
        .tokenizer
        .ok_or_else(|| crate::error::Error::ModelNotFound {
            reference: reference.to_string(),
            msg: "this model came without a tokenizer".into(),
        })?;
    let prompt_ids: Vec<i64> = tok.encode(prompt)?.into_iter().map(i64::from).collect();
    let stop: Vec<i64> = tok.eos_id.into_iter().map(i64::from).collect();
    let start = std::time::Instant::now();
    let generated_ids = greedy(loaded.backbone.as_ref(), &prompt_ids, max_new_tokens, &stop);
    let tokens_per_s = generated_ids.len() as f64 / start.elapsed().as_secs_f64();
    tracing::info!(tokens = generated_ids.len(), tokens_per_s, "generated");
    let new: Vec<u32> = generated_ids.iter().map(|&i| i as u32).collect();
    let text = format!("{prompt}{}", tok.decode(&new)?);
    Ok(Completion {
        prompt_ids,
        generated_ids,
        text,
    })
}
