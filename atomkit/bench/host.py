"""What the machine did during a benchmark: steal time, garbage collection, CPU time per path, and how fast its
storage reads the weight files (the floor a model load is compared with); the host's description for the JSON."""
from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Sequence

import torch

from atomkit.bench.record import machine
from atomkit.decode.llama import native_bf16
from atomkit.deploy.loads import drop_page_cache


def cpu_steal_s() -> float:
    """Seconds of steal time on this machine so far (Linux /proc/stat; 0 where unavailable)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class GcTimer:
    """Seconds the garbage collector ran, and how many collections, while the ``with`` block ran."""

    def __init__(self):
        self.seconds, self.collections, self._t0 = 0.0, 0, 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0
            self.collections += 1

    def __enter__(self) -> "GcTimer":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)


def host_info(device: str) -> dict:
    """The machine the benchmark ran on (``atomkit.bench.record.machine``) with what the benchmark ran it with:
    torch threads, the device, and whether the CPU multiplies bf16 natively (how int4, ``auto`` on a CPU,
    prefills: bf16 copies or fp32)."""
    info = machine()
    info.update({"torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
                 "cuda": info.get("gpu"), "cpu_native_bf16": native_bf16()})
    return info


def cpu_summary(cpu: dict[str, list[tuple[float, float]]]) -> dict:
    """Medians of the per-run CPU and wall seconds of each path, their CPU ratio (reuse / no_reuse) and, with more
    than one repeat, the paired ratio of each repeat."""
    out = {name: {"cpu_s": round(statistics.median(c for c, _ in xs), 4),
                  "wall_s": round(statistics.median(w for _, w in xs), 4),
                  "samples": [round(c, 4) for c, _ in xs]} for name, xs in cpu.items()}
    out["ratio"] = round(out["reuse"]["cpu_s"] / out["no_reuse"]["cpu_s"], 4) if out["no_reuse"]["cpu_s"] else None
    if len(cpu["reuse"]) > 1:
        out["ratio_per_run"] = [round(a / b, 4) if b else None
                                for (a, _), (b, _) in zip(cpu["reuse"], cpu["no_reuse"])]
    return out


def read_floor(files: Sequence[str], cold: bool, repeats: int = 3) -> dict:
    """Seconds to read ``files`` once, sequentially (16 MiB reads), median of ``repeats``: from the page cache, or
    from storage with ``cold`` (the cache dropped before each read)."""
    samples, size = [], 0
    for _ in range(repeats):
        if cold:
            drop_page_cache()
        else:
            _read(files)  # in the page cache, as the warm loads find it
        t0 = time.perf_counter()
        size = _read(files)
        samples.append(time.perf_counter() - t0)
    t = statistics.median(samples)
    return {"mib": round(size / 2**20, 1), "read_s": round(t, 4), "mib_per_s": round(size / 2**20 / t, 1) if t else None,
            "samples_s": [round(x, 4) for x in samples]}


def _read(files: Sequence[str]) -> int:
    n = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(16 << 20):
                n += len(chunk)
    return n


def load_floors(recs: dict, cold: bool) -> dict:
    """Per module: its weight files, their read floor, the median load of each path and load / floor."""
    out = {}
    modules = {m: files for rs in recs.values() for rec in rs for m, files in rec.files.items()}
    for m, files in modules.items():
        if not files:
            continue
        floor = read_floor(files, cold)
        loads = {name: statistics.median([x for rec in rs for x in rec.loads_by_module.get(m, [])])
                 for name, rs in recs.items() if any(rec.loads_by_module.get(m) for rec in rs)}
        out[m] = {"files": list(files), **floor, "load_s": {k: round(v, 4) for k, v in loads.items()},
                  "load_vs_floor": {k: round(v / floor["read_s"], 2) for k, v in loads.items()}}
    return out
