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
        match self {
            Head::Sequence(h) => h.forward(hidden, mask),
            Head::Token(h) => h.forward(hidden),
        }
    }
}
