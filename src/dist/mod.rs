//! Distributed execution: the run context (rank, device, writer), the collective operations the
//! memory and the trainer use, and whether the NCCL backend can be loaded.
pub mod collective;
pub mod context;
pub mod nccl;

pub use collective::{Collective, InProcessGroup, SingleProcess};
pub use context::{RunContext, StopFlag};
