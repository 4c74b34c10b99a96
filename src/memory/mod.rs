//! External memory (METHOD.md section 2): the sharded key-value store and its reads.
pub mod store;

pub use store::{Retrieved, ShardedKvMemory};
