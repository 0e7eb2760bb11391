"""The record every result file carries: the command that made it, the commit, the date and the machine.

``with_record(result)`` adds it under ``"record"``; benchmark commands call it when they write their JSON, so a
result without its record cannot be written by atomkit."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> dict:
    """What ran it: CPU model and cores, memory, OS, Python, torch and the GPU (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def record(argv: list[str] | None = None) -> dict:
    """This run's record: ``atomkit ARGS`` as typed (or the Python command line), the commit (with ``+dirty`` when
    the tree had uncommitted changes), the UTC date and the machine."""
    argv = sys.argv if argv is None else argv
    prog = Path(argv[0]).name if argv else ""
    command = ("atomkit " + shlex.join(argv[1:])) if prog in ("atomkit", "__main__.py", "-m") or "atomkit" in prog \
        else shlex.join(argv)
    commit = _git("rev-parse", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"command": command, "commit": commit, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine()}


def with_record(result: dict, argv: list[str] | None = None) -> dict:
    """``result`` with its record under ``"record"`` (first, so a reader sees it first)."""
    return {"record": record(argv), **{k: v for k, v in result.items() if k != "record"}}
