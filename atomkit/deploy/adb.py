"""Android phones over adb: discovery, device facts, file transfer, and timing ExecuTorch `.pte` programs
with a runner binary on the phone (see docs/phones.md for building the runner).

`adb()` is the only place that runs the adb binary (``$ATOMKIT_ADB``, else ``adb`` on PATH).

Runner output contract (any line, anywhere in stdout or stderr, so log prefixes are fine)::

    atomkit-time load_ms=12.3     # Program::load + load_method, once per process
    atomkit-time run_ms=4.5       # one execution of the method, once per execution

The stock ExecuTorch runners (``executor_runner``, ``xnn_executor_runner``) are understood too; their
ET_LOG lines (``I 00:00:00.001234 executorch:executor_runner.cpp:NNN] <message>``, on stderr with the
posix PAL) carry ``Model loaded in X ms.`` and ``Iteration i of N: X ms`` (recent releases) and
``Model executed successfully N time(s) in X ms.`` (every release). A load-only run is
``--num_executions=0``. Where a runner prints no load time, the load sample is the host's wall time of
the whole ``adb shell`` call (adb round trip + process start + load); where it prints no per-execution
times, every sample is a separate process (see `bench_pte`). ``source`` in the result says which.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from atomkit.errors import AtomkitError

log = logging.getLogger(__name__)

DEFAULT_WORKDIR = "/data/local/tmp/atomkit"
THERMAL_STATUS = ("none", "light", "moderate", "severe", "critical", "emergency", "shutdown")
_INSTALL_HINT = ("Install the Android SDK platform-tools (https://developer.android.com/tools/releases/platform-tools, "
                 "or `apt install adb`, `brew install android-platform-tools`) and put `adb` on PATH, "
                 "or set ATOMKIT_ADB to the adb binary.")


class DeviceError(AtomkitError):
    """adb is missing, an adb command failed or timed out, or a phone run could not be measured."""

    def __init__(self, message: str, *, cmd: list[str] | None = None, returncode: int | None = None,
                 stderr: str = ""):
        self.cmd, self.returncode, self.stderr = cmd, returncode, stderr
        super().__init__(message)


def adb_binary() -> str:
    """The adb executable: ``$ATOMKIT_ADB`` if set, else ``adb`` found on PATH."""
    env = os.environ.get("ATOMKIT_ADB")
    if env:
        if shutil.which(env) is None:
            raise DeviceError(f"ATOMKIT_ADB={env!r} is not an executable file. {_INSTALL_HINT}")
        return env
    found = shutil.which("adb")
    if found is None:
        raise DeviceError(f"adb not found on PATH. {_INSTALL_HINT}")
    return found


def adb(*args: str, serial: str | None = None, timeout: float = 60, check: bool = True) -> str:
    """Run ``adb [-s serial] *args`` and return its stdout. Raises `DeviceError` when adb is missing, the
    command times out, or (with ``check``) it exits non-zero, naming the command, exit code and stderr."""
    cmd = [adb_binary(), *(["-s", serial] if serial else []), *map(str, args)]
    shown = shlex.join(cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    except OSError as e:  # not found, not executable
        raise DeviceError(f"cannot run {cmd[0]!r}: {e}. {_INSTALL_HINT}", cmd=cmd) from e
    except subprocess.TimeoutExpired as e:
        raise DeviceError(f"`{shown}` timed out after {timeout:g} s (is the phone connected and unlocked?)",
                          cmd=cmd) from e
    if check and proc.returncode != 0:
        err = (proc.stderr or "").strip() or (proc.stdout or "").strip()[-2000:]
        raise DeviceError(f"`{shown}` failed with exit code {proc.returncode}: {err or '(no output)'}",
                          cmd=cmd, returncode=proc.returncode, stderr=proc.stderr or "")
    return proc.stdout


def device_states() -> dict[str, str]:
    """Every attached device's serial and state (``device``, ``unauthorized``, ``offline``, ...)."""
    states = {}
    for line in adb("devices").splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith(("List of devices", "*")):
            states[parts[0]] = parts[1]
    return states


def list_devices() -> list[str]:
    """Serials of the phones ready for use (state ``device``); others are logged with what to do."""
    states = device_states()
    for serial, state in states.items():
        if state == "unauthorized":
            log.warning("%s is unauthorized: unlock the phone and accept the USB debugging prompt", serial)
        elif state != "device":
            log.warning("%s is %s: reconnect it, or run `adb kill-server`", serial, state)
    return [s for s, st in states.items() if st == "device"]


def shell(cmd: str, serial: str | None = None, *, timeout: float = 60, check: bool = True) -> str:
    """Run one shell command line on the phone and return its stdout."""
    return adb("shell", cmd, serial=serial, timeout=timeout, check=check)


def push(local: str | Path, remote: str, serial: str | None = None, *, timeout: float = 600) -> str:
    """Copy a host file to the phone (`adb push`); returns adb's summary line."""
    if not Path(local).exists():
        raise DeviceError(f"cannot push {local}: no such file")
    return adb("push", str(local), remote, serial=serial, timeout=timeout)


def pull(remote: str, local: str | Path, serial: str | None = None, *, timeout: float = 600) -> Path:
    """Copy a file from the phone to the host (`adb pull`), creating the local folder."""
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    adb("pull", remote, str(local), serial=serial, timeout=timeout)
    return Path(local)


def _getprops(serial: str | None) -> dict[str, str]:
    return dict(re.findall(r"^\[([^\]]+)\]: \[(.*)\]\s*$", shell("getprop", serial), re.M))


def _quiet(fn, *args):
    try:
        return fn(*args)
    except DeviceError as e:
        log.debug("device_info: %s", e)
        return None


def _ram_bytes(serial: str | None) -> int | None:
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", shell("cat /proc/meminfo", serial), re.M)
    return int(m.group(1)) * 1024 if m else None


def _thermal(serial: str | None) -> dict:
    out = _quiet(shell, "dumpsys thermalservice", serial) or ""
    m = re.search(r"Thermal Status:\s*(\d+)", out)
    status = int(m.group(1)) if m else None
    temps = [float(t) for t in re.findall(r"mValue=(-?[\d.]+)", out)]
    source = "dumpsys thermalservice"
    if not temps:
        zones = _quiet(shell, "cat /sys/class/thermal/thermal_zone*/temp 2>/dev/null", serial) or ""
        raw = [float(x) for x in re.findall(r"^\s*(-?\d+(?:\.\d+)?)\s*$", zones, re.M)]
        temps, source = [t / 1000 if abs(t) > 200 else t for t in raw], "thermal_zone*/temp"
    temps = [t for t in temps if -40 < t < 150]
    name = THERMAL_STATUS[status] if status is not None and status < len(THERMAL_STATUS) else None
    return {"status": status, "status_name": name, "max_temp_c": max(temps) if temps else None,
            "source": source if temps or status is not None else None}


def device_info(serial: str | None = None) -> dict:
    """Model, maker, SoC, Android version, SDK, ABI, RAM and thermal state; unknown fields are None."""
    p = _quiet(_getprops, serial) or {}

    def first(*keys):
        return next((p[k] for k in keys if p.get(k)), None)

    sdk = first("ro.build.version.sdk")
    return {
        "serial": serial, "model": first("ro.product.model"), "manufacturer": first("ro.product.manufacturer"),
        "soc": first("ro.soc.model", "ro.board.platform", "ro.hardware"),
        "soc_manufacturer": first("ro.soc.manufacturer"),
        "android": first("ro.build.version.release"), "sdk": int(sdk) if sdk and sdk.isdigit() else None,
        "abi": first("ro.product.cpu.abi"), "ram_bytes": _quiet(_ram_bytes, serial), "thermal": _thermal(serial),
    }


# --- runner output ------------------------------------------------------------------------------------
_NUM = r"(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
_CONTRACT = re.compile(rf"atomkit-time\s+(load_ms|run_ms)={_NUM}")
_STOCK_LOAD = re.compile(rf"Model loaded in {_NUM} ms")
_STOCK_ITER = re.compile(rf"Iteration (\d+) of (\d+): {_NUM} ms")
_STOCK_TOTAL = re.compile(rf"Model executed successfully (\d+) time\(s\) in {_NUM} ms")


@dataclass
class RunnerTimes:
    """What one runner process printed about time (milliseconds); ``format`` is atomkit, stock or None."""
    load_ms: float | None = None
    run_ms: list[float] = field(default_factory=list)
    total_ms: float | None = None
    total_runs: int | None = None
    format: str | None = None


def parse_runner_output(text: str) -> RunnerTimes:
    """Timings from a runner's output: the atomkit contract lines if any are present, else the stock
    ExecuTorch runner's log lines."""
    t = RunnerTimes()
    contract = _CONTRACT.findall(text)
    if contract:
        t.format = "atomkit"
        for key, val in contract:
            if key == "load_ms":
                t.load_ms = float(val)
            else:
                t.run_ms.append(float(val))
        return t
    if m := _STOCK_LOAD.search(text):
        t.load_ms = float(m.group(1))
    t.run_ms = [float(v) for _, _, v in _STOCK_ITER.findall(text)]
    if m := _STOCK_TOTAL.search(text):
        t.total_runs, t.total_ms = int(m.group(1)), float(m.group(2))
    if t.load_ms is not None or t.run_ms or t.total_ms is not None:
        t.format = "stock"
    return t


# --- benchmarking ---------------------------------------------------------------------------------------
def resolve_runner(runner: str | Path | None = None) -> Path:
    """The runner binary: the argument, else ``$ATOMKIT_RUNNER``; it has to exist on this machine."""
    path = runner or os.environ.get("ATOMKIT_RUNNER")
    if not path:
        raise DeviceError("no ExecuTorch runner given: pass --runner PATH or set ATOMKIT_RUNNER to an Android "
                          "arm64-v8a executor_runner / xnn_executor_runner build (see docs/phones.md)")
    if not Path(path).is_file():
        raise DeviceError(f"runner {path} does not exist; build it as docs/phones.md describes")
    return Path(path)


def timing_summary(samples_s: list[float], source: str) -> dict:
    """Seconds as the phone benchmark reports them: raw samples, median, total, and where they were measured."""
    xs = [round(x, 7) for x in samples_s]
    return {"samples": xs, "median": round(statistics.median(xs), 7) if xs else None,
            "total": round(sum(xs), 7), "source": source}


def _run_runner(serial, workdir: str, runner: str, program: str, executions: int, args: tuple,
                timeout: float) -> tuple[RunnerTimes, float, str]:
    """One fresh runner process on the phone; returns parsed times, host wall seconds and the output."""
    line = (f"cd {shlex.quote(workdir)} && LD_LIBRARY_PATH={shlex.quote(workdir)} ./{shlex.quote(runner)} "
            f"--model_path={shlex.quote(program)} --num_executions={executions} "
            + " ".join(shlex.quote(a) for a in args) + " 2>&1; echo atomkit-rc=$?")
    t0 = time.perf_counter()
    out = shell(line, serial, timeout=timeout)
    wall = time.perf_counter() - t0
    m = re.search(r"atomkit-rc=(\d+)\s*$", out)
    if m is None or m.group(1) != "0":
        raise DeviceError(f"runner failed on the phone (`{line}`, exit code {m.group(1) if m else '?'}):\n"
                          f"{out.strip()[-3000:]}", returncode=int(m.group(1)) if m else None, stderr=out)
    return parse_runner_output(out), wall, out


def bench_pte(serial: str | None, pte_paths: dict[str, Path], runner: str | Path | None = None, *,
              warmup: int = 2, repeats: int = 10, loads: int = 5, workdir: str = DEFAULT_WORKDIR,
              runner_args: tuple[str, ...] = (), timeout: float = 600) -> dict:
    """Time ExecuTorch programs on a phone with a runner binary; seconds, in the host benchmark's schema.

    Per program: ``loads`` fresh load-only processes (``--num_executions=0``), the median is the cold
    load; then one process with ``warmup + repeats`` executions whose first ``warmup`` are dropped. If
    the runner prints no per-execution times, ``warmup`` throw-away processes and then ``repeats``
    processes of one execution each are timed instead (the runner's total for its single execution, or,
    when it prints nothing, the host's wall time of the call, which includes adb, process start and load).
    """
    if repeats < 1 or loads < 0 or warmup < 0:
        raise ValueError("repeats must be >= 1, loads and warmup >= 0")
    runner = resolve_runner(runner)
    for name, path in pte_paths.items():
        if not Path(path).is_file():
            raise DeviceError(f"program {name!r}: {path} does not exist")
    info = device_info(serial)
    shell(f"mkdir -p {shlex.quote(workdir)}", serial)
    push(runner, f"{workdir}/{runner.name}", serial)
    shell(f"chmod 755 {shlex.quote(workdir + '/' + runner.name)}", serial)
    overhead = []
    for _ in range(3):  # the cost of an empty `adb shell`, to read the host_wall numbers against
        t0 = time.perf_counter()
        shell("true", serial)
        overhead.append(time.perf_counter() - t0)

    def run(program: str, n: int):
        return _run_runner(serial, workdir, runner.name, program, n, tuple(runner_args), timeout)

    components, load, formats, remotes = {}, {}, {}, set()
    for i, (name, path) in enumerate(pte_paths.items()):
        remote = re.sub(r"[^\w.-]", "_", name) + ".pte"
        remote = remote if remote not in remotes else f"{i}_{remote}"  # "a/b" and "a_b" both -> a_b.pte
        remotes.add(remote)
        push(path, f"{workdir}/{remote}", serial)
        samples, source = [], "runner"
        for _ in range(loads):
            times, wall, _ = run(remote, 0)
            if times.load_ms is None:
                source = "host_wall"
            samples.append(times.load_ms / 1e3 if times.load_ms is not None else wall)
        load[name] = timing_summary(samples, source)
        times, _, _ = run(remote, warmup + repeats)
        formats[name] = times.format
        if len(times.run_ms) >= warmup + repeats:
            components[name] = timing_summary([x / 1e3 for x in times.run_ms[warmup:warmup + repeats]], "runner")
            continue
        log.info("%s: runner printed no per-execution times; timing one process per sample", name)
        for _ in range(warmup):
            run(remote, 1)
        samples, source = [], "runner_process"
        for _ in range(repeats):
            times, wall, _ = run(remote, 1)
            if times.run_ms:
                samples.append(times.run_ms[-1] / 1e3)
            elif times.total_ms is not None and times.total_runs == 1:
                samples.append(times.total_ms / 1e3)
            else:
                samples.append(wall)
                source = "host_wall"
        components[name] = timing_summary(samples, source)
    return {"device": info, "components": components, "load": load,
            "meta": {"runner": str(runner), "workdir": workdir, "warmup": warmup, "repeats": repeats,
                     "loads": loads, "runner_output_format": formats, "unit": "s",
                     "adb_shell_overhead": timing_summary(overhead, "host_wall")}}
