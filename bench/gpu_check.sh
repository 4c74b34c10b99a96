#!/usr/bin/env bash
# One-shot GPU check for a machine with CUDA PyTorch but no Rust toolchain: binaries built
# elsewhere are carried in gpu/ (umtune and the backbones test binary) with tests/fixtures.
#   gpu/umtune, gpu/backbones (cp target/release/deps/backbones-<hash> gpu/backbones)
# Prints doctor, the CUDA correctness test, and forward-pass ratios against transformers.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
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
