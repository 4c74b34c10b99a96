//! The task model (backbone + PEFT + head + uncertainty modeling + memory) and its loss.
pub mod loss;
pub mod model;
pub mod noise;

pub use model::{Forward, TaskModel};
