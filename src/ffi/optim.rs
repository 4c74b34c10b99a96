//! The optimizer step's multi-tensor kernels (shim/optim.cpp): ATen's fused AdamW, and the
//! foreach norm and scale of gradient clipping, over lists of tensors, plus the TF32 switch for
//! f32 matmuls on CUDA (shim/precision.cpp). tch binds none of these.
use super::umt_set_allow_tf32;
use super::{take_error, umt_allow_tf32, umt_foreach_mul, umt_foreach_norm, umt_fused_adamw};
use std::ffi::c_char;
use tch::Tensor;

/// AdamW's hyper-parameters for one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

fn ptrs(ts: &[&Tensor]) -> Vec<*const torch_sys::C_tensor> {
    ts.iter().map(|t| t.as_ptr() as *const _).collect()
}

/// Shape, dtype or device mismatches are bugs of the caller (as with tch's own operators, which
/// panic on them), so a failed call panics with the shim's message.
fn check(what: &str, rc: i32, err: *mut c_char) {
    if rc != 0 {
        panic!("{what}: {}", take_error(err));
    }
}

/// One AdamW step over `params` (all of one dtype and device, their gradients, `exp_avgs` and
/// `exp_avg_sqs` the same), in place; `steps` are their step counts, already counting this step.
pub fn fused_adamw(
    params: &[&Tensor],
    grads: &[&Tensor],
    exp_avgs: &[&Tensor],
    exp_avg_sqs: &[&Tensor],
    steps: &[&Tensor],
    h: AdamWStep,
) {
    let n = params.len();
    assert!(
        [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()]
            .iter()
            .all(|&l| l == n),
        "fused AdamW: lists of unequal length"
    );
    if n == 0 {
        return;
    }
    let (p, g, m, v, s) = (
        ptrs(params),
        ptrs(grads),
        ptrs(exp_avgs),
        ptrs(exp_avg_sqs),
        ptrs(steps),
    );
    let mut err = std::ptr::null_mut();
    // SAFETY: five arrays of n live tensors for the duration of the call.
    let rc = unsafe {
        umt_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n as i64,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            &mut err,
        )
    };
    check("fused AdamW", rc, err);
}

/// The L2 norm of each tensor, as one `(n,)` f32 tensor on their device.
pub fn foreach_norm(ts: &[&Tensor]) -> Tensor {
    let p = ptrs(ts);
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    let mut err = std::ptr::null_mut();
    // SAFETY: an array of live tensors; on success `out` is a new tensor we own.
    let rc = unsafe { umt_foreach_norm(p.as_ptr(), p.len() as i64, &mut out, &mut err) };
    check("foreach norm", rc, err);
    // SAFETY: see above.
    unsafe { Tensor::from_ptr(out) }
}

/// Multiplies every tensor by `factor`, in place.
pub fn foreach_mul(ts: &[&Tensor], factor: f64) {
    let p = ptrs(ts);
    let mut err = std::ptr::null_mut();
    // SAFETY: an array of live tensors for the call.
    let rc = unsafe { umt_foreach_mul(p.as_ptr(), p.len() as i64, factor, &mut err) };
    check("foreach mul", rc, err);
}

/// Lets cuBLAS run f32 matmuls in TF32 (`torch.backends.cuda.matmul.allow_tf32`).
pub fn set_allow_tf32(allow: bool) {
    // SAFETY: sets a flag of libtorch's global context.
    unsafe { umt_set_allow_tf32(i32::from(allow)) }
}

/// Whether f32 matmuls on CUDA may run in TF32.
pub fn allow_tf32() -> bool {
    // SAFETY: reads a flag of libtorch's global context.
    unsafe { umt_allow_tf32() != 0 }
}
