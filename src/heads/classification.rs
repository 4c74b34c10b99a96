//! Sequence classification on the last non-padding token, with Hugging Face's weight layout
//! (`score.weight (num_labels, d)`, no bias) as in `GPT2ForSequenceClassification` and
//! `LlamaForSequenceClassification`.
use tch::{nn, Kind, Tensor};

pub struct SequenceClassifier {
    pub score: Tensor,
}

impl SequenceClassifier {
    /// `score` under `p` (the trainable VarStore's root), N(0, 0.02) as transformers initializes it.
    pub fn new(p: &nn::Path, hidden_size: i64, num_labels: i64) -> Self {
        let score = (p / "score").var(
            "weight",
            &[num_labels, hidden_size],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        SequenceClassifier { score }
    }

    /// Logits `(b, num_labels)` in f32 from `hidden (b, t, d)` and a right-padded `mask (b, t)`.
    pub fn forward(&self, hidden: &Tensor, mask: &Tensor) -> Tensor {
        last_token(hidden, mask)
            .to_kind(Kind::Float)
            .linear::<&Tensor>(&self.score, None)
    }
}

/// The row of the last real token of each sequence: `x (b, t, d)`, right-padded `mask (b, t)`
/// → `(b, d)`.
pub fn last_token(x: &Tensor, mask: &Tensor) -> Tensor {
    let (b_sz, _, d) = {
        let s = x.size(); // (b, t, d)
        (s[0], s[1], s[2])
    };
    let last = (mask.sum_dim_intlist(1, false, Kind::Int64) - 1).clamp_min(0); // (b,)
    let index = last.view([b_sz, 1, 1]).expand([b_sz, 1, d], false);
    x.gather(1, &index, false).squeeze_dim(1) // (b, d)
}
