#!/usr/bin/env bash
# The study of uncertainty modeling (issue 23; METHOD.md sections 1 and 6) on CPU, in stages:
#   train  every config in CONFIGS on every dataset and seed, scripts/stability.sh's protocol
#          (MAX_STEPS optimizer steps at MAX_LENGTH tokens, EVAL_LIMIT validation examples)
#          -> OUT/clean/CONFIG-DATASET-sSEED
#   noise  the same runs with LABEL_NOISE of the training labels flipped (data.train_corruption,
#          one flip set for every config and seed: a paired comparison) -> OUT/label_noise=L/
#   eval   every clean run scored under test-time word drop and mask at each of SEVERITIES
#          (`umtune eval --corrupt drop=X --save` -> RUN/evals/drop=X.json)
#   mc     the clean runs of MC_CONFIGS (default: those of CONFIGS with uncertainty modeling)
#          scored with MC passes (`--mc MC --save` -> RUN/evals/mc=MC.json)
#   differ each seed's test predictions of every config against LoRA's (`umtune predict`):
#          how many of the test examples each config labels otherwise -> OUT/differ.md
#   keep   (not in the default STAGES) copy every finished run's small files (no weights) to
#          KEEP (default docs/um-study/runs) and report there: the committed record of the study
# and then `umtune report OUT`: results.md, groups.md (mean and sd over seeds per config, the
# label-noise runs as their own groups), robustness.md/.csv (accuracy and ECE against severity per
# protocol, MC against the deterministic pass) and robustness-PROTOCOL-DATASET.png.
# Finished work is skipped, so an interrupted study continues where it stopped.
# Usage: scripts/um_study.sh [OUT_DIR]   (the issue's full study: SEEDS="1 2 3 4 5"
#   DATASETS="uci-sentiment reuters-r8"; about 2.5 core-hours per dataset and seed)
#   STAGES="train noise eval mc" CONFIGS="lora lora-um lora-um-absolute-l1 lora-um-ema"
#   NOISE_CONFIGS=$CONFIGS DATASETS=uci-sentiment SEEDS="1 2 3" SEVERITIES="0.1 0.3 0.5"
#   LABEL_NOISE="0.2 0.4" MC=16 MC_CONFIGS=$CONFIGS JOBS=2 (and stability.sh's MAX_STEPS MAX_LENGTH EVAL_LIMIT THREADS)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/um-study}
STAGES=${STAGES:-"train noise eval mc differ"}
CONFIGS=${CONFIGS:-"lora lora-um lora-um-absolute-l1 lora-um-ema"}
NOISE_CONFIGS=${NOISE_CONFIGS:-$CONFIGS}
DATASETS=${DATASETS:-"uci-sentiment"}
SEEDS=${SEEDS:-"1 2 3"}
SEVERITIES=${SEVERITIES:-"0.1 0.3 0.5"}
LABEL_NOISE=${LABEL_NOISE:-"0.2 0.4"}
MC=${MC:-16}
JOBS=${JOBS:-2}
bin=${UMTUNE:-target/release/umtune}
export CONFIGS DATASETS SEEDS JOBS UMTUNE=$bin
has() { [[ " $STAGES " == *" $1 "* ]]; }
has train && scripts/stability.sh "$OUT/clean"
if has noise; then
  for l in $LABEL_NOISE; do
    CONFIGS=$NOISE_CONFIGS EXTRA="--set data.train_corruption.label_noise=$l" \
      scripts/stability.sh "$OUT/label_noise=$l"
  done
fi
# One evaluation: RUN PROTOCOL-NAME ARGS..., skipped when saved before.
eval_one() {
  local run=$1 name=$2
  shift 2
  [ -e "$run/evals/$name.json" ] && return 0
  $bin eval "$run" "$@" --save >/dev/null 2>>"$run/evals.log" || echo "$run: eval $* failed (see $run/evals.log)"
}
export -f eval_one
export bin
# The finished clean runs of the configs given.
runs() {
  for cfg in "$@"; do
    for ds in $DATASETS; do
      for seed in $SEEDS; do
        local d="$OUT/clean/$cfg-$ds-s$seed"
        [ -e "$d/summary.json" ] && echo "$d"
      done
    done
  done
}
{
  if has eval; then
    for run in $(runs $CONFIGS); do
      for x in $SEVERITIES; do
        echo "$run drop=$x --corrupt drop=$x"
        echo "$run mask=$x --corrupt mask=$x"
      done
    done
  fi
  if has mc; then
    for run in $(runs ${MC_CONFIGS:-$CONFIGS}); do
      if grep -q '"uncertainty.enabled": true' "$run/summary.json"; then echo "$run mc=$MC --mc $MC"; fi
    done
  fi
} | xargs -r -P "$JOBS" -L 1 bash -c 'eval_one "$@"' _
if has differ; then
  cache=${UMTUNE_CACHE:-$HOME/.cache/umtune}
  {
    echo "| dataset | seed | config | test examples | labelled otherwise than LoRA |"
    echo "|---|---|---|---|---|"
    for ds in $DATASETS; do
      jsonl="$OUT/$ds-test.jsonl"
      [ -e "$jsonl" ] || .venv/bin/python -c '
import json, sys, pyarrow.parquet as pq
with open(sys.argv[2], "w") as f:
    for row in pq.read_table(sys.argv[1]).to_pylist():
        f.write(json.dumps({"text": row["text"]}) + "\n")' "$cache/data/$ds/test.parquet" "$jsonl"
      for seed in $SEEDS; do
        for cfg in $CONFIGS; do
          run="$OUT/clean/$cfg-$ds-s$seed"
          [ -e "$run/summary.json" ] || continue
          [ -e "$run/test-predictions.jsonl" ] ||
            $bin predict "$run" --input "$jsonl" --output "$run/test-predictions.jsonl" 2>>"$run/evals.log"
        done
        base="$OUT/clean/lora-$ds-s$seed/test-predictions.jsonl"
        [ -e "$base" ] || continue
        for cfg in $CONFIGS; do
          p="$OUT/clean/$cfg-$ds-s$seed/test-predictions.jsonl"
          [ "$cfg" != lora ] && [ -e "$p" ] || continue
          .venv/bin/python -c '
import json, sys
a = [json.loads(l)["label_id"] for l in open(sys.argv[1])]
b = [json.loads(l)["label_id"] for l in open(sys.argv[2])]
print(f"| {sys.argv[3]} | {sys.argv[4]} | {sys.argv[5]} | {len(a)} | {sum(x != y for x, y in zip(a, b))} |")' \
            "$base" "$p" "$ds" "$seed" "$cfg"
        done
      done
    done
  } >"$OUT/differ.md"
  cat "$OUT/differ.md"
fi
# The small files of every finished run (summary, metrics, config, saved evaluations: what
# `umtune report` reads; no weights, no predictions) and differ.md, kept under KEEP in the
# same layout, so that a later session can add seeds or datasets and report them all together.
if has keep; then
  KEEP=${KEEP:-docs/um-study/runs}
  (cd "$OUT" && find . -name summary.json -printf '%h\n') | while read -r run; do
    mkdir -p "$KEEP/$run"
    for f in summary.json run.json config.toml metrics.jsonl calibration.json; do
      [ -e "$OUT/$run/$f" ] && cp "$OUT/$run/$f" "$KEEP/$run/"
    done
    # `if`, not `&&`: a run without saved evaluations (label noise) must not end the loop with a
    # failing status, which `set -e` and pipefail turn into the script's exit before the report.
    if [ -d "$OUT/$run/evals" ]; then
      mkdir -p "$KEEP/$run/evals" && cp "$OUT/$run"/evals/*.json "$KEEP/$run/evals/"
    fi
  done
  if [ -e "$OUT/differ.md" ]; then cp "$OUT/differ.md" "$KEEP/"; fi
  $bin report "$KEEP"
fi
$bin report "$OUT"
