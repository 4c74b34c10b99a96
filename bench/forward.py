"""Forward-pass throughput, umtune vs transformers (PyTorch eager), same threads, dtype and batch.

Runs `umtune bench-forward` and the same forward in transformers in one process tree and prints
tokens/s and the ratio umtune / transformers (target: >= 1.0). Models: a GPT-2-small-shaped random
model and the packaged SmolLM2-135M (GGUF, dequantized to the working dtype on both sides);
`--models preset:smollm2-135m` is the same shape with random weights (for machines without it).

    .venv/bin/python bench/forward.py [--device cpu|cuda] [--dtype f32|bf16] [--batch 8] [--seq-len 128]
"""
import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("UMTUNE_CACHE", Path.home() / ".cache" / "umtune"))
GGUF = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


LLAMA_PRESETS = {
    "preset:smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    "preset:llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
}
GPT2_PRESETS = {"preset:gpt2": dict(), "preset:gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16)}


def reference_model(name, dtype, device):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    # Random presets are built on the device in the working dtype (an 8B model would not fit in
    # f32 on the host of a small machine).
    with torch.device(device):
        if name in GPT2_PRESETS:
            return GPT2LMHeadModel._from_config(GPT2Config(**GPT2_PRESETS[name]), dtype=dtype).eval()
        if name in LLAMA_PRESETS:
            return LlamaForCausalLM._from_config(LlamaConfig(**LLAMA_PRESETS[name]), dtype=dtype).eval()
    model = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval()


def time_reference(name, args):
    device = torch.device(args.device)
    model = reference_model(name, DTYPES[args.dtype], device)
    assert model.dtype == DTYPES[args.dtype], model.dtype
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=device)

    def step():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return args.batch * args.seq_len / statistics.median(times)


def time_umtune(name, args):
    cmd = [
        str(args.umtune), "bench-forward", "--model", name, "--batch", str(args.batch),
        "--seq-len", str(args.seq_len), "--iters", str(args.iters), "--warmup", str(args.warmup),
        "--set", f"model.dtype={args.dtype}", "--set", f"model.device={args.device}",
        "--set", f"run.threads={torch.get_num_threads()}",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--umtune", type=Path, default=ROOT / "target" / "release" / "umtune")
    p.add_argument("--models", default="preset:gpt2,default")
    p.add_argument("--rounds", type=int, default=3, help="alternating umtune/reference rounds")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"forward pass, batch {args.batch} x {args.seq_len} tokens, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"median of {args.rounds} alternating rounds, each the median of {args.iters} timed passes")
    print(f"{'model':<14} {'umtune tok/s':>14} {'transformers tok/s':>20} {'ratio':>7}")
    for name in args.models.split(","):
        # Alternate the two so that drift in the machine's speed hits both alike.
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(time_umtune(name, args))
            theirs.append(time_reference(name, args))
        ratio = statistics.median(o / t for o, t in zip(ours, theirs))
        label = {"preset:gpt2": "gpt2-small", "default": "smollm2-135m"}.get(name, name.replace("preset:", ""))
        print(f"{label:<14} {statistics.median(ours):>14.0f} {statistics.median(theirs):>20.0f} {ratio:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
