#!/usr/bin/env bash
# One-shot GPU check of training, for a machine with CUDA PyTorch but no Rust toolchain:
# gpu/umtune (built elsewhere), tests/fixtures (gpt2-tiny with its tokenizer) and
# gpu/data/uci-sentiment (copied from $UMTUNE_CACHE/data) are carried there.
set -uo pipefail
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$torch_lib:${LD_LIBRARY_PATH:-}
out=$(mktemp -d)
for dtype in f32 bf16; do
  gpu/umtune train configs/default.toml --set model.source=tests/fixtures/gpt2-tiny --set model.device=cuda \
    --set model.dtype=$dtype --set "peft.targets=[]" --set data.dataset=gpu/data/uci-sentiment --set train.max_steps=30 \
    --set run.output_dir=$out --set run.name=gpu-$dtype --set train.log_every=10 2>&1 | grep -v -i warn | tail -6
done
[[ ${QUICK:-0} == 1 ]] && exit 0
for dtype in f32 bf16; do
  python3 bench/train_step.py --umtune gpu/umtune --device cuda --dtype $dtype --models preset:gpt2,preset:smollm2-135m \
    --iters 10 --warmup 3 2>&1 | grep -v -i -E "warn|missing|newly|Notes|^-|^$"
done
