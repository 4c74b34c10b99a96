//! Task heads on top of a backbone's final hidden states.
pub mod classification;

pub use classification::SequenceClassifier;
