"""Load times of the encoder as eager, TorchScript (the paper's deprecated PyTorch Mobile path, for comparison
only) and ``.pte``: load + first inference, each in a fresh Python process, optionally from a cold page cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from atomkit.io import atomic_path


def trace_encoder_torchscript(encoder, path, *, frames: int = 6, size: int = 224) -> Path:
    """torch.jit.trace of the encoder (deprecated PyTorch Mobile path), saved atomically."""
    x = torch.randn(frames, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(encoder.eval().cpu(), x, check_trace=False), str(tmp))
    return Path(path)


_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
kind, target, frames, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "eager":
    from atomkit.models.registry import LoadOptions, get_spec
elif kind == "pte":
    from atomkit.deploy.program import load_method
x = torch.randn(frames, 3, size, size)
def load():
    if kind == "eager":
        return get_spec(target).load("encoder", LoadOptions())
    if kind == "torchscript":
        return torch.jit.load(target)
    return load_method(target)
def run(m):
    if kind == "pte":
        return m.execute([x])
    with torch.inference_mode():
        return m(x)
t1 = time.perf_counter(); m = load(); t2 = time.perf_counter(); run(m); t3 = time.perf_counter()
res = dict(import_s=t1 - t0, first_load_s=t2 - t1, first_inference_s=t3 - t2)
t1 = time.perf_counter(); m = load(); t2 = time.perf_counter(); run(m); t3 = time.perf_counter()
res.update(warm_load_s=t2 - t1, warm_inference_s=t3 - t2)
t1 = time.perf_counter(); run(m); res["steady_inference_s"] = time.perf_counter() - t1
print("PROBE" + json.dumps(res))
"""


def drop_page_cache() -> str | None:
    """Drop the OS page cache (Linux, root) so the next file read comes from disk; None when done, else why not."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return None
    except OSError as e:
        return f"cannot drop the page cache ({e.strerror or e}); loads may be served from memory"


def load_times(pte: Path | None = None, torchscript: Path | None = None, eager: str | None = None, *,
               frames: int = 6, size: int = 224, timeout: float = 600, cold: bool = False) -> dict:
    """Encoder load + first inference, each kind in a fresh Python process.

    "first" = the first load in a new process; "warm" = a second load in the same process; "steady" =
    a third inference. With ``cold`` the OS page cache is dropped before each process (needs root on
    Linux), so the first load reads the file from disk; otherwise the file may already be in memory.
    ``eager`` is a registry spec name ("default").
    """
    out: dict = {"cold": False}
    for kind, target in (("eager", eager), ("torchscript", torchscript), ("pte", pte)):
        if target is None:
            continue
        if cold:
            why = drop_page_cache()
            out["cold"] = why is None
            if why:
                out["cold_note"] = why
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _PROBE, kind, str(target), str(frames), str(size)],
                              capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")), None)
        if proc.returncode != 0 or line is None:
            out[kind] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            continue
        res = {k: round(v, 4) for k, v in json.loads(line[5:]).items()}
        res["process_wall_s"] = round(wall, 3)
        if kind != "eager":
            res["file_bytes"] = Path(target).stat().st_size
        out[kind] = res
    return out
