// The optimizer step's multi-tensor kernels: ATen's fused AdamW (`torch.optim.AdamW(fused=True)`:
// one kernel over every parameter on CUDA, one vectorized loop per tensor on the CPU), and the
// foreach norm and scale that clipping needs (one launch for the whole list instead of one per
// tensor). tch binds none of the `_fused_*` / `_foreach_*` operators, hence these entries. Lists
// cross the C boundary as arrays of tensor pointers.
#include "shim.h"

#include <ATen/ATen.h>

#include <vector>

namespace {

std::vector<at::Tensor> list(const at::Tensor* const* ts, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

}  // namespace

extern "C" {

// One AdamW step (decoupled weight decay, no amsgrad) on n parameters, updating params, exp_avgs
// and exp_avg_sqs in place. `steps` holds each parameter's step count, already incremented for
// this step (the kernel reads it for the bias corrections).
int umt_fused_adamw(const at::Tensor* const* params, const at::Tensor* const* grads,
                    const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs,
                    const at::Tensor* const* steps, int64_t n, double lr, double beta1,
                    double beta2, double weight_decay, double eps, char** err) {
  return umt_guard(err, [&] {
    at::NoGradGuard no_grad;
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n),
                      {}, list(steps, n), lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
  });
}

// The L2 norm of each of the n tensors, as one (n,) f32 tensor on their device (*out, owned by
// the caller).
int umt_foreach_norm(const at::Tensor* const* ts, int64_t n, at::Tensor** out, char** err) {
  return umt_guard(err, [&] {
    at::NoGradGuard no_grad;
    *out = new at::Tensor(at::stack(at::_foreach_norm(list(ts, n), 2), 0).to(at::kFloat));
  });
}

// Multiplies each of the n tensors by `factor` in place.
int umt_foreach_mul(const at::Tensor* const* ts, int64_t n, double factor, char** err) {
  return umt_guard(err, [&] {
    at::NoGradGuard no_grad;
    auto l = list(ts, n);
    at::_foreach_mul_(l, factor);
  });
}

}  // extern "C"
