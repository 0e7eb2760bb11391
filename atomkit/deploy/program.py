"""A ``.pte`` program on disk, as both sides see it: ``atomkit.deploy.export`` writes and checks programs, ``atomkit.deploy.runtime``
runs them, and both need the pieces here (neither imports the other).

* ``read_sidecar(path)``: the ``<name>.json`` written beside a program (shapes, quantization, versions, parity);
* ``save_tokenizer`` / ``saved_tokenizer``: the host-side tokenizer kept beside a program (``<name>.tokenizer/``);
* ``tokenize_fixed``: the embedder program's host-side tokenisation (fixed or longest length);
* ``load_method(path)``: a method of a program loaded with the ExecuTorch runtime, without the AOT compiler;
  ``load_methods(path, names)``: several methods of one loaded program (they share its mutable buffers);
* ``prefill_chunks``: a prompt as the fixed-length chunks the decoder program's ``prefill`` takes;
* ``load_llm_custom_ops()``: ExecuTorch's LLM ops (``llama.update_cache``, ``llama.custom_sdpa``) that the decoder
  program calls, registered for the runtime (and, with ``export=True``, for ``torch.export``).
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

from atomkit.errors import AtomkitError


def read_sidecar(path: Path) -> dict:
    """The sidecar JSON of a program (``<name>.json`` beside ``<name>.pte``); {} when there is none."""
    side = Path(path).with_suffix(".json")
    return json.loads(side.read_text()) if side.exists() else {}


def save_tokenizer(tokenizer, program: Path) -> Path:
    """The host-side tokenizer of a program, saved beside it as ``<name>.tokenizer/`` (atomically), so
    ``atomkit.deploy.runtime`` runs the program without loading the eager model."""
    from atomkit.io import atomic_dir

    folder = Path(program).with_suffix(".tokenizer")
    with atomic_dir(folder) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return folder


def save_processor(processor, program: Path) -> Path:
    """A video-language model's processor (tokenizer, chat template, video processor), beside its decoder program as
    ``<name>.processor/``: the host builds each clip's prompt with it."""
    from atomkit.io import atomic_dir

    folder = Path(program).with_suffix(".processor")
    with atomic_dir(folder) as tmp:
        processor.save_pretrained(str(tmp))
    return folder


def saved_processor(program: Path):
    """The processor ``atomkit.deploy.export`` saved beside a decoder program (``<name>.processor/``)."""
    from transformers import AutoProcessor

    folder = Path(program).with_suffix(".processor")
    if not folder.is_dir():
        raise AtomkitError(f"{folder}: no processor beside {Path(program).name}; re-export with `atomkit export`")
    return AutoProcessor.from_pretrained(str(folder), local_files_only=True)


def saved_tokenizer(program: Path):
    """The tokenizer ``atomkit.deploy.export`` saved beside a program (``<name>.tokenizer/``)."""
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


def prefill_chunks(ids: list[int], chunk: int, max_seq_len: int) -> list[tuple[torch.Tensor, ...]]:
    """The inputs of a fixed-length ``prefill`` method for a prompt: ``(tokens (1, chunk), cache_position (chunk,),
    last (1,))`` per call. The last chunk is padded with its last token (padding positions are written and never
    read) or, where it would pass the cache's end, starts earlier and recomputes positions already written."""
    n, out, pos = len(ids), [], 0
    if n > max_seq_len:
        raise AtomkitError(f"a prompt of {n} tokens does not fit a cache of {max_seq_len} positions")
    while pos < n:
        begin = max(0, min(pos, max_seq_len - chunk))
        real = ids[begin:begin + chunk]
        tokens = real + [real[-1]] * (chunk - len(real))
        out.append((torch.tensor([tokens], dtype=torch.long), torch.arange(begin, begin + chunk, dtype=torch.long),
                    torch.tensor([len(real) - 1], dtype=torch.long)))
        pos = begin + len(real)
    return out


CUSTOM_OPS_LIB = "libcustom_ops_aot_lib.so"  # in executorch/extension/llm/custom_ops/ of the wheel


def load_llm_custom_ops(export: bool = False) -> None:
    """Register ExecuTorch's LLM custom ops (``torch.ops.llama.*``): their ATen CPU kernels and the ExecuTorch
    runtime's kernels come from one shared library of the executorch wheel, loaded here without importing the
    export stack. ``export=True`` also imports the ops' Python module, whose fake (meta) kernels
    ``torch.export`` needs."""
    if export:
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 - loads the library, adds meta kernels
        return
    try:
        torch.ops.llama.custom_sdpa.default  # noqa: B018 - already registered
        return
    except (AttributeError, RuntimeError):
        pass
    root = importlib.util.find_spec("executorch").submodule_search_locations[0]
    lib = Path(root) / "extension" / "llm" / "custom_ops" / CUSTOM_OPS_LIB
    if not lib.is_file():
        raise AtomkitError(f"{lib}: not found; the decoder program needs the executorch wheel's LLM custom ops")
    torch.ops.load_library(str(lib))


def load_program(path):
    """A ``.pte`` program (file mapped by the runtime) on this host, the LLM custom ops registered."""
    runtime = _import_runtime()
    load_llm_custom_ops()
    return runtime.load_program(Path(path))


def load_method(path, method: str = "forward"):
    """A method of a ``.pte`` program, loaded on this host."""
    return load_methods(path, (method,))[method]


def load_methods(path, methods) -> dict:
    """Methods of one ``.pte`` program, loaded together (a program exported with shared mutable buffers, such as
    the decoder's KV cache, gives every method the same buffers; each load writes their initial values, so all
    are loaded before any runs)."""
    program = load_program(path)
    out = {}
    for name in methods:
        m = program.load_method(name)
        m._atomkit_program = program  # keep the program (and its file data) alive as long as the method
        out[name] = m
    return out


def method_names(path) -> set[str]:
    """The names of a program's methods, without loading any."""
    return set(load_program(path).method_names)
