"""Training-step overhead of the method: LoRA + uncertainty modeling + external memory vs plain
LoRA, same model, batch, threads and optimizer, both timed by `umtune bench-train` (one step =
zero_grad, forward with the plug-ins, the full loss, backward, AdamW, memory write). The memory
is filled to its capacity (16,384 entries by default) before timing, so every read scans the full
ring as in a long run, and each step brings fresh example ids. The two are alternated --rounds
times; prints the median ratio (target: <= 1.15).

    .venv/bin/python bench/method_overhead.py [--device cpu|cuda] [--model default] [--batch 8] [--seq-len 128]
"""
import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "lora": [],
    "lora+um+ema": ["--set", "uncertainty.enabled=true", "--set", "memory.enabled=true"],
}


def time_variant(extra, args):
    cmd = [
        str(args.umtune), "bench-train", "--model", args.model, "--batch", str(args.batch),
        "--seq-len", str(args.seq_len), "--iters", str(args.iters), "--warmup", str(args.warmup),
        "--set", f"model.device={args.device}", "--set", f"model.dtype={args.dtype}",
        "--set", f"run.threads={args.threads}", "--set", "peft.dropout=0.0",
    ] + extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["secs_per_step"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32")
    p.add_argument("--model", default="default")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--umtune", type=Path, default=ROOT / "target" / "release" / "umtune")
    args = p.parse_args()
    times = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, extra in VARIANTS.items():
            times[name].append(time_variant(extra, args))
    ratio = statistics.median(m / b for m, b in zip(times["lora+um+ema"], times["lora"]))
    print(f"training step, {args.model}, batch {args.batch} x {args.seq_len}, {args.dtype}, {args.device}, "
          f"{args.threads} threads; memory full (prefilled to capacity); median of {args.rounds} alternating rounds")
    for name, t in times.items():
        print(f"{name:<12} {statistics.median(t):.3f} s/step")
    print(f"ratio (lora+um+ema / lora): {ratio:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
