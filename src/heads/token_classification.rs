//! Token classification (NER): a linear layer with bias on every position's hidden state, named as
//! transformers names it (`classifier` in `GPT2ForTokenClassification`, `score` in
//! `LlamaForTokenClassification`).
use tch::{nn, Kind, Tensor};

pub struct TokenClassifier {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl TokenClassifier {
    /// `name` is `classifier` (GPT-2) or `score` (LLaMA); weights N(0, 0.02), bias 0.
    pub fn new(p: &nn::Path, name: &str, hidden_size: i64, num_labels: i64) -> Self {
        let p = p / name;
        TokenClassifier {
            weight: p.var(
                "weight",
                &[num_labels, hidden_size],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            bias: p.var("bias", &[num_labels], nn::Init::Const(0.0)),
        }
    }

    /// Logits `(b, t, num_labels)` in f32 from `hidden (b, t, d)`.
    pub fn forward(&self, hidden: &Tensor) -> Tensor {
        hidden
            .to_kind(Kind::Float)
            .linear(&self.weight, Some(&self.bias))
    }
}
