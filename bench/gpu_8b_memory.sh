#!/usr/bin/env bash
# LLaMA-3-8B training memory on one GPU (issue "8B fits"): umtune configurations beside
# `umtune plan` and transformers + peft, for a machine with CUDA PyTorch, transformers and peft
# but no Rust toolchain: gpu/umtune is built elsewhere and carried (see bench/gpu_check.sh).
#   bash bench/gpu_8b_memory.sh [--batch 4] [--seq-len 2048]
set -uo pipefail
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$torch_lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/gpu_8b_memory.py --umtune gpu/umtune "$@" 2>&1 | grep -v -i warn
