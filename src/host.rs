//! The one place where tensor values are read into host memory. On a GPU every such read waits
//! for the device to finish the work queued before it (a host-device sync, which stalls the
//! pipeline of launched kernels), so the training loop reads once per step and the reads are
//! counted here: tests assert the count per optimizer step (issue 22: at most 2 on steps that do
//! not log). Every read counts, whatever the tensor's device, so a CPU run counts what the same
//! code would cost on a GPU; `tests/layers.rs` checks that no other file reads tensor values.
use std::cell::Cell;
use tch::{Kind, Tensor};

thread_local! {
    // Per thread: the training loop reads on its own thread, and tests running side by side in
    // one process do not see each other's reads.
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// How many reads this thread has made so far.
pub fn reads() -> u64 {
    READS.with(Cell::get)
}

fn count() {
    READS.with(|r| r.set(r.get() + 1));
}

/// The value of a one-element tensor, as f64.
pub fn f64_of(t: &Tensor) -> f64 {
    count();
    t.double_value(&[])
}

/// The value of a one-element integer or boolean tensor, as i64.
pub fn i64_of(t: &Tensor) -> i64 {
    count();
    t.int64_value(&[])
}

/// Whether a one-element tensor is non-zero (true).
pub fn bool_of(t: &Tensor) -> bool {
    i64_of(&t.to_kind(Kind::Int64)) != 0
}

/// Whether a one-element tensor that lives on the CPU is non-zero: not a sync, so not counted.
/// For code paths taken only on the CPU (a path a GPU takes instead must not read); panics on
/// another device.
pub fn cpu_bool_of(t: &Tensor) -> bool {
    assert!(
        t.device() == tch::Device::Cpu,
        "cpu_bool_of on a {:?} tensor",
        t.device()
    );
    t.to_kind(Kind::Int64).int64_value(&[]) != 0
}

/// Every value of `t`, flattened, as f64.
pub fn f64s(t: &Tensor) -> crate::Result<Vec<f64>> {
    count();
    Ok(Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1]))?)
}

/// Every value of `t`, flattened, as f32.
pub fn f32s(t: &Tensor) -> crate::Result<Vec<f32>> {
    count();
    Ok(Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1]))?)
}

/// Every value of `t`, flattened, as i64.
pub fn i64s(t: &Tensor) -> crate::Result<Vec<i64>> {
    count();
    Ok(Vec::<i64>::try_from(t.to_kind(Kind::Int64).reshape([-1]))?)
}

/// Every byte of a u8 tensor, flattened.
pub fn u8s(t: &Tensor) -> crate::Result<Vec<u8>> {
    count();
    Ok(Vec::<u8>::try_from(t.reshape([-1]))?)
}
