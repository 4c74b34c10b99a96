//! Distributed execution. For now: whether the NCCL backend can be loaded at all.
pub mod nccl;
