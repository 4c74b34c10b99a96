//! Training: the loop, the optimizer, the learning-rate schedule and the metrics.
pub mod autocast;
pub mod memory_build;
pub mod metrics;
pub mod optimizer;
pub mod progress;
pub mod run_dir;
pub mod schedule;
pub mod seqeval;
pub mod trainer;
