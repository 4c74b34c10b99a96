//! Text and tokens: readers, tokenization, batching and sampling, robustness corruptions.
pub mod batching;
pub mod corrupt;
pub mod dataset;
pub mod readers;
pub mod tokenizer;

pub use tokenizer::TextTokenizer;
