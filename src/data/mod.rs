//! Text and tokens: tokenizer loading (readers, samplers and corruptions arrive with the pipeline).
pub mod batching;
pub mod readers;
pub mod tokenizer;

pub use tokenizer::TextTokenizer;
