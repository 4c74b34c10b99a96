"""Share of a data-parallel LoRA training step spent all-reducing gradients: SmolLM2-135M (the
default model), batch 8 x 128 tokens per rank (20 Newsgroups, whose texts fill 128 tokens), 2
ranks under umtune-launch on the CPU ring; rank 0's `grad_sync_share` from metrics.jsonl (time in
the gradient all-reduce, including waiting for the slower rank, over training time), and the step
time of one process at the same per-rank batch for reference. Target: share < 10%.

    .venv/bin/python bench/dp_step.py [--steps 12] [--ranks 2] [--threads 1]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(cmd, out, name, a):
    sets = ["model.source=default", "data.dataset=20newsgroups", "data.max_length=128",
            "train.batch_size=8", f"train.max_steps={a.steps}", f"train.log_every={a.steps}",
            "train.eval_every=0", "data.eval_limit=16", f"run.threads={a.threads}",
            f"run.output_dir={out}", f"run.name={name}", "model.device=cpu"]
    args = [str(ROOT / "target/release/umtune"), "train", str(ROOT / "configs/ablations/lora.toml")]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(cmd + args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
    lines = [json.loads(l) for l in (Path(out) / name / "metrics.jsonl").read_text().splitlines()]
    return [l for l in lines if "loss" in l and "split" not in l][-1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        many = train([str(ROOT / "target/release/umtune-launch"), "--nproc-per-node", str(a.ranks), "--"],
                     out, "dp", a)
        one = train([], out, "one", a)
    print(f"SmolLM2-135M LoRA, batch 8 x 128 per rank, {a.steps} steps, {a.threads} thread(s) per rank")
    print(f"1 process : {one['tokens_per_s']:.0f} tokens/s")
    print(f"{a.ranks} ranks   : {many['tokens_per_s']:.0f} tokens/s per rank, "
          f"gradient all-reduce share of rank 0's training time {100 * many['grad_sync_share']:.1f}% "
          f"(target < 10%)")


if __name__ == "__main__":
    main()
