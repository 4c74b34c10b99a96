"""The quantized frozen base (`model.quantize`) on CPU.

1. The kernel choice: dequantize-then-GEMM (what umtune does) against ATen's
   `_weight_int8pack_mm` (per-channel int8, tuned for decoding) at a decode shape (1 row) and a
   training shape (512 rows), 4096 x 4096 in bf16, in this virtualenv's torch.
2. A LoRA step (every linear layer, dropout 0.05) on a LLaMA-shaped preset with quantize none /
   int8 / q4: seconds per step and peak resident memory, beside `umtune plan`'s frozen bytes.
3. With --8b: `preset:llama3-8b` in bf16 with `model.quantize = int8` (or --8b-quantize q4), one
   LoRA step at batch 1 x 64 on this machine: that it completes, its time and its peak RSS.

    .venv/bin/python bench/quantized.py [--preset smollm2-135m] [--batch 4] [--seq-len 128] [--8b]
"""
import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from peak import measure

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target/release/umtune"
ALL_LINEAR = 'peft.targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'


def seconds(f, iters=5):
    f()
    t = time.perf_counter()
    for _ in range(iters):
        f()
    return (time.perf_counter() - t) / iters


def kernels():
    torch.manual_seed(0)
    n = k = 4096
    w = torch.randn(n, k)
    # Per-block int8 (umtune's layout, blocks of 32) and per-channel int8 (the pack GEMM's).
    blocks = w.view(n, k // 32, 32)
    scale = (blocks.abs().amax(-1) / 127).half()
    q = (blocks / scale.float().unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    ch_scale = (w.abs().amax(-1) / 127)
    q_ch = (w / ch_scale.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    for rows in [1, 512]:
        x = torch.randn(rows, k).bfloat16()

        def dequant_gemm():
            wd = (q.float() * scale.float().unsqueeze(-1)).view(n, k).bfloat16()
            return x @ wd.t()

        def pack_mm():
            return torch._weight_int8pack_mm(x, q_ch, ch_scale.bfloat16())

        a, b = seconds(dequant_gemm), seconds(pack_mm)
        print(f"{rows:>4} rows x {k} -> {n}, bf16: dequantize + GEMM {a * 1e3:.1f} ms, "
              f"_weight_int8pack_mm {b * 1e3:.1f} ms (pack / dequant: {b / a:.2f}x)", flush=True)


def step(preset, quantize, batch, seq_len, iters, dtype="f32", checkpointing="false"):
    cmd = [str(BIN), "bench-train", "--set", f"model.source=preset:{preset}", "--set", "model.device=cpu",
           "--set", f"model.dtype={dtype}", "--set", f"model.quantize={quantize}", "--set", "peft.dropout=0.05",
           "--set", f"train.activation_checkpointing={checkpointing}", "--set", ALL_LINEAR,
           "--batch", str(batch), "--seq-len", str(seq_len), "--iters", str(iters), "--warmup", "1" if iters > 1 else "0"]
    return measure(cmd)


def planned(preset, quantize, batch, seq_len, dtype="f32", checkpointing="false"):
    cmd = [str(BIN), "plan", str(ROOT / "configs/default.toml"), "--json", "--set", f"model.source=preset:{preset}",
           "--set", "model.device=cpu", "--set", f"model.dtype={dtype}", "--set", f"model.quantize={quantize}",
           "--set", "peft.dropout=0.05", "--set", f"train.activation_checkpointing={checkpointing}",
           "--set", f"train.batch_size={batch}", "--set", f"data.max_length={seq_len}", "--set", ALL_LINEAR]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--8b", dest="eight_b", action="store_true")
    ap.add_argument("--8b-quantize", dest="eight_b_quantize", default="int8")
    ap.add_argument("--skip-small", action="store_true")
    args = ap.parse_args()
    kernels()
    if not args.skip_small:
        base = None
        for quantize in ["none", "int8", "q4"]:
            r = step(args.preset, quantize, args.batch, args.seq_len, args.iters)
            p = planned(args.preset, quantize, args.batch, args.seq_len)
            base = base or r
            print(f"{args.preset} quantize={quantize}: {r['secs_per_step']:.3f} s/step "
                  f"({r['secs_per_step'] / base['secs_per_step']:.2f}x of none), peak RSS {r['peak_bytes'] / 2**30:.2f} GiB "
                  f"({r['peak_bytes'] / base['peak_bytes']:.2f}x), planned frozen weights {p['frozen_bytes'] / 2**30:.3f} GiB, "
                  f"planned peak {p['peak_plain'] / 2**30:.2f} GiB", flush=True)
    if args.eight_b:
        q = args.eight_b_quantize
        t = time.perf_counter()
        r = step("llama3-8b", q, 1, 64, 1, dtype="bf16", checkpointing="true")
        p = planned("llama3-8b", q, 1, 64, dtype="bf16", checkpointing="true")
        print(f"llama3-8b bf16 quantize={q}, LoRA on every linear layer, 1 x 64, checkpointing on: one step "
              f"{r['secs_per_step']:.1f} s (whole process with random init {time.perf_counter() - t:.0f} s), "
              f"peak RSS {r['peak_bytes'] / 2**30:.2f} GiB; umtune plan: frozen weights {p['frozen_bytes'] / 2**30:.2f} GiB, "
              f"peak {p['peak_checkpointed'] / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
