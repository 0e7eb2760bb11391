"""A ``.pte`` program on disk, as both sides see it: ``atomkit.export`` writes and checks programs, ``atomkit.runtime``
runs them, and both need the pieces here (neither imports the other).

* ``read_sidecar(path)``: the ``<name>.json`` written beside a program (shapes, quantization, versions, parity);
* ``save_tokenizer`` / ``saved_tokenizer``: the host-side tokenizer kept beside a program (``<name>.tokenizer/``);
* ``tokenize_fixed``: the embedder program's host-side tokenisation (fixed or longest length);
* ``load_method(path)``: a method of a program loaded with the ExecuTorch runtime, without the AOT compiler.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

from .errors import AtomkitError


def read_sidecar(path: Path) -> dict:
    """The sidecar JSON of a program (``<name>.json`` beside ``<name>.pte``); {} when there is none."""
    side = Path(path).with_suffix(".json")
    return json.loads(side.read_text()) if side.exists() else {}


def save_tokenizer(tokenizer, program: Path) -> Path:
    """The host-side tokenizer of a program, saved beside it as ``<name>.tokenizer/`` (atomically), so
    ``atomkit.runtime`` runs the program without loading the eager model."""
    from .io import atomic_dir

    folder = Path(program).with_suffix(".tokenizer")
    with atomic_dir(folder) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return folder


def saved_tokenizer(program: Path):
    """The tokenizer ``atomkit.export`` saved beside a program (``<name>.tokenizer/``)."""
    from transformers import AutoTokenizer

    folder = Path(program).with_suffix(".tokenizer")
    if not folder.is_dir():
        raise AtomkitError(f"{folder}: no tokenizer beside {Path(program).name}; re-export with `atomkit export` "
                           "(it saves one) or pass the tokenizer / like= explicitly")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize_fixed(tokenizer, texts: list[str], seq_len: int, dynamic: bool = False) -> tuple[torch.Tensor, ...]:
    """Host-side tokenisation for the embedder program: truncate to seq_len and pad to exactly seq_len
    (static program) or to the longest text, at least 2 tokens (``dynamic``: a dynamic-length program)."""
    t = tokenizer(list(texts), padding="longest" if dynamic else "max_length", truncation=True,
                  max_length=seq_len, return_tensors="pt")
    ids, mask = t["input_ids"].long(), t["attention_mask"].long()
    if ids.shape[1] < 2:
        ids, mask = (torch.nn.functional.pad(v, (0, 2 - v.shape[1])) for v in (ids, mask))
    return ids, mask


def _import_runtime():
    """``executorch.runtime`` without the AOT compiler. Its pybindings import one small file,
    ``executorch.exir._warnings``, whose package ``executorch.exir`` pulls in the whole export stack
    (about 8 s here). While ``executorch.exir`` is not imported, that file is loaded alone under a
    temporary package stub, which is removed again (a later ``import executorch.exir`` is the real one)."""
    if "executorch.exir" not in sys.modules and "executorch.exir._warnings" not in sys.modules:
        import executorch

        try:
            root = Path(importlib.util.find_spec("executorch").submodule_search_locations[0]) / "exir"
            spec = importlib.util.spec_from_file_location("executorch.exir._warnings", root / "_warnings.py")
            warn = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(warn)
            stub = types.ModuleType("executorch.exir")
            stub._warnings = warn
            sys.modules.update({"executorch.exir": stub, "executorch.exir._warnings": warn})
            executorch.exir = stub
            from executorch.runtime import Runtime  # noqa: F401
        except Exception:  # noqa: BLE001 - fall back to the plain (slow) import below
            sys.modules.pop("executorch.exir._warnings", None)
        finally:
            if sys.modules.get("executorch.exir") is locals().get("stub"):
                sys.modules.pop("executorch.exir", None)
                vars(executorch).pop("exir", None)
    import executorch.kernels.quantized  # noqa: F401 - registers quantized kernels (embedding_byte)
    from executorch.runtime import Runtime

    return Runtime.get()


def load_method(path, method: str = "forward"):
    """A method of a ``.pte`` program (file mapped by the runtime), loaded on this host."""
    program = _import_runtime().load_program(Path(path))
    m = program.load_method(method)
    m._atomkit_program = program  # keep the program (and its file data) alive as long as the method
    return m
