"""The sharded memory's read on CPU: the two-stage read (candidates to their owners, then only the
winners' rows) against the all-gathering read it replaced, same shards and queries, W ranks
started by torchrun in this run. Prints the slowest rank's median latency of each, the ratio
(target <= 0.5 at W = 4), the bytes rank 0 received per read as the CPU ring counted them, and
both formulas projected to cluster sizes (target: <= 5 MB per rank at W = 64, B = 512, k = 16,
d_v = 4096, d_k = 128).

    .venv/bin/python bench/memory_read.py [--ranks 2,4] [--queries 64] [--d-value 576] [--iters 10]
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def two_stage_bytes(w, b, k, d_k, d_v):
    """Upper bound of what a rank receives per read, every rank holding b queries (the formula
    of src/memory/read.rs with its winners spread evenly: b k / W from each shard)."""
    big_b = w * b
    queries = (w - 1) * 24 + (big_b - b) * (4 * d_k + 8)
    candidates = (w - 1) * (16 + 8 * b * k)
    requests = (w - 1) * 16 + 8 * b * k * (w - 1) / w
    rows = (w - 1) * 16 + 4 * (d_k + d_v + 2) * b * k * (w - 1) / w
    return queries + candidates + requests + rows


def gathering_bytes(w, b, k, d_k, d_v):
    """What the all-gathering read moved: the queries and ids, then five result tensors of every
    rank's B k entries (the issue's `4 B d_k + 8 B + W B k (4 (d_v + d_k) + 20)`)."""
    big_b = w * b
    return 4 * big_b * d_k + 8 * big_b + w * big_b * k * (4 * (d_v + d_k) + 20) * (w - 1) / w


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--capacity", type=int, default=16384)
    p.add_argument("--queries", type=int, default=64, help="per rank")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--d-key", type=int, default=128)
    p.add_argument("--d-value", type=int, default=576, help="SmolLM2-135M's hidden size")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--umtune", type=Path, default=ROOT / "target" / "release" / "umtune")
    a = p.parse_args()
    print(f"memory read on CPU, {os.cpu_count()} cores: capacity {a.capacity}, {a.queries} "
          f"queries per rank, k {a.k}, d_k {a.d_key}, d_v {a.d_value}; median of {a.iters}, "
          f"slowest rank")
    print(f"{'ranks':>5} {'two-stage ms':>13} {'gathering ms':>13} {'ratio':>6} "
          f"{'two-stage KB':>13} {'gathering KB':>13}")
    for ranks in [int(r) for r in a.ranks.split(",")]:
        cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(ranks), "--no-python",
               str(a.umtune), "bench-memory-read", "--capacity", str(a.capacity),
               "--queries", str(a.queries), "--k", str(a.k), "--d-key", str(a.d_key),
               "--d-value", str(a.d_value), "--iters", str(a.iters)]
        out = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        r = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")][0]
        new, old = r["two_stage_secs"], r["gathering_secs"]
        print(f"{ranks:>5} {new * 1e3:>13.2f} {old * 1e3:>13.2f} {new / old:>6.2f} "
              f"{r['two_stage_bytes_rank0'] / 1e3:>13.1f} {r['gathering_bytes_rank0'] / 1e3:>13.1f}",
              flush=True)
    print("\nprojected bytes received per rank and read, B = 512 queries in all, k = 16, "
          "d_k = 128, d_v = 4096 (LLaMA-3-8B)")
    print(f"{'W':>5} {'two-stage MB':>13} {'gathering MB':>13}")
    for w in [8, 64, 512]:
        b = 512 / w
        print(f"{w:>5} {two_stage_bytes(w, b, 16, 128, 4096) / 1e6:>13.2f} "
              f"{gathering_bytes(w, b, 16, 128, 4096) / 1e6:>13.1f}")


if __name__ == "__main__":
    main()
