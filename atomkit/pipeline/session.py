"""Session: the resident modules of one model spec, loaded once on first use and reused by every
subtask and prompt until ``close()`` (ATOM's persistent module reuse)."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from atomkit.config import DecodeConfig, WindowConfig
from atomkit.errors import AtomkitError, SessionClosed
from atomkit.models.registry import ALL_MODULES, MODULES, LoadOptions, available_models, get_spec


def default_device() -> str:
    """CUDA when present, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str | None:
    """``device`` if atomkit can run there ("cpu", "cuda", "cuda:N"), else an InputError that says so."""
    import re

    from atomkit.errors import InputError

    if device is None:
        return None
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise InputError(f"unknown device {device!r}: use cpu or cuda (cuda:N for another GPU)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but torch sees no CUDA GPU here: use --device cpu")
    return device


def module_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(parameter count, bytes held by parameters and buffers) of a module; quantized weights count
    their real storage, tied weights count once, and a decoder's built engines count what they hold beyond
    its weights (packed weights, bf16 prefill copies)."""
    from atomkit.deploy.quant import weight_bytes

    params = sum(p.numel() for p in module.parameters())
    engine = getattr(module, "engine_bytes", None)
    return params, weight_bytes(module)["total"] + (engine() if engine else 0)


def weight_files(module, backend: str | None = None) -> list[Path]:
    """The weight files a loaded module was read from (``module.weight_files``, set by its loader), an encoder's
    detector graph and, for a decoder, the engine store file its ``backend`` was read from."""
    files = [Path(f) for f in getattr(module, "weight_files", ())]
    if getattr(module, "detector", None) is not None:
        files.append(Path(module.detector.graph))
    if backend is not None and hasattr(module, "engine"):
        stored = getattr(getattr(module.engine(backend), "stepper", None), "loaded_from", None)
        files += [Path(stored)] if stored else []
    return files


@dataclass
class LoadStats:
    """How one module was loaded: wall time, size, and how many times it was loaded."""

    module: str
    seconds: float
    params: int
    bytes: int
    loads: int = 1
    source: str = "eager"  # "eager", or the .pte program it runs
    prepare_seconds: float = 0.0  # of ``seconds``: readying the runtime after the read (the decode engine)
    files: tuple[str, ...] = ()  # the weight files the load read (the engine store's too): what its read floor reads

    def to_dict(self) -> dict:
        return asdict(self)


def spec_window(spec, window: WindowConfig | None) -> WindowConfig:
    """``window`` with the model's own frame count and size (``ModelSpec.window``, e.g. SmolVLM2's 512 px) in
    the fields left at ``WindowConfig``'s defaults."""
    window = window or WindowConfig()
    own = {k: v for k, v in (spec.window or {}).items() if getattr(window, k) == getattr(WindowConfig, k)}
    return dataclasses.replace(window, **own) if own else window


class Session:
    """The encoder, decoder and embedder of one model spec, resident and shared.

    Modules load lazily on first use and stay loaded. Loading is guarded per module, so several
    threads may ask for the same module at once and it still loads exactly once. Each module also
    has a run lock (``use``): calls into one module are serialised, calls into different modules
    (the encoder for clip i+1 while the decoder captions clip i) run concurrently.

    ``close()`` may be called while other threads use the session: it marks the session closed first,
    so every ``get``/``use`` that starts afterwards raises ``SessionClosed``; then it waits for the calls
    already in flight (a load, a ``use`` block) to finish, and only then drops the modules. No module is
    ever loaded into a closed session. A task that is between two module calls when ``close()`` begins
    (caption: encoded, not yet decoded) raises ``SessionClosed`` at its next call.

    Example:
        >>> with atomkit.Session("default") as s:            # doctest: +SKIP
        ...     caps = s.caption(["data/videos"])
        ...     hits = s.retrieve(caps, "a dog jumps", k=3)
        ...     s.load_report()["decoder"]["loads"]
        1
    """

    def __init__(self, model: str = "default", *, device: str | None = None, weights: str | Path | None = None,
                 random_weights: bool = False, cache: str | Path | None = None,
                 decode: DecodeConfig | None = None, window: WindowConfig | None = None, quant: str = "none",
                 programs: str | Path | None = None, memory_budget_mib: float | None = None):
        from atomkit.deploy.quant import _check_scheme

        _check_scheme(quant)
        self.quant = quant  # torchao scheme applied to every module after it loads (see atomkit.deploy.quant)
        self.spec = get_spec(model)
        # ExecuTorch programs from `atomkit export`: a module with DIR/<module>.pte runs that program
        self.programs = _check_programs(Path(programs), self.spec.name, quant) if programs else None
        self.options = LoadOptions(device=check_device(device) or default_device(),
                                   weights=Path(weights) if weights else None,
                                   random_weights=random_weights,
                                   cache=Path(cache) if cache else None)
        if memory_budget_mib is not None and not memory_budget_mib > 0:
            from atomkit.errors import InputError

            raise InputError(f"the memory budget must be a number of MiB > 0, got {memory_budget_mib}")
        # resident modules may not exceed this (atomkit.pipeline.budget): a module that would is refused before it loads
        self.memory_budget_mib = memory_budget_mib
        self.decode = decode or DecodeConfig()
        self.window = spec_window(self.spec, window)
        self._device_arg, self._programs_arg = device, str(programs) if programs else None
        self.stats: dict[str, LoadStats] = {}
        self._modules: dict[str, torch.nn.Module] = {}
        self._load_locks = {m: threading.Lock() for m in self.spec.modules}
        self._run_locks = {m: threading.RLock() for m in self.spec.modules}
        self._closed = False
        self._calls = threading.Condition()  # guards _closed and _in_flight; close() waits on it
        self._in_flight: dict[int, int] = {}  # thread id -> calls (get / use) it has in flight

    def settings(self) -> dict:
        """The keyword arguments that build an equivalent session elsewhere (a Ray worker): same model, weights,
        quantization, programs, decode and window settings; the device is chosen there unless it was given."""
        o = self.options
        return {"model": self.model, "device": self._device_arg, "weights": str(o.weights) if o.weights else None,
                "random_weights": o.random_weights, "cache": str(o.cache) if o.cache else None,
                "decode": self.decode, "window": self.window, "quant": self.quant, "programs": self._programs_arg,
                "memory_budget_mib": self.memory_budget_mib}

    # -- modules -----------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.spec.name

    @property
    def random_weights(self) -> bool:
        return self.spec.is_random(self.options)

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """One call in flight: refused once ``close()`` began, waited for by ``close()`` while it runs."""
        me = threading.get_ident()
        with self._calls:
            if self._closed:
                raise SessionClosed(self.model)
            self._in_flight[me] = self._in_flight.get(me, 0) + 1
        try:
            yield
        finally:
            with self._calls:
                self._in_flight[me] -= 1
                if not self._in_flight[me]:
                    del self._in_flight[me]
                self._calls.notify_all()

    def get(self, module: str) -> torch.nn.Module:
        """The resident module, loading it first if this is its first use."""
        if module not in self._load_locks:
            raise ValueError(f"unknown module {module!r}; {self.model}'s modules are {self.spec.modules}")
        with self._call():
            loaded = self._modules.get(module)
            if loaded is not None:
                return loaded
            with self._load_locks[module]:
                if module not in self._modules:
                    self._load(module)
            return self._modules[module]

    def _load(self, module: str) -> None:
        """Load ``module`` into the session (the caller holds its load lock and counts as a call in flight)."""
        from atomkit.pipeline.budget import check

        check(self, module)  # refused before anything is read when it would not fit the memory budget
        t0 = time.perf_counter()
        program = self.programs and self.programs.get(module)
        if program:
            from atomkit.deploy.runtime import open_program

            mod = open_program(program, module)
        else:
            mod = self.spec.load(module, self.options)
        if self.quant != "none" and not program:
            from atomkit.deploy.quant import quantize_module

            quantize_module(mod, self.quant)
        t_read = time.perf_counter()
        if module == "decoder" and not program:
            # the decode engine (packed weights, steppers) is part of a resident decoder: build it
            # now, so loading costs what it costs and the first caption does not pay for it
            mod.engine(self.decode.backend)
            mod.keep_only_engine(self.decode.backend)  # int8/int4/bf16 engines hold their own matrices
        if self.options.device.startswith("cuda"):
            torch.cuda.synchronize()
        params, size = module_bytes(mod)
        prev = self.stats.get(module)
        if program:
            size = program.stat().st_size  # the program file holds the (possibly quantized) weights
        t1 = time.perf_counter()
        files = [program] if program else weight_files(mod, self.decode.backend if module == "decoder" else None)
        self.stats[module] = LoadStats(module, t1 - t0, params, size,
                                       loads=(prev.loads + 1) if prev else 1,
                                       source=program.name if program else "eager",
                                       prepare_seconds=t1 - t_read, files=tuple(map(str, files)))
        self._modules[module] = mod

    @contextlib.contextmanager
    def use(self, module: str) -> Iterator[torch.nn.Module]:
        """Hold the module's run lock while calling into it (``close()`` waits for the block to end)."""
        with self._call():
            mod = self.get(module)
            with self._run_locks[module]:
                yield mod

    @property
    def encoder(self):
        return self.get("encoder")

    @property
    def decoder(self):
        return self.get("decoder")

    @property
    def embedder(self):
        return self.get("embedder")

    def loaded(self) -> list[str]:
        return [m for m in ALL_MODULES if m in self._modules]

    def load_report(self) -> dict[str, dict]:
        """Per loaded module: seconds, params, bytes, loads (how many times it was loaded)."""
        return {m: s.to_dict() for m, s in self.stats.items()}

    def unload(self, module: str, *, collect: bool = True) -> None:
        """Drop one module (the reload baseline does this; a reused session never needs to). Waits for the
        module's loading and the ``use`` block in flight, if any."""
        with self._load_locks[module], self._run_locks[module]:
            self._modules.pop(module, None)
        if collect:
            _free_memory()

    def close(self) -> None:
        """Release every module (one garbage collection for all of them). The session cannot be used afterwards.

        Safe while other threads use the session: the session is marked closed first (calls that start now
        raise ``SessionClosed``), then the calls in flight on other threads finish, then the modules go. A
        call of the closing thread itself (close inside a ``use`` block) is not waited for. Closing twice is
        harmless."""
        me = threading.get_ident()
        with self._calls:
            self._closed = True
            self._calls.wait_for(lambda: not (set(self._in_flight) - {me}))
        for m in list(self._modules):
            self.unload(m, collect=False)
        _free_memory()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        progs = f", programs={sorted(self.programs)}" if self.programs else ""
        return (f"Session(model={self.model!r}, device={self.options.device!r}, quant={self.quant!r}{progs}, "
                f"loaded={self.loaded()})")

    # -- tasks (thin conveniences over atomkit.pipeline.tasks) -----------------------------------------------
    def caption(self, paths, **kwargs):
        from atomkit.pipeline.tasks import caption

        return caption(self, paths, **kwargs)

    def retrieve(self, source, query: str, **kwargs):
        from atomkit.pipeline.tasks import retrieve

        return retrieve(self, source, query, **kwargs)

    def assemble(self, source, prompt: str, out_dir, **kwargs):
        from atomkit.pipeline.tasks import assemble

        return assemble(self, source, prompt, out_dir, **kwargs)


def _check_programs(folder: Path, model: str, quant: str) -> dict[str, Path]:
    """module -> program path of an `atomkit export` folder, checked against the session's model."""
    import json

    if quant != "none":
        raise AtomkitError("quant= applies to eager modules; exported programs carry their own quantization "
                           "(choose it at `atomkit export --quant`)")
    if not folder.is_dir():
        raise AtomkitError(f"{folder}: no such folder of .pte programs; create one with "
                           f"`atomkit export --models {model} --out {folder}`")
    found = {m: folder / f"{m}.pte" for m in ALL_MODULES if (folder / f"{m}.pte").exists()}
    if not found:
        raise AtomkitError(f"{folder}: none of {', '.join(m + '.pte' for m in MODULES)} is there; "
                           f"run `atomkit export --models {model} --out {folder}`")
    for m, path in found.items():
        side = path.with_suffix(".json")
        exported = json.loads(side.read_text()).get("model") if side.exists() else None
        if exported in available_models() and exported != model:
            raise AtomkitError(f"{path} was exported from model {exported!r}, not {model!r}")
    return found


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
