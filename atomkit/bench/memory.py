"""Memory measurement: a sampler of resident memory (CPU) or allocated memory (CUDA), with marked phases."""
from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from dataclasses import dataclass, field

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def release_memory() -> None:
    """Collect garbage and give freed heap back to the OS, so RSS reflects what is really held."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Give freed heap back to the OS (glibc ``malloc_trim``) and cached CUDA blocks back to the driver."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Phase:
    kind: str  # "load" or "run"
    label: str
    t0: float
    t1: float = 0.0
    before: int = 0  # memory when the phase began
    after: int = 0  # memory when it ended


@dataclass
class MemoryMonitor:
    """Samples memory every ``interval_s`` in a background thread; ``phase()`` marks spans to split peaks.

    On CUDA the sampled quantity is ``torch.cuda.memory_allocated`` (peaks come from
    ``max_memory_allocated`` per phase); on CPU it is the process RSS.
    """

    device: str = "cpu"
    interval_s: float = 0.005
    samples: list[tuple[float, int]] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)

    def now(self) -> int:
        if self.device.startswith("cuda"):
            return torch.cuda.memory_allocated()
        return rss_bytes()

    def __enter__(self) -> "MemoryMonitor":
        self._stop = threading.Event()
        self.start = self.now()
        self._thread = threading.Thread(target=self._loop, name="atomkit-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.now()))
            time.sleep(self.interval_s)

    def phase(self, kind: str, label: str):
        monitor = self

        class _Ctx:
            def __enter__(self_inner):
                if monitor.device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self_inner.p = Phase(kind, label, time.perf_counter(), before=monitor.now())
                return self_inner.p

            def __exit__(self_inner, *exc):
                p = self_inner.p
                if monitor.device.startswith("cuda"):
                    torch.cuda.synchronize()
                    monitor.samples.append((time.perf_counter(), torch.cuda.max_memory_allocated()))
                p.t1, p.after = time.perf_counter(), monitor.now()
                monitor.samples.append((p.t1, p.after))
                monitor.phases.append(p)

        return _Ctx()

    def peak(self, t0: float | None = None, t1: float | None = None) -> int:
        vals = [m for t, m in self.samples if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
        return max(vals, default=self.now())

    def split(self) -> dict:
        """Peak memory over the run, split as the paper's Table 4 (MiB, relative to the start).

        - ``loading_temporary``: the most any load rose above what it left resident afterwards;
        - ``activations``: the most any inference phase rose above its starting level (inputs included);
        - ``peak``: the highest level over the whole run, minus the level at the start.
        """
        mib = 1 / 2**20
        load = [self.peak(p.t0, p.t1) - p.after for p in self.phases if p.kind == "load"]
        run = [self.peak(p.t0, p.t1) - p.before for p in self.phases if p.kind == "run"]
        return {
            "peak_mib": round((self.peak() - self.start) * mib, 1),
            "loading_temporary_mib": round(max(load, default=0) * mib, 1),
            "activations_mib": round(max(run, default=0) * mib, 1),
        }
