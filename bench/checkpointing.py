"""Activation checkpointing on CPU: LoRA training-step time and peak resident memory of
`umtune bench-train`, checkpointing off, on every block (`true`) and on every 2nd block (`2`), LoRA
on every linear layer with dropout, on a LLaMA-shaped preset with random weights. Prints one line
per run and the ratios against the plain run measured in the same round (target: step time
<= 1.4x; peak memory down).

    .venv/bin/python bench/checkpointing.py [--preset smollm2-135m] [--batch 4] [--seq-len 256] [--rounds 3]

Peak memory is the process's VmHWM (resident high-water mark), read from /proc while it runs;
`umtune plan`'s peak for the same run is printed beside it (the plan counts tensors, not the
process's runtime and allocator overhead).
"""
import argparse
import json
import statistics
import subprocess
from pathlib import Path

from peak import measure

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target/release/umtune"


def run(preset, batch, seq_len, iters, checkpointing, dropout, memory=True):
    """One `bench-train`: its JSON line, with `peak_bytes`. With `memory`, glibc gets a fixed mmap
    threshold (freed large blocks go back to the system, so the high-water mark follows the live
    tensors rather than the allocator's caching; steps are slower then); without it, the time is
    the one to quote. Both are reported: `secs_per_step` from a plain-allocator run."""
    if memory:
        timed = run(preset, batch, seq_len, iters, checkpointing, dropout, memory=False)
    cmd = [str(BIN), "bench-train", "--set", f"model.source=preset:{preset}", "--set", "model.device=cpu",
           "--set", f"train.activation_checkpointing={checkpointing}", "--set", f"peft.dropout={dropout}",
           "--set", 'peft.targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]',
           "--batch", str(batch), "--seq-len", str(seq_len), "--iters", str(iters), "--warmup", "1"]
    result = measure(cmd, fixed_mmap_threshold=memory)
    if memory:
        result["secs_per_step"] = timed["secs_per_step"]
    return result


def planned(preset, batch, seq_len, checkpointing, dropout):
    """`umtune plan`'s peak for the same run (bytes)."""
    cmd = [str(BIN), "plan", str(ROOT / "configs/default.toml"), "--json", "--set", f"model.source=preset:{preset}",
           "--set", "model.device=cpu", "--set", f"train.activation_checkpointing={checkpointing}",
           "--set", f"peft.dropout={dropout}", "--set", f"train.batch_size={batch}", "--set", f"data.max_length={seq_len}",
           "--set", 'peft.targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]']
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return out["peak_checkpointed" if checkpointing != "false" else "peak_plain"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.05)
    args = ap.parse_args()
    # The process's own footprint (libtorch, the runtime) beside its tensors: a run with almost no
    # activations, minus what the plan says it holds.
    tiny = run(args.preset, 1, 8, 1, "false", 0.0, memory=True)
    overhead = tiny["peak_bytes"] - planned(args.preset, 1, 8, "false", 0.0)
    print(f"process overhead (measured at batch 1 x 8 minus the plan): {overhead / 2**30:.2f} GiB", flush=True)
    ratios = {"true": [], "2": []}
    for _ in range(args.rounds):
        plain = run(args.preset, args.batch, args.seq_len, args.iters, "false", args.dropout)
        plan = planned(args.preset, args.batch, args.seq_len, "false", args.dropout)
        print(f"plain: {plain['secs_per_step']:.3f} s/step, peak {plain['peak_bytes'] / 2**30:.2f} GiB "
              f"(umtune plan + overhead: {(plan + overhead) / 2**30:.2f} GiB, {(plan + overhead) / plain['peak_bytes']:.2f}x)", flush=True)
        for mode in ratios:
            ckpt = run(args.preset, args.batch, args.seq_len, args.iters, mode, args.dropout)
            ratios[mode].append((ckpt["secs_per_step"] / plain["secs_per_step"], ckpt["peak_bytes"] / plain["peak_bytes"]))
            plan = planned(args.preset, args.batch, args.seq_len, mode, args.dropout)
            print(f"activation_checkpointing={mode}: {ckpt['secs_per_step']:.3f} s/step, peak {ckpt['peak_bytes'] / 2**30:.2f} GiB "
                  f"(umtune plan + overhead: {(plan + overhead) / 2**30:.2f} GiB, {(plan + overhead) / ckpt['peak_bytes']:.2f}x)", flush=True)
    for mode, rs in ratios.items():
        print(f"activation_checkpointing={mode}: step time / plain, median of {args.rounds}: "
              f"{statistics.median(r[0] for r in rs):.2f} (target <= 1.4); peak memory / plain: {statistics.median(r[1] for r in rs):.2f}")

if __name__ == "__main__":
    main()
