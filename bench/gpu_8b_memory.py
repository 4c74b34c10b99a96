"""LLaMA-3-8B's training memory on one GPU: `torch.cuda.max_memory_allocated` (the allocator's
peak, weights included) of LoRA r=16 on every linear layer at batch x seq 4 x 2048, bf16, random
weights (`preset:llama3-8b`; the same shapes on both sides), for umtune with activation
checkpointing off/on, dropout 0/0.05, UM + memory on, and int8/q4 bases, each beside
`umtune plan`'s peak; then transformers + peft with gradient checkpointing on and off on the same
shapes (SDPA, bf16, PEFT's LoRA with the same dropout). Three optimizer steps per run. A run that
does not fit prints OOM.

    python3 bench/gpu_8b_memory.py --umtune gpu/umtune [--batch 4] [--seq-len 2048]

`--device cpu --preset smollm2-135m --batch 1 --seq-len 32` dry-runs umtune's side here (no
allocator peak on the CPU, no reference).
"""
import argparse
import gc
import json
import subprocess
from pathlib import Path

import torch

from forward import LLAMA_PRESETS, ROOT

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


def umtune_sets(args, checkpointing, dropout, um_memory, quantize):
    return [f"model.source=preset:{args.preset}", f"model.device={args.device}", "model.dtype=bf16", f"model.quantize={quantize}",
            "peft.r=16", "peft.alpha=32", f"peft.dropout={dropout}", f"peft.targets={json.dumps(ALL_LINEAR)}",
            f"train.activation_checkpointing={checkpointing}", f"uncertainty.enabled={um_memory}",
            f"memory.enabled={um_memory}"]


def umtune(args, sets, iters=2, warmup=1):
    flags = [x for s in sets for x in ("--set", s)]
    plan = subprocess.run([str(args.umtune), "plan", str(ROOT / "configs/default.toml"), "--json", *flags,
                           "--set", f"train.batch_size={args.batch}", "--set", f"data.max_length={args.seq_len}"],
                          capture_output=True, text=True)
    run = subprocess.run([str(args.umtune), "bench-train", *flags, "--batch", str(args.batch), "--seq-len",
                          str(args.seq_len), "--iters", str(iters), "--warmup", str(warmup)], capture_output=True, text=True)
    planned = json.loads(plan.stdout) if plan.returncode == 0 else {}
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["?"])[-1]
        return None, planned, "OOM" if "out of memory" in run.stderr.lower() else tail[:160]
    return json.loads(run.stdout.strip().splitlines()[-1]), planned, ""


def reference(args, checkpointing, dropout):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = opt = None
    try:
        with torch.device("cuda"):
            cfg = LlamaConfig(**LLAMA_PRESETS[args.preset], num_labels=2, pad_token_id=0, attn_implementation="sdpa")
            model = LlamaForSequenceClassification._from_config(cfg, dtype=torch.bfloat16)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=ALL_LINEAR,
                                                 task_type="SEQ_CLS")).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(1, cfg.vocab_size, (args.batch, args.seq_len), device="cuda")
        labels = torch.randint(0, 2, (args.batch,), device="cuda")
        for _ in range(3):
            opt.zero_grad()
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
            opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), ""
    except torch.OutOfMemoryError:
        return None, "OOM"
    finally:
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--umtune", type=Path, default=ROOT / "target/release/umtune")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    where = f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / GIB:.1f} GiB" if gpu else "CPU"
    print(f"{where}; {args.preset} bf16, LoRA r=16 on all linear layers, {args.batch} x {args.seq_len}", flush=True)
    for checkpointing, dropout, um_memory, quantize in [
        ("false", 0.0, "false", "none"), ("false", 0.05, "false", "none"), ("true", 0.0, "false", "none"),
        ("true", 0.05, "false", "none"), ("true", 0.05, "true", "none"), ("true", 0.05, "false", "int8"),
        ("true", 0.05, "false", "q4"),
    ]:
        r, p, err = umtune(args, umtune_sets(args, checkpointing, dropout, um_memory, quantize))
        key = "peak_checkpointed" if checkpointing == "true" else "peak_plain"
        plan = f"plan {p[key] / GIB:.2f} GiB" if key in p else "plan ?"
        what = f"umtune checkpointing={checkpointing} dropout={dropout} um+memory={um_memory} quantize={quantize}"
        if r is None:
            print(f"{what}: {err} ({plan})", flush=True)
            continue
        peak = r["cuda_peak_allocated"]
        measured = f"max_memory_allocated {peak / GIB:.2f} GiB (measured / plan {peak / p[key]:.2f})" if peak else "no allocator peak"
        print(f"{what}: {measured}, {r['secs_per_step']:.3f} s/step "
              f"({args.batch * args.seq_len / r['secs_per_step']:.0f} tokens/s); {plan}", flush=True)
    if not gpu:
        return
    for checkpointing in [True, False]:
        for dropout in [0.05, 0.0]:
            peak, err = reference(args, checkpointing, dropout)
            what = f"transformers+peft gradient_checkpointing={checkpointing} dropout={dropout}"
            print(f"{what}: " + (err or f"max_memory_allocated {peak / GIB:.2f} GiB"), flush=True)


if __name__ == "__main__":
    main()
