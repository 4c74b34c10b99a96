//! External memory (METHOD.md section 2): the sharded key-value store and its reads.
pub mod files;
pub mod fusion;
mod read;
pub mod store;

pub use fusion::MemoryFusion;

pub use read::Retrieved;
pub use store::ShardedKvMemory;
