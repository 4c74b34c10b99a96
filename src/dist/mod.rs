//! Distributed execution: the launcher's environment (`env`), the run context (rank, device,
//! writer), the collective operations the memory and the trainer use and their backends (`ring`
//! for CPU tensors, `c10d` for libtorch's store and NCCL), and whether NCCL can be loaded.
pub mod c10d;
pub mod collective;
pub mod context;
pub mod env;
pub mod nccl;
pub mod ring;

pub use collective::{Collective, InProcessGroup, ReduceOp, SingleProcess, Traffic};
pub use context::{RunContext, StopFlag};
