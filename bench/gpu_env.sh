# Sourced by the bench/gpu_*.sh scripts on a GPU machine without a Rust toolchain: the torch
# wheel's libraries (and NCCL's, with the libnccl.so name the shim links) on LD_LIBRARY_PATH, and
# the fixtures where the carried test binaries were built (BUILT_AT, default /work/main).
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
nccl_lib=$(python3 -c 'import os, sysconfig; print(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "nccl", "lib"))')
shim=$(mktemp -d)
ln -sf "$nccl_lib/libnccl.so.2" "$shim/libnccl.so"
export LD_LIBRARY_PATH=$torch_lib:$nccl_lib:$shim:${LD_LIBRARY_PATH:-}
built_at=${BUILT_AT:-/work/main}
if [[ ! -e $built_at/tests/fixtures ]]; then
  mkdir -p "$(dirname "$built_at")" && ln -sfn "$PWD" "$built_at"
fi
