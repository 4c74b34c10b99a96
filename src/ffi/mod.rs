//! Every foreign call umtune makes, in one place: the C shim in `shim/` that build.rs compiles
//! against the torch wheel's headers (c10d's TCPStore and ProcessGroupNCCL, per-example seeded
//! random fills, since tch has no Generator API; the quantized base's linear layer, since tch binds
//! no custom autograd Function; the CUDA allocator's peak; the fused AdamW and foreach kernels and
//! the TF32 switch, which tch does not bind), libtorch's autocast state
//! (`autocast`, bound by its C++ symbols), and the per-example random streams built on the shim
//! (`streams`). The layers above call the safe wrappers: `dist::c10d`, `ffi::streams`,
//! `ffi::quant`, `ffi::optim`, `ffi::autocast`, [`cuda_peak_allocated`].
use std::ffi::{c_char, c_int, c_void, CStr};

pub mod autocast;
pub mod optim;
pub mod quant;
pub mod streams;

#[repr(C)]
pub(crate) struct RawStore {
    _p: [u8; 0],
}
#[repr(C)]
pub(crate) struct RawGroup {
    _p: [u8; 0],
}

extern "C" {
    // The c10d shim (shim/store.cpp, shim/nccl.cpp).
    pub(crate) fn umt_free(p: *mut c_void);
    pub(crate) fn umt_store_new(
        host: *const c_char,
        port: c_int,
        is_server: c_int,
        world: c_int,
        timeout_ms: c_int,
        prefix: *const c_char,
        listen_fd: c_int,
        err: *mut *mut c_char,
    ) -> *mut RawStore;
    pub(crate) fn umt_store_port(s: *mut RawStore) -> c_int;
    pub(crate) fn umt_store_set(
        s: *mut RawStore,
        key: *const c_char,
        value: *const u8,
        len: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn umt_store_get(
        s: *mut RawStore,
        key: *const c_char,
        timeout_ms: c_int,
        out: *mut *mut u8,
        len: *mut usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn umt_store_add(
        s: *mut RawStore,
        key: *const c_char,
        delta: i64,
        out: *mut i64,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn umt_store_check(
        s: *mut RawStore,
        key: *const c_char,
        out: *mut c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn umt_store_free(s: *mut RawStore);
    pub(crate) fn umt_nccl_compiled() -> c_int;
    pub(crate) fn umt_pg_nccl_new(
        s: *mut RawStore,
        prefix: *const c_char,
        rank: c_int,
        world: c_int,
        device: c_int,
        timeout_ms: c_int,
        err: *mut *mut c_char,
    ) -> *mut RawGroup;
    pub(crate) fn umt_pg_allreduce(
        p: *mut RawGroup,
        t: *mut torch_sys::C_tensor,
        op: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn umt_pg_broadcast(
        p: *mut RawGroup,
        t: *mut torch_sys::C_tensor,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn umt_pg_allgather(
        p: *mut RawGroup,
        out: *mut torch_sys::C_tensor,
        input: *mut torch_sys::C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn umt_pg_alltoall(
        p: *mut RawGroup,
        out: *mut torch_sys::C_tensor,
        input: *mut torch_sys::C_tensor,
        out_splits: *const i64,
        in_splits: *const i64,
        n: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn umt_pg_free(p: *mut RawGroup);
    // Per-example random draws (shim/random.cpp).
    pub(crate) fn umt_fill_rows_seeded(
        t: *mut torch_sys::C_tensor,
        dim: i64,
        seeds: *const u64,
        n: i64,
        normal: i32,
        err: *mut *mut c_char,
    ) -> i32;
    // The quantized frozen base's linear layer (shim/quant.cpp).
    pub(crate) fn umt_quant_linear(
        x: *const torch_sys::C_tensor,
        q: *const torch_sys::C_tensor,
        scale: *const torch_sys::C_tensor,
        min: *const torch_sys::C_tensor,
        bits: i64,
        out: *mut *mut torch_sys::C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    // The optimizer's multi-tensor kernels (shim/optim.cpp) and the TF32 switch (shim/precision.cpp).
    pub(crate) fn umt_fused_adamw(
        params: *const *const torch_sys::C_tensor,
        grads: *const *const torch_sys::C_tensor,
        exp_avgs: *const *const torch_sys::C_tensor,
        exp_avg_sqs: *const *const torch_sys::C_tensor,
        steps: *const *const torch_sys::C_tensor,
        n: i64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn umt_foreach_norm(
        ts: *const *const torch_sys::C_tensor,
        n: i64,
        out: *mut *mut torch_sys::C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn umt_foreach_mul(
        ts: *const *const torch_sys::C_tensor,
        n: i64,
        factor: f64,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn umt_set_allow_tf32(allow: c_int);
    pub(crate) fn umt_allow_tf32() -> c_int;
    // The CUDA allocator's statistics (shim/cuda_memory.cpp).
    pub(crate) fn umt_cuda_peak_allocated(
        device: c_int,
        out: *mut i64,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn umt_dequantize(
        q: *const torch_sys::C_tensor,
        scale: *const torch_sys::C_tensor,
        min: *const torch_sys::C_tensor,
        bits: i64,
        like: *const torch_sys::C_tensor,
        out: *mut *mut torch_sys::C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
}

/// The CUDA caching allocator's peak of allocated bytes on `device` since the process started
/// (PyTorch's `torch.cuda.max_memory_allocated`).
pub fn cuda_peak_allocated(device: usize) -> Result<u64, String> {
    let (mut out, mut err) = (0i64, std::ptr::null_mut());
    // SAFETY: plain out-pointers for the call; the shim allocates `err` only on failure.
    match unsafe { umt_cuda_peak_allocated(device as c_int, &mut out, &mut err) } {
        0 => Ok(out as u64),
        _ => Err(take_error(err)),
    }
}

/// The message of a failed shim call (its first line), freed.
pub(crate) fn take_error(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error in the shim".into();
    }
    // SAFETY: the shim hands back a strdup'ed, NUL-terminated string and we own it.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { umt_free(err.cast()) };
    msg.lines().next().unwrap_or_default().to_string()
}
