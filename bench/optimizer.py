"""The optimizer step on the LoRA parameter set of LLaMA-3-8B (r=16 on every linear layer plus
the head: 449 tensors, 21M parameters), as `umtune bench-optimizer` times it: ATen's fused AdamW
(umtune's default) against the per-tensor loop umtune ran before (target: fused <= 0.3x), each
with the gradient norm clipping needs. For reference, torch.optim.AdamW on the same shapes in
the same run: fused=True, foreach=True and the for-loop, each with clip_grad_norm_.

    .venv/bin/python bench/optimizer.py [--device cpu|cuda] [--model preset:llama3-8b] [--iters 20]
"""
import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TARGETS = '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'


def torch_step_secs(shapes, device, iters, warmup, **kind):
    params = [(torch.randn(*s, device=device) * 0.02).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kind)
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=kind.get("foreach", False) or kind.get("fused", False))
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="preset:llama3-8b")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--umtune", default=str(ROOT / "target/release/umtune"))
    args = p.parse_args()
    cmd = [
        args.umtune, "bench-optimizer", "--iters", str(args.iters), "--warmup", str(args.warmup),
        "--set", f"model.source={args.model}", "--set", f"model.device={args.device}",
        "--set", f"peft.targets={TARGETS}", "--set", f"run.threads={args.threads}",
    ]
    ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    if args.threads:
        torch.set_num_threads(args.threads)
    # The same shapes: LoRA A (r, n_in) and B (n_out, r) per targeted layer, then the head.
    shapes = ours.pop("shapes")
    print(json.dumps(ours))
    print(f"umtune fused / loop: {ours['fused_over_loop']:.3f}  ({ours['fused_secs'] * 1e3:.2f} ms vs "
          f"{ours['loop_secs'] * 1e3:.2f} ms, {ours['tensors']} tensors, {ours['parameters']} parameters, {args.device})")
    ref = {name: torch_step_secs(shapes, args.device, args.iters, args.warmup, **kind)
           for name, kind in [("fused", {"fused": True}), ("foreach", {"foreach": True}),
                              ("for-loop", {"foreach": False})]}
    for name, secs in ref.items():
        print(f"torch.optim.AdamW {name}: {secs * 1e3:.2f} ms; umtune fused / this: {ours['fused_secs'] / secs:.3f}")


if __name__ == "__main__":
    main()
