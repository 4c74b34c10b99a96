#!/usr/bin/env bash
# The ablation study of METHOD.md section 5 as one `umtune sweep`: LoRA, LoRA+UM, LoRA+EMA and
# LoRA+UM+EMA are configs/ablations/lora-um-ema.toml with uncertainty.enabled x memory.enabled
# (exactly the four ablation configs), times SEEDS, on DATASET (SmolLM2-135M, CPU); then
# `umtune report` gives mean and spread over seeds of accuracy, macro-F1 and ECE raw and after
# the temperature (OUT/groups.md).
# Usage: scripts/ablation_sweep.sh [OUT]   (SEEDS=1,2,3 DATASET=uci-sentiment MAX_STEPS=100
#        MAX_LENGTH=32 EVAL_LIMIT=500 PARALLEL=2 THREADS=1; SLURM=1 submits a job array instead)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ablation-sweep}
bin=${UMTUNE:-target/release/umtune}
how=(--local --parallel "${PARALLEL:-2}")
[ -n "${SLURM:-}" ] && how=(--slurm)
"$bin" sweep configs/ablations/lora-um-ema.toml --out "$OUT" "${how[@]}" \
  --grid uncertainty.enabled=false,true --grid memory.enabled=false,true --seeds "${SEEDS:-1,2,3}" \
  --set data.dataset="${DATASET:-uci-sentiment}" --set train.max_steps="${MAX_STEPS:-100}" \
  --set data.max_length="${MAX_LENGTH:-32}" --set data.eval_limit="${EVAL_LIMIT:-500}" \
  --set run.threads="${THREADS:-1}" --set train.log_every=5
"$bin" report "$OUT" >/dev/null
cat "$OUT/groups.md"
