"""The engine store: what a decode engine computes from an LM's weights (int4/int8 packed matrices, scales, bf16
prefill copies, fused matrices) is written once to the cache as a safetensors file and mapped on every later load
(``atomkit.models.weights.save_mappable``, every tensor 64-byte aligned for the packed kernels;
``atomkit.models.weights.mapped_safetensors``: a page is read when a tensor first touches it), so readying a quantized
decoder costs a file read instead of a re-packing (int4: about 10 s on 2 cores).

Entries are keyed by the LM's weight files (name, size, modification time and the bytes at both ends of each),
the stepper's settings, the torch version (packed layouts are torch's) and ``STORE_VERSION``; a changed source
or setting gets a new entry, and stale entries of killed writers are removed (``atomkit.io.remove_stale``).
An LM that was not loaded from files (random weights) is packed in memory and nothing is stored.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

STORE_VERSION = 3  # 2: fused Linears prefill with the model's tensors; 3: safetensors (was torch.save, ``.pt``)
_ENDS = 1 << 20  # bytes read at each end of a weight file for its fingerprint


def source_id(lm) -> str | None:
    """A short fingerprint of the weight files ``lm`` was loaded from, None when it was not loaded from a folder."""
    folder = Path(getattr(lm.config, "_name_or_path", "") or "")
    files = sorted(folder.glob("*.safetensors")) if str(folder) and folder.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_ENDS))
            fh.seek(max(0, st.st_size - _ENDS))
            h.update(fh.read(_ENDS))
    return h.hexdigest()[:20]


def entry(store: Path, lm, settings: dict) -> Path | None:
    """The store file of ``lm`` with stepper ``settings``; None when ``lm`` has no files to key it by."""
    source = source_id(lm)
    if source is None:
        return None
    key = json.dumps({"source": source, **settings, "torch": torch.__version__, "v": STORE_VERSION}, sort_keys=True)
    return store / f"llama-{settings.get('weights', 'fp32')}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def stepper(decoder, *, max_seq_len: int | None = None, **settings):
    """A ``LlamaStepper`` of ``decoder.lm`` with ``settings`` (weights, fuse, compile), read from the decoder's
    engine store (``decoder.store``) when it holds one, else built and written there for next time.

    ``stepper.loaded_from`` is the store file it was read from (None when it was built)."""
    from safetensors import SafetensorError

    from atomkit.io import atomic_path
    from atomkit.decode.llama import LlamaStepper, default_prefill
    from atomkit.models.weights import mapped_safetensors, save_mappable

    lm = decoder.lm
    store = getattr(decoder, "store", None)
    settings = {"prefill": default_prefill(), **settings}  # bf16 prefill copies or none: part of the key
    stored = {k: v for k, v in settings.items() if k != "compile"}  # compiling changes no tensor
    path = entry(Path(store), lm, stored) if store and lm.lm_head.weight.is_cpu else None
    if path is not None and path.is_file():
        try:
            made = LlamaStepper(lm, max_seq_len=max_seq_len, packed=mapped_safetensors(path), **settings)
            made.loaded_from = path
            return made
        except (SafetensorError, RuntimeError, ValueError, KeyError, OSError):
            path.unlink(missing_ok=True)  # unreadable (an older torch, a damaged file): packed again below
    made = LlamaStepper(lm, max_seq_len=max_seq_len, **settings)
    made.loaded_from = None
    state = made.packed_state()
    if path is not None and state:
        with atomic_path(path) as tmp:
            save_mappable(state, tmp)
        for old in path.parent.glob("llama-*.pt"):  # entries of STORE_VERSION 2 (torch.save): never read again
            old.unlink(missing_ok=True)
    return made
