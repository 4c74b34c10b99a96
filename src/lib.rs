//! umtune: parameter-efficient fine-tuning of LLMs with uncertainty modeling and external memory.
pub mod atomic_file;
pub mod bench;
pub mod config;
pub mod data;
pub mod dist;
pub mod doctor;
pub mod error;
pub mod faults;
pub mod ffi;
pub mod finite_json;
pub mod heads;
pub mod host;
pub mod logging;
pub mod memory;
pub mod models;
pub mod peft;
pub mod probe;
pub mod task;
pub mod train;
pub mod uncertainty;

pub use config::Config;
pub use error::{Error, Result};
