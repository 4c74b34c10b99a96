#!/usr/bin/env bash
# The issue-4 findings on the default model (SmolLM2-135M) and data (UCI Sentiment), on CPU:
#  1. calibration: LoRA vs LoRA+UM, one epoch each, ECE before/after the post-hoc temperature;
#  2. label noise: 30% of the training labels flipped, LoRA vs LoRA+UM over several seeds on a
#     subset (SUBSET training examples), test accuracy.
# Usage: scripts/um_experiment.sh [OUT_DIR]   (about 25 minutes on 2 cores)
# CONFIGS picks the configs/ablations/ compared (default "lora lora-um"; the memory variants:
# CONFIGS="lora-ema lora-um-ema"), UMTUNE the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/um-experiment}
SEEDS=${SEEDS:-"1 2 3"}
SUBSET=${SUBSET:-800}
bin=${UMTUNE:-target/release/umtune}
CONFIGS=${CONFIGS:-"lora lora-um"}
mkdir -p "$OUT"
for cfg in $CONFIGS; do
  $bin train configs/ablations/$cfg.toml --set run.output_dir="$OUT/calibration" --set run.name=$cfg
done
for seed in $SEEDS; do
  for cfg in $CONFIGS; do
    $bin train configs/ablations/$cfg.toml --set run.output_dir="$OUT/label-noise" \
      --set run.name=$cfg-s$seed --set run.seed=$seed --set data.train_limit=$SUBSET \
      --set data.train_corruption.label_noise=0.3 --set data.train_corruption.seed=$seed
  done
done
$bin report "$OUT"
