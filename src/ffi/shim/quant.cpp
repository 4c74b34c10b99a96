// The linear layer of a quantized frozen base (`model.quantize`): the weight stays resident as
// blocks of 32 values along the input dimension with f16 scales (ggml's layouts: int8 as Q8_0;
// 4-bit as Q4_1, value = nibble * scale + min, or Q4_0 without mins, value = (nibble - 8) *
// scale), is dequantized into the input's dtype at use, and autograd keeps only the blocks: the
// backward dequantizes again for the input's gradient (the weight is frozen, so that is the only
// gradient). This needs a custom autograd Function, which tch does not bind, hence this entry
// (bitsandbytes' MatMul4Bit, which QLoRA trains through, is the same idea in Python).
#include "shim.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (n_out, n_in) in `kind`: the blocks' values computed in f32 (exact for int8 and for 4-bit
// nibbles times an f16 scale, with ggml's rounding for the min's addition) and rounded once.
// `min` is read only when `has_min` (Q4_1).
at::Tensor dequant(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& min,
                   bool has_min, int64_t bits, at::ScalarType kind) {
  const int64_t n = scale.size(0), nb = scale.size(1);
  at::Tensor v;
  if (bits == 8) {
    v = q.view({n, nb, 32}).to(at::kFloat);
  } else {
    at::Tensor b = q.view({n, nb, 16});
    // ggml's order: a block's low nibbles are its values 0..15, the high nibbles 16..31.
    v = at::cat({b.bitwise_and(15), b.bitwise_right_shift(4)}, 2).to(at::kFloat);
    if (!has_min) v.sub_(8);
  }
  v.mul_(scale.to(at::kFloat).unsqueeze(2));
  if (bits == 4 && has_min) v.add_(min.to(at::kFloat).unsqueeze(2));
  return v.view({n, nb * 32}).to(kind);
}

// Every argument of apply must be a defined tensor, so an absent min travels as the scale again
// with has_min false.
struct QuantLinear : public torch::autograd::Function<QuantLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& q,
                            const at::Tensor& scale, const at::Tensor& min, bool has_min,
                            int64_t bits) {
    // Only the blocks are saved: the dequantized weight dies with this call.
    ctx->save_for_backward({q, scale, min});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["has_min"] = has_min;
    return at::linear(x, dequant(q, scale, min, has_min, bits, x.scalar_type()));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    auto saved = ctx->get_saved_variables();
    const int64_t bits = ctx->saved_data["bits"].toInt();
    const bool has_min = ctx->saved_data["has_min"].toBool();
    const at::Tensor& g = grad[0];
    at::Tensor w = dequant(saved[0], saved[1], saved[2], has_min, bits, g.scalar_type());
    return {g.matmul(w), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};


}  // namespace

extern "C" {

// y = x W^T for the quantized W (`min` may be null); *out is a new tensor the caller owns.
int umt_quant_linear(const at::Tensor* x, const at::Tensor* q, const at::Tensor* scale,
                     const at::Tensor* min, int64_t bits, at::Tensor** out, char** err) {
  return umt_guard(err, [&] {
    *out = new at::Tensor(QuantLinear::apply(*x, *q, *scale, min ? *min : *scale, min != nullptr, bits));
  });
}

// W itself, as `like`'s dtype (the dense reference a quantized layer must equal).
int umt_dequantize(const at::Tensor* q, const at::Tensor* scale, const at::Tensor* min,
                   int64_t bits, const at::Tensor* like, at::Tensor** out, char** err) {
  return umt_guard(err, [&] {
    at::NoGradGuard no_grad;
    *out = new at::Tensor(
        dequant(*q, *scale, min ? *min : *scale, min != nullptr, bits, like->scalar_type()));
  });
}

}  // extern "C"
