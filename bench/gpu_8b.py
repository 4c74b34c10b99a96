"""Issue 22's throughput run on one GPU: LLaMA-3-8B's shape (`preset:llama3-8b`, random bf16
weights, the same shapes on both sides), LoRA r=16 (alpha 32, no dropout) on every linear layer,
a 2-class head, batch x seq 4 x 2048 (or --batch/--seq-len), with activation checkpointing off and
on: umtune (`bench-train`) against transformers + peft (SDPA, bf16, gradient checkpointing
matching), each --warmup + --iters optimizer steps in its own process. Prints seconds per step,
tokens/s, torch.cuda.max_memory_allocated, MFU and the ratios, then LoRA + UM + memory against
LoRA at the same shape (checkpointing on), then `umtune plan`'s peaks against the measured ones.

MFU counts 4N + 12 L d s FLOPs per token (NeMo's convention for a frozen base: forward 2N and
input-gradient backward 2N over the N block weights, plus attention's QK^T and AV, 4 L d s
forward and twice that backward; the recomputation of checkpointing is not counted), against a
dense bf16 peak of --peak-tflops (989: H100/H200 SXM).

    python3 bench/gpu_8b.py --umtune gpu/umtune [--batch 4] [--seq-len 2048] [--json out.json]

`--device cpu --preset smollm2-135m --batch 1 --seq-len 32 --iters 1 --warmup 1` dry-runs both
sides here (no allocator peak, MFU against the given peak).
"""
import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from forward import LLAMA_PRESETS, ROOT
from gpu_8b_memory import ALL_LINEAR, GIB, umtune, umtune_sets


def flops_per_token(preset, seq_len):
    c = LLAMA_PRESETS[f"preset:{preset}"]
    d, layers, ff = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    n_block = layers * (2 * d * d + 2 * d * kv + 3 * d * ff)
    return 4 * n_block + 12 * layers * d * seq_len


def umtune_step(args, checkpointing, um_memory):
    r, planned, err = umtune(args, umtune_sets(args, checkpointing, 0.0, um_memory, "none"), args.iters, args.warmup)
    if r is None:
        return {"error": err}
    key = "peak_checkpointed" if checkpointing == "true" else "peak_plain"
    return {"secs": r["secs_per_step"], "peak": r.get("cuda_peak_allocated"), "plan": planned.get(key)}


def reference_step(args, checkpointing):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = opt = None
    try:
        with device:
            cfg = LlamaConfig(**LLAMA_PRESETS[f"preset:{args.preset}"], num_labels=2, pad_token_id=0,
                              attn_implementation="sdpa")
            model = LlamaForSequenceClassification._from_config(cfg, dtype=torch.bfloat16)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ALL_LINEAR,
                                                 task_type="SEQ_CLS")).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
        ids = torch.randint(1, cfg.vocab_size, (args.batch, args.seq_len), device=device)
        labels = torch.randint(0, 2, (args.batch,), device=device)

        def step():
            start = time.perf_counter()
            opt.zero_grad()
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        for _ in range(args.warmup):
            step()
        secs = statistics.median(step() for _ in range(args.iters))
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        return {"secs": secs, "peak": peak}
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    finally:
        del model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def describe(name, r, tokens, flops, peak_tflops):
    if "error" in r:
        return f"{name}: {r['error']}"
    mfu = flops * tokens / r["secs"] / (peak_tflops * 1e12)
    mem = f", max_memory_allocated {r['peak'] / GIB:.2f} GiB" if r.get("peak") else ""
    return f"{name}: {r['secs']:.3f} s/step, {tokens / r['secs']:.0f} tokens/s, MFU {100 * mfu:.1f}%{mem}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--umtune", type=Path, default=ROOT / "target/release/umtune")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tokens = args.batch * args.seq_len
    flops = flops_per_token(args.preset, args.seq_len)
    gpu = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"{where}, {time.strftime('%Y-%m-%d')}; {args.preset} bf16, LoRA r=16 on all linear layers, "
          f"{args.batch} x {args.seq_len}, {args.warmup} warm-up + {args.iters} timed steps; "
          f"{flops / 1e9:.1f} GFLOP/token (4N + 12 L d s)", flush=True)
    out = {}
    for checkpointing in ["false", "true"]:
        ours = umtune_step(args, checkpointing, "false")
        print(describe(f"umtune checkpointing={checkpointing}", ours, tokens, flops, args.peak_tflops), flush=True)
        theirs = {"error": "skipped"} if args.skip_reference else reference_step(args, checkpointing == "true")
        print(describe(f"transformers+peft checkpointing={checkpointing}", theirs, tokens, flops, args.peak_tflops),
              flush=True)
        if "secs" in ours and "secs" in theirs:
            mem = f", peak memory {ours['peak'] / theirs['peak']:.2f}x" if ours.get("peak") and theirs.get("peak") else ""
            print(f"  umtune / transformers+peft: tokens/s {theirs['secs'] / ours['secs']:.2f}x{mem}", flush=True)
        if ours.get("peak") and ours.get("plan"):
            print(f"  umtune plan {ours['plan'] / GIB:.2f} GiB, measured / plan {ours['peak'] / ours['plan']:.2f}",
                  flush=True)
        out[f"checkpointing={checkpointing}"] = {"umtune": ours, "reference": theirs}
    method = umtune_step(args, "true", "true")
    print(describe("umtune LoRA+UM+memory checkpointing=true", method, tokens, flops, args.peak_tflops), flush=True)
    lora = out["checkpointing=true"]["umtune"]
    if "secs" in method and "secs" in lora:
        print(f"  LoRA+UM+memory / LoRA step time: {method['secs'] / lora['secs']:.3f} (target <= 1.15)", flush=True)
    out["method"] = method
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
