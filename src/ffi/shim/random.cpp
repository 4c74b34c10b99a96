// Seeded random fills, one generator per row: libtorch's own generators (mt19937 on the CPU,
// Philox on CUDA) seeded per example, so a training example's dropout and noise depend on
// (run seed, step, its position in the global batch) and not on which rank computes it. tch has
// no Generator API, hence this entry. Compiled with the NCCL TU's flags: the CUDA generator only
// where build.rs found the CUDA headers (UMTUNE_NO_NCCL otherwise).
#include "shim.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#ifndef UMTUNE_NO_NCCL
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

#include <cstring>

extern "C" {

// Fills row i of `t` along `dim` (i < n) from a generator seeded with seeds[i]: standard normal
// (normal != 0) or uniform on [0, 1).
int umt_fill_rows_seeded(at::Tensor* t, int64_t dim, const uint64_t* seeds, int64_t n, int normal,
                         char** err) {
  return umt_guard(err, [&] {
    const bool cuda = t->is_cuda();
    for (int64_t i = 0; i < n; ++i) {
      at::Generator gen;
      if (cuda) {
#ifndef UMTUNE_NO_NCCL
        gen = at::cuda::detail::createCUDAGenerator(t->device().index());
        gen.set_current_seed(seeds[i]);
#else
        throw std::runtime_error("seeded CUDA draws need the CUDA headers at build time");
#endif
      } else {
        gen = at::detail::createCPUGenerator(seeds[i]);
      }
      at::Tensor row = t->select(dim, i);
      if (normal) {
        row.normal_(0.0, 1.0, gen);
      } else {
        row.uniform_(0.0, 1.0, gen);
      }
    }
  });
}

}  // extern "C"
