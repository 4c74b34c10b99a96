//! The quantized frozen base's linear layer (shim/quant.cpp): `y = x W^T` with W held as blocks
//! of 32 and dequantized at use, in the forward and again in the backward, so autograd never keeps
//! a dense copy. The layouts are ggml's (see `models::quant`): `bits` 8 (int8 values), or 4
//! (packed nibbles; with `min` value = nibble * scale + min, without it (nibble - 8) * scale).
use super::{take_error, umt_dequantize, umt_quant_linear};
use std::ffi::c_char;
use tch::Tensor;

/// The blocks of one quantized weight `(n_out, n_in)`.
pub struct Blocks<'a> {
    pub q: &'a Tensor,
    /// `(n_out, n_in / 32)` f16.
    pub scale: &'a Tensor,
    pub min: Option<&'a Tensor>,
    pub bits: i64,
}

/// Calls a shim entry that writes a new tensor to its `out` argument. Failures are shape or dtype
/// bugs of the caller (as with tch's own operators, which panic on them), so they panic too.
fn call(
    what: &str,
    f: impl FnOnce(*mut *mut torch_sys::C_tensor, *mut *mut c_char) -> i32,
) -> Tensor {
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    let mut err: *mut c_char = std::ptr::null_mut();
    if f(&mut out, &mut err) != 0 {
        panic!("{what}: {}", take_error(err));
    }
    // SAFETY: on success the shim handed back a heap-allocated at::Tensor that we now own.
    unsafe { Tensor::from_ptr(out) }
}

fn min_ptr(b: &Blocks) -> *const torch_sys::C_tensor {
    b.min.map_or(std::ptr::null(), |m| m.as_ptr())
}

/// `x (..., n_in) W^T`: `(..., n_out)` in `x`'s dtype, differentiable in `x`.
pub fn linear(x: &Tensor, w: &Blocks) -> Tensor {
    call("quantized linear", |out, err| {
        // SAFETY: every pointer is a live tensor (or null for an absent min) for the call.
        unsafe {
            umt_quant_linear(
                x.as_ptr(),
                w.q.as_ptr(),
                w.scale.as_ptr(),
                min_ptr(w),
                w.bits,
                out,
                err,
            )
        }
    })
}

/// W as a dense `(n_out, n_in)` tensor of `like`'s dtype (what [`linear`] multiplies by).
pub fn dequantize(w: &Blocks, like: &Tensor) -> Tensor {
    call("dequantize", |out, err| {
        // SAFETY: as in `linear`.
        unsafe {
            umt_dequantize(
                w.q.as_ptr(),
                w.scale.as_ptr(),
                min_ptr(w),
                w.bits,
                like.as_ptr(),
                out,
                err,
            )
        }
    })
}
