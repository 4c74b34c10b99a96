"""Exact top-k retrieval throughput of umtune's memory vs a flat exact search in faiss-cpu
(IndexFlatIP) on the same normalized vectors and threads, at 16,384 and 1,000,000 entries;
prints queries/s and the ratio umtune / faiss (target >= 1.0), and checks that both return the
same top-k entries.

    .venv/bin/pip install faiss-cpu==1.15.1
    .venv/bin/python bench/memory_retrieval.py [--queries 64] [--k 16] [--dim 128]
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent


def normalized(n, d, gen):
    x = torch.randn(n, d, generator=gen)
    return x / x.norm(dim=1, keepdim=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--entries", default="16384,1000000")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--umtune", type=Path, default=ROOT / "target" / "release" / "umtune")
    args = p.parse_args()
    import faiss
    faiss.omp_set_num_threads(args.threads)
    print(f"exact top-{args.k}, {args.queries} queries per batch, dim {args.dim}, {args.threads} threads, "
          f"faiss {faiss.__version__}")
    print(f"{'entries':>10} {'umtune q/s':>12} {'faiss q/s':>12} {'ratio':>7} {'same top-k':>11}")
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.entries.split(",")]:
            keys, queries = normalized(n, args.dim, gen), normalized(args.queries, args.dim, gen)
            vectors, out = Path(tmp) / "vectors.safetensors", Path(tmp) / "slots.safetensors"
            save_file({"keys": keys, "queries": queries}, str(vectors))
            res = subprocess.run([str(args.umtune), "bench-memory", "--vectors", str(vectors), "--k", str(args.k),
                                  "--iters", str(args.iters), "--threads", str(args.threads), "--out", str(out)],
                                 check=True, capture_output=True, text=True)
            ours = json.loads(res.stdout.strip().splitlines()[-1])
            index = faiss.IndexFlatIP(args.dim)
            index.add(keys.numpy())
            q = queries.numpy()
            index.search(q, args.k)  # warm-up
            times = []
            for _ in range(args.iters):
                start = time.perf_counter()
                _, ids = index.search(q, args.k)
                times.append(time.perf_counter() - start)
            theirs = args.queries / statistics.median(times)
            slots = load_file(str(out))["slots"].numpy()
            same = float(np.mean([set(a) == set(b) for a, b in zip(slots, ids)]))
            print(f"{n:>10} {ours['queries_per_s']:>12.0f} {theirs:>12.0f} {ours['queries_per_s'] / theirs:>7.2f} {same:>11.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
