#!/usr/bin/env bash
# One-shot GPU check for a machine with CUDA PyTorch but no Rust toolchain: binaries built
# elsewhere are carried in gpu/ (umtune and the backbones test binary) with tests/fixtures.
#   gpu/umtune, gpu/backbones (cp target/release/deps/backbones-<hash> gpu/backbones)
# Prints doctor, the CUDA correctness test, and forward-pass ratios against transformers.
set -uo pipefail
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
nccl_lib=$(python3 -c 'import os, sysconfig; print(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "nccl", "lib"))')
shim=$(mktemp -d)
ln -sf "$nccl_lib/libnccl.so.2" "$shim/libnccl.so"
export LD_LIBRARY_PATH=$torch_lib:$nccl_lib:$shim:${LD_LIBRARY_PATH:-}
# The test binary looks for fixtures where it was built.
built_at=${BUILT_AT:-/work/main}
if [[ ! -e $built_at/tests/fixtures ]]; then
  mkdir -p "$(dirname "$built_at")" && ln -sfn "$PWD" "$built_at"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
gpu/umtune doctor
gpu/backbones --ignored --nocapture --test-threads 1 2>&1 | grep -E "cuda|test result|panicked"
run_bench() { python3 bench/forward.py --umtune gpu/umtune --device cuda "$@" 2>&1 | grep -v -i warn; }
if [[ ${QUICK:-0} != 1 ]]; then
  for args in "--dtype f32" "--dtype bf16" "--dtype bf16 --batch 16 --seq-len 512"; do
    run_bench --models preset:gpt2,preset:smollm2-135m --iters 20 --warmup 5 $args
  done
fi
run_bench --models preset:gpt2-medium,preset:llama3-8b --dtype bf16 --batch 4 --seq-len 512 --iters 10 --warmup 3
