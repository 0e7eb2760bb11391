"""What a module costs in memory before it is loaded, and a session's memory budget (the paper's concern:
a phone with 6-8 GB shared by the OS and apps).

A module's size is known without reading its weights: its architecture is built on the ``meta`` device
(shapes, no storage), quantized there with the session's torchao scheme, and the decoder's engine is
built there too, so the count covers what loading it would hold: float and quantized weights (tied
weights once) and the engine's packed weights and bf16 prefill copies. ``atomkit.pipeline.session.module_bytes``
counts a loaded module the same way; a test checks the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atomkit.errors import AtomkitError

MIB = 2 ** 20


class MemoryBudgetError(AtomkitError):
    """Loading a module would take the session's resident modules past its memory budget."""


@dataclass(frozen=True)
class Footprint:
    """Bytes a module would hold once loaded: its weights and, for a decoder, its decode engine's own."""

    module: str
    weights: int
    engine: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.engine


def footprint(spec, module: str, opts, *, quant: str = "none", backend: str = "auto") -> Footprint:
    """The resident size of ``module`` of ``spec`` loaded with ``opts``, quantized with ``quant`` and (decoder)
    decoding with ``backend``, from its architecture on the meta device; nothing is read or allocated."""
    from atomkit.deploy.quant import quantize_module, weight_bytes

    with torch.device("meta"):
        mod = spec.architecture(module, opts)
        if quant != "none":
            quantize_module(mod, quant)
        engine = 0
        if module == "decoder" and getattr(mod, "lm", None) is not None:
            engine = mod.stepper(backend)
            engine = engine.held_bytes() if engine is not None else 0
            mod.keep_only_engine(backend)  # as Session loads it
    return Footprint(module, weight_bytes(mod)["total"], engine)


def check(session, module: str) -> Footprint | None:
    """Raise ``MemoryBudgetError`` when loading ``module`` would take ``session`` past its memory budget: the error
    names the module, its size, what is resident, and the settings that would fit. A module that runs an
    ExecuTorch program counts its program file. Returns the footprint (None without a budget)."""
    budget = getattr(session, "memory_budget_mib", None)
    if budget is None:
        return None
    program = session.programs and session.programs.get(module)
    if program:
        need = Footprint(module, program.stat().st_size)
    else:
        need = footprint(session.spec, module, session.options, quant=session.quant, backend=session.decode.backend)
    resident = sum(s.bytes for m, s in session.stats.items() if m in session.loaded())
    if resident + need.total <= budget * MIB:
        return need
    left = budget * MIB - resident
    fits = [] if program else _alternatives(session, module, left)
    raise MemoryBudgetError(
        f"loading the {module} of {session.model!r} needs {need.total / MIB:.0f} MiB "
        + (f"({need.weights / MIB:.0f} MiB weights + {need.engine / MIB:.0f} MiB decode engine) " if need.engine else "")
        + f"but the memory budget is {budget:g} MiB with {resident / MIB:.0f} MiB resident "
        + f"({', '.join(session.loaded()) or 'nothing'}); "
        + (f"what would fit: {'; '.join(fits)}" if fits else
           "no quantization scheme or decode backend of this module fits: raise --memory-budget or use a smaller model"))


def _alternatives(session, module: str, left: int) -> list[str]:
    """Settings of ``module`` whose footprint fits in ``left`` bytes, smallest change first."""
    from atomkit.deploy.quant import SCHEMES

    options = [(q, session.decode.backend) for q in SCHEMES if q != session.quant]
    if module == "decoder":
        options = [(session.quant, b) for b in ("int8", "int4") if b != session.decode.backend] + options
    fits = []
    for quant, backend in options:
        try:
            size = footprint(session.spec, module, session.options, quant=quant, backend=backend).total
        except (AtomkitError, ValueError, RuntimeError):
            continue  # a combination this module cannot use
        if size <= left:
            what = ([f"decode backend {backend} (--backend {backend})"] if backend != session.decode.backend else []) \
                + ([f"torchao {quant} weights (Session(quant={quant!r}))"] if quant != session.quant else [])
            fits.append(f"{' and '.join(what)}: {size / MIB:.0f} MiB")
    return fits
