// The CUDA caching allocator's peak of allocated bytes on a device (what PyTorch's
// torch.cuda.max_memory_allocated reads), so umtune's memory figures on a GPU compare with a
// PyTorch reference's; tch binds no allocator statistics, hence this entry. Compiled out (an
// error) where build.rs found no CUDA headers (UMTUNE_NO_NCCL).
#include "shim.h"

#ifndef UMTUNE_NO_NCCL
#include <c10/cuda/CUDACachingAllocator.h>
#endif

extern "C" {

int umt_cuda_peak_allocated(int device, int64_t* out, char** err) {
#ifndef UMTUNE_NO_NCCL
  return umt_guard(err, [&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    *out = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  });
#else
  *err = umt_dup_error("this umtune was built without the CUDA headers (make venv installs them)");
  return 1;
#endif
}

}  // extern "C"
