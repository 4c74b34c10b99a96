//! Training: the loop, the optimizer, the learning-rate schedule, evaluation (the one inference
//! path), the run directory (the only writer of run files), restoring, exporting and predicting
//! from a run, reports and metrics.
pub mod checkpoint;
pub mod curves;
pub mod diagnostics;
pub mod eval;
pub mod evaluate;
pub mod export;
pub mod export_merged;
pub mod memory_build;
pub mod metrics;
pub mod optimizer;
pub mod paired;
pub mod plan;
pub mod predict;
pub mod progress;
pub mod report;
pub mod restore;
pub mod resume;
pub mod robustness;
pub mod run_dir;
pub mod run_files;
pub mod schedule;
pub mod seqeval;
pub mod setup;
pub mod sweep;
pub mod tensorboard;
pub mod trainer;
