#!/usr/bin/env bash
# Issue 22's one GPU visit, as one script (about 8 minutes on an H100/H200; run it with a
# timeout that leaves room for a rerun). The machine has CUDA PyTorch, transformers and peft but
# no Rust toolchain: binaries built here are carried in gpu/ with tests/fixtures:
#   mkdir -p gpu && cp target/release/umtune target/release/umtune-launch gpu/ &&
#   cp "$(ls -t target/release/deps/backbones-* | grep -v '\.d$' | head -1)" gpu/backbones
# Steps (STEPS="doctor parity throughput optimizer nccl" by default):
#   doctor      umtune doctor (CUDA, NCCL, the shim)
#   parity      the CUDA parity test of tests/backbones.rs (--ignored)
#   throughput  bench/gpu_8b.py: 8B shape, umtune vs transformers+peft, MFU, memory, plan, UM+memory
#   optimizer   bench/optimizer.py on CUDA: fused AdamW vs the loop on the 8B LoRA set (449 tensors)
#   nccl        bench/gpu_nccl_check.sh: NCCL world 1 == one process; 2 CPU-ring ranks on the GPU
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-"doctor parity throughput optimizer nccl"}
has() { [[ " $STEPS " == *" $1 "* ]]; }
source bench/gpu_env.sh
stamp() { echo "== $1 ($(date +%T))"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if has doctor; then stamp doctor; gpu/umtune doctor 2>&1 | tail -20; fi
if has parity; then
  stamp parity
  gpu/backbones --ignored --nocapture --test-threads 1 2>&1 | grep -E "cuda|test result|panicked"
fi
if has throughput; then
  stamp throughput
  (cd bench && python3 gpu_8b.py --umtune ../gpu/umtune --json "${OUT:-/tmp}/gpu_8b.json" 2>&1 | grep -v -i warn)
fi
if has optimizer; then
  stamp optimizer
  python3 bench/optimizer.py --umtune gpu/umtune --device cuda --iters 20 2>&1 | grep -v -i warn
fi
if has nccl; then stamp nccl; bash bench/gpu_nccl_check.sh; fi
stamp done
