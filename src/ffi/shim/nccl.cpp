// A C ABI over libtorch's c10d::ProcessGroupNCCL (collectives on CUDA tensors, ordered on
// libtorch's current stream, with c10d's timeout watchdog and communicator abort), built over the
// store of store.cpp. Compiled with -DUSE_C10D_NCCL -DUSE_CUDA when build.rs finds the CUDA and
// NCCL headers (pip packages, see the Makefile); otherwise UMTUNE_NO_NCCL makes every entry
// report that this build has no NCCL. Tensors arrive as at::Tensor* (tch's C_tensor) and are
// reduced in place.
#include "shim.h"

#include <cstring>

#ifndef UMTUNE_NO_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
struct umt_pg {
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> pg;
};
// The body of an entry: run under umt_guard, or (no NCCL in this build) an error saying so.
#define NCCL_ENTRY(...) return umt_guard(err, [&] { __VA_ARGS__; })
#else
struct umt_pg {};
static const char* kNoNccl =
    "this umtune was built without the CUDA/NCCL headers (make venv installs them), so the "
    "nccl backend is absent";
#define NCCL_ENTRY(...)             \
  *err = umt_dup_error(kNoNccl); \
  return 1
#endif

extern "C" {

int umt_nccl_compiled() {
#ifndef UMTUNE_NO_NCCL
  return 1;
#else
  return 0;
#endif
}

umt_pg* umt_pg_nccl_new(umt_store* s, const char* prefix, int rank, int world, int device,
                        int timeout_ms, char** err) {
  umt_pg* out = nullptr;
  int rc = [&]() -> int {
    NCCL_ENTRY({
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
      auto store = c10::make_intrusive<c10d::PrefixStore>(prefix, s->store);
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = std::chrono::milliseconds(timeout_ms);
      out = new umt_pg{c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts)};
    });
  }();
  return rc == 0 ? out : nullptr;
}

// op: 0 sum, 1 average.
int umt_pg_allreduce(umt_pg* p, at::Tensor* t, int op, char** err) {
  NCCL_ENTRY({
    std::vector<at::Tensor> v{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp::AVG : c10d::ReduceOp::SUM;
    p->pg->allreduce(v, o)->wait();
  });
}

int umt_pg_broadcast(umt_pg* p, at::Tensor* t, int root, char** err) {
  NCCL_ENTRY({
    std::vector<at::Tensor> v{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    p->pg->broadcast(v, o)->wait();
  });
}

// out: (world * n, ...) contiguous; in: (n, ...), the same on every rank.
int umt_pg_allgather(umt_pg* p, at::Tensor* out, at::Tensor* in, char** err) {
  NCCL_ENTRY({ p->pg->_allgather_base(*out, *in)->wait(); });
}

// out: (sum of out_splits, ...), in: (sum of in_splits, ...), both contiguous; the splits are
// rows per rank (n of each, n = world). n == 0: equal splits.
int umt_pg_alltoall(umt_pg* p, at::Tensor* out, at::Tensor* in, const int64_t* out_splits,
                    const int64_t* in_splits, int n, char** err) {
  NCCL_ENTRY({
    std::vector<int64_t> o(out_splits, out_splits + n), i(in_splits, in_splits + n);
    p->pg->alltoall_base(*out, *in, o, i)->wait();
  });
}

void umt_pg_free(umt_pg* p) {
#ifndef UMTUNE_NO_NCCL
  try {
    p->pg->shutdown();
  } catch (...) {
  }
#endif
  delete p;
}

}  // extern "C"
