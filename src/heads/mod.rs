//! Task heads on top of a backbone's final hidden states.
pub mod classification;
pub mod token_classification;

pub use classification::SequenceClassifier;
pub use token_classification::TokenClassifier;

use tch::Tensor;

/// The head a task model carries.
pub enum Head {
    Sequence(SequenceClassifier),
    Token(TokenClassifier),
}

impl Head {
    /// `(b, num_labels)` for sequences, `(b, t, num_labels)` for tokens; f32.
    pub fn forward(&self, hidden: &Tensor, mask: &Tensor) -> Tensor {
        self.project(&self.pool(hidden, mask))
    }

    /// What the head scores: the last real token's row `(b, ·)` for sequences, every token
    /// `(b, t, ·)` for NER; in f32. Works for any `(b, t, ·)` tensor (hidden states, variances).
    pub fn pool(&self, x: &Tensor, mask: &Tensor) -> Tensor {
        match self {
            Head::Sequence(_) => classification::last_token(x, mask),
            Head::Token(_) => x.to_kind(tch::Kind::Float),
        }
        .to_kind(tch::Kind::Float)
    }

    /// Logits of pooled features `z (…, d)`.
    pub fn project(&self, z: &Tensor) -> Tensor {
        match self {
            Head::Sequence(h) => z.linear::<&Tensor>(&h.score, None),
            Head::Token(h) => z.linear(&h.weight, Some(&h.bias)),
        }
    }

    /// The projection matrix `(num_labels, d)`.
    pub fn weight(&self) -> &Tensor {
        match self {
            Head::Sequence(h) => &h.score,
            Head::Token(h) => &h.weight,
        }
    }
}

/// The head's module name, as transformers' `GPT2/LlamaFor{Sequence,Token}Classification` name
/// it: GPT-2's token head is `classifier`, every other head `score`. Weight files and PEFT
/// exports (`modules_to_save`) use it.
pub fn head_name(task: crate::config::TaskKind, arch: &crate::models::ArchConfig) -> &'static str {
    let gpt2 = matches!(arch, crate::models::ArchConfig::Gpt2(_));
    match task {
        crate::config::TaskKind::Ner if gpt2 => "classifier",
        _ => "score",
    }
}
