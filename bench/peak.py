"""Runs an umtune command and reads its resident high-water mark (VmHWM) from /proc while it
runs: the helper the memory benchmarks share."""
import json
import os
import subprocess
import time


def measure(cmd, fixed_mmap_threshold=True):
    """`cmd`'s last stdout line as JSON, with `peak_bytes`. With `fixed_mmap_threshold`, glibc gets
    a fixed mmap threshold: freed large blocks go back to the system, so the high-water mark
    follows the live tensors rather than the allocator's caching (steps are slower then)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if fixed_mmap_threshold else dict(os.environ)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        try:
            for line in open(f"/proc/{proc.pid}/status"):
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_bytes"] = peak
    return result
