"""CPU all-reduce bus bandwidth on loopback: umtune's TCP ring vs torch.distributed with gloo,
same f32 buffers (1 MB to 256 MB), same ranks (2 and 4), both started by torchrun in this run;
prints bus GB/s (2(W-1)/W * bytes / time, as nccl-tests count it) and the ratio umtune / gloo
(target >= 1.0).

    .venv/bin/python bench/allreduce.py [--sizes-mb 1,16,64,256] [--ranks 2,4] [--iters 5]
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

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")

GLOO = r'''
import json, os, statistics, sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
torch.set_num_threads(1)
w, sizes, iters = dist.get_world_size(), [int(x) for x in sys.argv[1].split(",")], int(sys.argv[2])
for mb in sizes:
    t = torch.ones((mb << 20) // 4)
    dist.all_reduce(t)
    times = []
    for _ in range(iters):
        dist.barrier()
        s = time.perf_counter(); dist.all_reduce(t); times.append(time.perf_counter() - s)
    secs = statistics.median(times)
    if dist.get_rank() == 0:
        print(json.dumps({"backend": "gloo", "world_size": w, "mb": mb, "secs": secs,
                          "bus_gbps": 2 * (w - 1) / w * (mb << 20) / secs / 1e9}), flush=True)
dist.destroy_process_group()
'''


def torchrun(ranks, cmd):
    out = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", str(ranks), *cmd],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return {r["mb"]: r for r in (json.loads(l) for l in out.stdout.splitlines() if l.startswith("{"))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes-mb", default="1,16,64,256")
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--umtune", type=Path, default=ROOT / "target" / "release" / "umtune")
    a = p.parse_args()
    print(f"all-reduce of f32 buffers on loopback, {os.cpu_count()} cores, median of {a.iters}")
    print(f"{'ranks':>5} {'MB':>5} {'umtune GB/s':>12} {'gloo GB/s':>10} {'ratio':>6}")
    with tempfile.NamedTemporaryFile("w", suffix=".py") as script:
        script.write(GLOO)
        script.flush()
        for ranks in [int(r) for r in a.ranks.split(",")]:
            ours = torchrun(ranks, ["--no-python", str(a.umtune), "bench-collective",
                                    "--sizes-mb", a.sizes_mb, "--iters", str(a.iters)])
            gloo = torchrun(ranks, [script.name, a.sizes_mb, str(a.iters)])
            for mb in [int(x) for x in a.sizes_mb.split(",")]:
                u, g = ours[mb]["bus_gbps"], gloo[mb]["bus_gbps"]
                print(f"{ranks:>5} {mb:>5} {u:>12.2f} {g:>10.2f} {u / g:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
