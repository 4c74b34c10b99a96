//! The task model (backbone + PEFT + head + uncertainty modeling + memory) and its loss.
pub mod checkpointing;
pub mod loss;
pub mod model;
pub mod predictive;

pub use loss::Forward;
pub use model::TaskModel;
