#!/usr/bin/env bash
# NCCL through umtune's c10d shim on a one-GPU machine (no Rust toolchain there; binaries built
# elsewhere and carried in gpu/, see gpu_check.sh for the library paths): a world of one under
# torchrun with dist.backend = "nccl" trains a few steps of LoRA+UM+memory (dropout and noise off)
# and must reach the same weights as the one-process run. Two NCCL ranks cannot share one GPU.
set -uo pipefail
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
nccl_lib=$(python3 -c 'import os, sysconfig; print(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "nccl", "lib"))')
export LD_LIBRARY_PATH=$torch_lib:$nccl_lib:${LD_LIBRARY_PATH:-}
out=$(mktemp -d)
args=(train configs/ablations/lora-um-ema.toml --set model.source=tests/fixtures/llama-tiny-gguf/tiny.gguf
  --set model.device=cuda --set data.dataset=uci-sentiment --set data.train_limit=96 --set data.eval_limit=48
  --set train.max_steps=10 --set train.batch_size=8 --set train.lr=0.01 --set peft.dropout=0
  --set uncertainty.noise=false --set uncertainty.heteroscedastic=false --set run.output_dir="$out")
gpu/umtune "${args[@]}" --set run.name=single >/dev/null 2>&1 || echo "single run failed"
torchrun --standalone --no-python --nproc-per-node 1 gpu/umtune "${args[@]}" --set run.name=nccl \
  --set dist.backend=nccl 2>&1 | grep -E "joining|error|nccl" | head -5
python3 - "$out" <<'PY'
import sys, torch
from safetensors.torch import load_file
a, b = (load_file(f"{sys.argv[1]}/{r}/trainable.safetensors") for r in ("single", "nccl"))
d = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(f"nccl world-1 vs single: {len(a)} tensors, max |diff| {d:.3e}", "OK" if d < 1e-5 else "MISMATCH")
PY
# Two ranks of the CPU ring sharing the one GPU (each stages its CUDA tensors through the host)
# against one rank at twice the batch: equal within the parity tolerance (1e-4 relative per
# tensor, tests/common/process.rs). What a 2-GPU machine would add: two NCCL ranks (one GPU
# each), the NCCL all-reduce, all-to-all and broadcast under real traffic.
ring=(train configs/ablations/lora-um-ema.toml --set model.source=tests/fixtures/llama-tiny-gguf/tiny.gguf
  --set model.device=cuda:0 --set data.dataset=uci-sentiment --set data.train_limit=96 --set data.eval_limit=48
  --set train.max_steps=10 --set train.lr=0.1 --set train.adam_eps=0.1 --set memory.k=256 --set run.output_dir="$out")
gpu/umtune "${ring[@]}" --set train.batch_size=8 --set run.name=one-b8 >/dev/null 2>&1 || echo "one-rank run failed"
gpu/umtune-launch --nproc-per-node 2 -- gpu/umtune "${ring[@]}" --set train.batch_size=4 --set dist.backend=cpu \
  --set run.name=ring2-b4 2>&1 | grep -E "error" | head -5
python3 - "$out" <<'PY'
import sys
from safetensors.torch import load_file
a, b = (load_file(f"{sys.argv[1]}/{r}/trainable.safetensors") for r in ("one-b8", "ring2-b4"))
rel = max(((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp_min(1e-12)).item() for k in a)
print(f"2 CPU-ring ranks on one GPU vs one rank at twice the batch: {len(a)} tensors, max relative diff {rel:.3e}",
      "OK" if rel < 1e-4 else "MISMATCH")
PY
