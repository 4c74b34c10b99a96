#!/usr/bin/env bash
# Stability of the ablation configs across seeds and datasets (issue 10): every config in CONFIGS
# on every dataset in DATASETS with every seed in SEEDS, at the configs' learning rate, MAX_STEPS
# optimizer steps, then `umtune report` of the whole group (accuracy, macro-F1, ECE per run; read
# metrics.jsonl for the per-part gradient norms, probes and spike warnings of each run).
# JOBS runs in parallel, each with THREADS libtorch threads. Runs are `--resume auto`: an
# interrupted campaign continues (finished runs are skipped, a killed one resumes from its last
# checkpoint, `checkpoint.every`).
# Usage: scripts/stability.sh [OUT_DIR]
#   CONFIGS="lora lora-um lora-ema lora-um-ema" DATASETS="reuters-r8" SEEDS="1 2 3 4 5"
#   MAX_STEPS=150 MAX_LENGTH=32 EVAL_LIMIT=500 JOBS=2 THREADS=1 EXTRA="--set k=v ..."
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/stability}
CONFIGS=${CONFIGS:-"lora lora-um lora-ema lora-um-ema"}
DATASETS=${DATASETS:-"reuters-r8"}
SEEDS=${SEEDS:-"1 2 3 4 5"}
MAX_STEPS=${MAX_STEPS:-150}
MAX_LENGTH=${MAX_LENGTH:-32}
EVAL_LIMIT=${EVAL_LIMIT:-500}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
EXTRA=${EXTRA:-}
bin=${UMTUNE:-target/release/umtune}
mkdir -p "$OUT"
run_one() {
  local cfg=$1 ds=$2 seed=$3 name="$1-$2-s$3"
  [ -e "$OUT/$name/summary.json" ] && return 0
  # shellcheck disable=SC2086
  $bin train "configs/ablations/$cfg.toml" --set run.output_dir="$OUT" --set run.name="$name" \
    --set run.seed="$seed" --set data.dataset="$ds" --set train.max_steps="$MAX_STEPS" \
    --set data.max_length="$MAX_LENGTH" --set data.eval_limit="$EVAL_LIMIT" \
    --set run.threads="$THREADS" --set train.log_every=5 --resume auto $EXTRA >>"$OUT/$name.log" 2>&1 ||
    echo "$name failed (see $OUT/$name.log)"
}
export -f run_one
export OUT MAX_STEPS MAX_LENGTH EVAL_LIMIT THREADS EXTRA bin
for ds in $DATASETS; do
  for seed in $SEEDS; do
    for cfg in $CONFIGS; do
      echo "$cfg $ds $seed"
    done
  done
done | xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _
$bin report "$OUT"
