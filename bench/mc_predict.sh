#!/usr/bin/env bash
# MC prediction's cost against the deterministic pass, measured in one run: `umtune predict` of
# INPUT with the run RUN (uncertainty modeling on), then `--mc N`. The MC passes share the blocks
# below the first UM block (src/task/predictive.rs), so the ratio should be near
# (plugged + N (L - plugged)) / L for L blocks, the first UM block `plugged` (printed), where
# whole passes cost N. A second binary (OLD=path) is timed too when given, and its MC
# probabilities compared with this one's (equal up to float order when both draw alike: binaries
# of 0c5d33e (whole passes) and d361bea (shared blocks), both drawing from the global generator,
# gave bitwise the same probabilities; later ones key each example's draws by its id).
# Usage: bench/mc_predict.sh RUN INPUT.jsonl [N]   (UMTUNE=target/release/umtune OLD=)
set -euo pipefail
run=$1 input=$2 n=${3:-16}
bin=${UMTUNE:-target/release/umtune}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Fractions of a second matter for small inputs: time with date +%s.%N.
timed() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
det=$(timed "$bin" predict "$run" --input "$input" --output "$out/det.jsonl")
mc=$(timed "$bin" predict "$run" --input "$input" --output "$out/mc.jsonl" --mc "$n")
python3 - "$run" "$det" "$mc" "$n" <<'PY'
import json, sys, re
run, det, mc, n = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
cfg = open(f"{run}/config.toml").read()
m = re.search(r"^layers = \[(.*)\]", cfg[cfg.index("[uncertainty]"):], re.M)
print(f"deterministic {det:.1f} s, MC {n} {mc:.1f} s: ratio {mc / det:.2f} (whole passes: {n})")
print(f"uncertainty.layers = [{m.group(1) if m else '?'}] (empty: the top 4)")
PY
if [[ -n ${OLD:-} ]]; then
  old=$(timed "$OLD" predict "$run" --input "$input" --output "$out/old.jsonl" --mc "$n")
  echo "OLD binary MC $n: ${old} s, this one's / OLD = $(echo "scale=3; $mc / $old" | bc)"
  python3 - "$out/mc.jsonl" "$out/old.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
d = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra["probabilities"], rb["probabilities"]))
same = sum(ra["label_id"] == rb["label_id"] for ra, rb in zip(a, b))
print(f"MC probabilities, this binary vs OLD: max |diff| {d:.2e}; labels equal {same}/{len(a)}")
PY
fi
