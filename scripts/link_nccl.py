"""Adds `libnccl.so` next to the `libnccl.so.2` of pip's nvidia-nccl wheel.

cudarc's dynamic loader asks for `libnccl.so` (or `libnccl.so.<cuda major>`), never `.so.2`; the
build script puts this directory on the binaries' rpath, so the link is all that is missing.
"""
import os
import sys
import sysconfig
from pathlib import Path

lib = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "nccl" / "lib"
versioned = lib / "libnccl.so.2"
if not versioned.exists():
    print(f"no {versioned}: NCCL will be reported as not loadable", file=sys.stderr)
    sys.exit(0)
link = lib / "libnccl.so"
if not link.exists():
    os.symlink("libnccl.so.2", link)
print(f"nccl: {link} -> libnccl.so.2")
