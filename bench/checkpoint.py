"""Checkpoint save and load time: SmolLM2-135M (the default model) with LoRA + UM + the external
memory full (configs/ablations/lora-um-ema.toml, 16384 entries), `umtune bench-checkpoint`
(median of --iters: every file written and fsynced while a second thread computes its sha256
and xxh3, the directory renamed; loading checks every file's size and xxh3 on the memory-mapped
bytes it then copies into the model, AdamW and the memory, once), against writing and reading
the SAME tensors with Python's safetensors (save_file + fsync, load_file; no checksums) in the
same run. Target: ratio <= 1.0.

    .venv/bin/python bench/checkpoint.py [--iters 5] [--threads 1]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

try:
    import xxhash  # optional: the reference with the same checks
except ImportError:
    xxhash = None

ROOT = Path(__file__).resolve().parent.parent


def median_time(f, iters):
    f()  # warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(ROOT / "target/release/umtune"), "bench-checkpoint",
               "--config", str(ROOT / "configs/ablations/lora-um-ema.toml"),
               "--set", f"run.threads={a.threads}", "--set", "model.device=cpu",
               "--iters", str(a.iters), "--warmup", "1", "--out", out]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"umtune bench-checkpoint failed:\n{r.stderr[-3000:]}")
        ours = json.loads(r.stdout.strip().splitlines()[-1])
        ckpt = Path(ours["checkpoint"])
        files = sorted(f for f in ckpt.iterdir() if f.suffix == ".safetensors")
        tensors = {f.name: load_file(f) for f in files}
        ref_dir = Path(out) / "python"
        ref_dir.mkdir()

        def save():
            for name, t in tensors.items():
                path = ref_dir / name
                save_file(t, path)
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)

        def load():
            for name in tensors:
                load_file(ref_dir / name)

        def load_verified():
            for name in tensors:
                path = ref_dir / name
                xxhash.xxh3_64_hexdigest(path.read_bytes())
                load_file(path)

        ref_save = median_time(save, a.iters)
        ref_load = median_time(load, a.iters)
        ref_load_verified = median_time(load_verified, a.iters) if xxhash else None
    mb = ours["bytes"] / 1e6
    print(f"checkpoint of {mb:.1f} MB ({len(files)} safetensors files + manifest), {a.threads} thread(s)")
    print(f"save: umtune {ours['save_s']:.3f} s, python safetensors {ref_save:.3f} s, "
          f"ratio {ours['save_s'] / ref_save:.2f}x")
    print(f"load: umtune {ours['load_s']:.3f} s (size and xxh3 of every file checked, then copied "
          f"into the model, AdamW and memory; the manifest's checks alone {ours['verify_s']:.3f} s), "
          f"python safetensors {ref_load:.3f} s (no checksums, into fresh tensors), "
          f"ratio {ours['load_s'] / ref_load:.2f}x")
    if ref_load_verified is not None:
        print(f"load against python safetensors + xxhash.xxh3_64 of each file (the same checks): "
              f"{ref_load_verified:.3f} s, ratio {ours['load_s'] / ref_load_verified:.2f}x")


if __name__ == "__main__":
    main()
