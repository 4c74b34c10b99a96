// The f32 matmul precision switch PyTorch users set as `torch.backends.cuda.matmul.allow_tf32`:
// with it, cuBLAS runs f32 matrix products on the tensor cores in TF32 (10-bit mantissa inputs,
// f32 accumulation). tch binds no global Context setter, hence these entries. No effect on CPU.
#include "shim.h"

#include <ATen/Context.h>

extern "C" {

void umt_set_allow_tf32(int allow) { at::globalContext().setAllowTF32CuBLAS(allow != 0); }

int umt_allow_tf32() { return at::globalContext().allowTF32CuBLAS() ? 1 : 0; }

}  // extern "C"
