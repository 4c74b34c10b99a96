"""LoRA training-step time, umtune vs transformers + peft (PyTorch eager), same threads, dtype,
batch, LoRA targets and optimizer (AdamW), with a 2-class sequence-classification head.

One step = zero_grad, forward, cross-entropy, backward, AdamW step, on random tokens; each side
reports the median of --iters steps; the script alternates the two --rounds times and prints the
median ratio umtune / reference of step time (target: <= 0.9).

    .venv/bin/python bench/train_step.py [--device cpu|cuda] [--dtype f32] [--batch 8] [--seq-len 128]
"""
import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from forward import DTYPES, GGUF, GPT2_PRESETS, LLAMA_PRESETS, ROOT

TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def reference_model(name, dtype, device):
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                              LlamaConfig, LlamaForSequenceClassification)
    from transformers.utils import logging

    logging.disable_progress_bar()
    with torch.device(device):
        if name in GPT2_PRESETS:
            model, arch = GPT2ForSequenceClassification._from_config(GPT2Config(**GPT2_PRESETS[name], num_labels=2, pad_token_id=0), dtype=dtype), "gpt2"
        elif name in LLAMA_PRESETS:
            model, arch = LlamaForSequenceClassification._from_config(LlamaConfig(**LLAMA_PRESETS[name], num_labels=2, pad_token_id=0), dtype=dtype), "llama"
        else:
            model, arch = None, "llama"
    if model is None:
        model = AutoModelForSequenceClassification.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, num_labels=2, dtype=torch.float32)
        model.config.pad_token_id = 0
        model = model.to(device=device, dtype=dtype)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS[arch], task_type="SEQ_CLS")
    return get_peft_model(model, cfg).train()


def time_reference(name, args):
    device = torch.device(args.device)
    model = reference_model(name, DTYPES[args.dtype], device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.01)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (args.batch, args.seq_len), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (args.batch,), device=device)

    def step():
        start = time.perf_counter()
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    secs = statistics.median(step() for _ in range(args.iters))
    del model, opt
    return secs


def time_umtune(name, args):
    arch = "gpt2" if name in GPT2_PRESETS else "llama"
    cmd = [
        str(args.umtune), "bench-train", "--model", name, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
        "--iters", str(args.iters), "--warmup", str(args.warmup), "--set", f"model.dtype={args.dtype}",
        "--set", f"model.device={args.device}", "--set", f"run.threads={torch.get_num_threads()}",
        "--set", "peft.r=8", "--set", "peft.alpha=16", "--set", "peft.dropout=0.0",
        "--set", f"peft.targets={json.dumps(TARGETS[arch])}", "--set", "train.lr=5e-4",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["secs_per_step"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--umtune", type=Path, default=ROOT / "target" / "release" / "umtune")
    p.add_argument("--models", default="preset:gpt2,default")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"LoRA training step (r=8, AdamW), batch {args.batch} x {args.seq_len}, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"median of {args.rounds} alternating rounds, each the median of {args.iters} steps")
    print(f"{'model':<14} {'umtune s/step':>14} {'peft s/step':>12} {'ratio':>7}")
    for name in args.models.split(","):
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(time_umtune(name, args))
            theirs.append(time_reference(name, args))
        ratio = statistics.median(o / t for o, t in zip(ours, theirs))
        label = {"preset:gpt2": "gpt2-small", "default": "smollm2-135m"}.get(name, name.replace("preset:", ""))
        print(f"{label:<14} {statistics.median(ours):>14.3f} {statistics.median(theirs):>12.3f} {ratio:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
