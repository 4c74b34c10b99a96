#!/usr/bin/env bash
# A learning-rate sweep as one SLURM job array (one task per grid point and seed; each task
# checkpoints and requeues itself at SIGUSR1 before its time limit, and resumes):
#   cluster/sweep.sh CONFIG OUT_DIR [more `umtune sweep` options]
# e.g. cluster/sweep.sh configs/default.toml sweeps/lr --time 02:00:00 --sbatch=--partition=gpu
# Then `umtune report OUT_DIR`: mean and spread over seeds per learning rate, the best one, and
# OUT_DIR/sweep.png (metric against the learning rate). `--dry-run` prints the job script.
set -euo pipefail
config=$1 out=$2
shift 2
exec "${UMTUNE:-umtune}" sweep "$config" --out "$out" --slurm \
  --grid train.lr=1e-5,3e-5,1e-4,3e-4,1e-3 --seeds 1,2,3 "$@"
