"""torchao quantization of one resident module (encoder, decoder or embedder), measured in bytes and dB.

Schemes (the paper quantizes Linear and Embedding layers only; convolutions stay float32):

* ``int8`` (the paper's): int8 per-token dynamic activations + int8 per-channel weights on Linear
  (``Int8DynamicActivationIntxWeightConfig``), int8 per-row weight-only on Embedding
  (``IntxWeightOnlyConfig``). Both use torchao's ``IntxUnpackedToInt8Tensor``, which
  ``torch.export`` traces into decomposed quant/dequant ops that ExecuTorch's XNNPACK backend lowers.
  (``Int8DynamicActivationInt8WeightConfig`` would need ``aten._int_mm``, which does not lower.)
* ``int4`` (MobileLLM-Pro / ParetoQ direction): 4-bit weights in groups of 32 along the input
  dimension with the same 8-bit dynamic activations on Linear, 4-bit grouped weight-only on
  Embedding. A layer whose input dimension is not a multiple of 32 falls back to 4-bit per-channel
  and is listed in the report's ``per_axis_fallback``.

Tied weights (SmolLM2 and Llama tie ``lm_head.weight`` to the input embedding): the shared tensor
is quantized once, with the Linear config (per output row, which for a (vocab, hidden) matrix is
also per embedding row), and the same quantized parameter is put back on every module that shared
it, so the tie and the single copy survive. The embedding lookup only dequantizes rows; it ignores
the activation-quantization flag that the Linear config sets on the tensor.

Storage note: ``IntxUnpackedToInt8Tensor`` keeps sub-byte values unpacked, one per int8 byte, so in
eager PyTorch an int4 model is *not* smaller than an int8 one. ``weight_bytes(..., packed=True)``
counts sub-byte data at its bit width, which is what XNNPACK serializes (two 4-bit values a byte).

Eager speed: these tensors dequantize the whole weight on every call, so a quantized module is
*slower* in eager PyTorch than float32 (SmolLM2-135M, 23 greedy tokens on 2 cores: 4.6 s fp32,
23 s int8) and briefly holds a float copy of each weight. They are the format for
``torch.export`` -> ExecuTorch: lower with ``XnnpackPartitioner``, then
``.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True))`` so embedding
lookups become ``quantized_decomposed::embedding_byte`` / ``embedding_4bit``, and
``import executorch.kernels.quantized`` before loading the ``.pte``. A tied table is stored twice
in the ``.pte`` (XNNPACK packs its own copy for the Linear).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from atomkit.errors import InputError

SCHEMES = ("none", "int8", "int4")
LAYERS = ("linear", "embedding")
GROUP_SIZE = 32  # int4 group size along the input dimension (XNNPACK needs a multiple of 32)

_BITS = {getattr(torch, f"int{b}"): b for b in range(1, 9)}


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise InputError(f"unknown quantization scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")


def quant_config(scheme: str, layer: str, *, group_size: int | None = GROUP_SIZE):
    """The torchao config of ``scheme`` for a ``layer`` kind ("linear" or "embedding"); None for "none".

    ``group_size`` applies to int4 only; None means one scale per output row (per-axis 0).
    """
    _check_scheme(scheme)
    if layer not in LAYERS:
        raise InputError(f"unknown layer kind {layer!r}; valid kinds: {', '.join(LAYERS)}")
    if scheme == "none":
        return None
    from torchao.quantization import (Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerAxis,
                                      PerGroup)

    if scheme == "int8":
        dtype, granularity = torch.int8, PerAxis(0)
    else:
        dtype, granularity = torch.int4, (PerGroup(group_size) if group_size else PerAxis(0))
    if layer == "linear":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


def is_quantized(t: torch.Tensor | None) -> bool:
    """True for a torchao quantized tensor subclass (any wrapper subclass with inner tensors)."""
    return t is not None and is_traceable_wrapper_subclass(t)


def _kind(m: nn.Module) -> str | None:
    """ "linear" / "embedding" for layers this module quantizes, else None.

    ``NonDynamicallyQuantizableLinear`` (the out-projection of ``nn.MultiheadAttention``) is left
    alone: MultiheadAttention calls its weight through fused functional code, not ``Linear.forward``.
    """
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or is_quantized(w) or not w.is_floating_point():
        return None
    if isinstance(m, nn.Linear) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "linear"
    if isinstance(m, nn.Embedding):
        return "embedding"
    return None


def quantize_module(module: nn.Module, scheme: str) -> nn.Module:
    """Quantize ``module``'s Linear and Embedding weights in place with ``scheme``; returns ``module``.

    What was done is left in ``module.atomkit_quant`` (a dict): counts of quantized layers, tied
    groups, int4 per-axis fallbacks, skipped layers and the parameters left in float (convolutions
    and everything else).
    """
    _check_scheme(scheme)
    named = dict(module.named_modules())
    kinds = {name: _kind(m) for name, m in named.items()}
    report = {"scheme": scheme, "linear": 0, "embedding": 0, "tied": [], "per_axis_fallback": [],
              "skipped": sorted(n for n, m in named.items()
                                if isinstance(m, (nn.Linear, nn.Embedding)) and kinds[n] is None),
              "float_params": {}}
    # group modules that share one weight tensor; the first Linear of a group (else its first
    # Embedding) is quantized and the result is shared back to the others
    groups: dict[int, list[str]] = {}
    for name, kind in kinds.items():
        if kind is not None:
            groups.setdefault(id(named[name].weight), []).append(name)
    owners = {}
    for names in groups.values():
        owner = next((n for n in names if kinds[n] == "linear"), names[0])
        owners.update({n: owner for n in names})
        if len(names) > 1:
            report["tied"].append(names)
    if scheme != "none":
        from torchao.quantization import quantize_

        def in_dim(name: str) -> int:
            return named[name].weight.shape[1]

        gs = GROUP_SIZE if scheme == "int4" else None
        fallback = [n for n, o in owners.items() if o == n and gs and in_dim(n) % gs]
        report["per_axis_fallback"] = fallback
        for layer in LAYERS:
            def pick(m, fqn, layer=layer, grouped=True):
                return owners.get(fqn) == fqn and kinds[fqn] == layer and (fqn in fallback) != grouped

            quantize_(module, quant_config(scheme, layer), filter_fn=pick)
            if fallback:
                quantize_(module, quant_config(scheme, layer, group_size=None),
                          filter_fn=lambda m, fqn, p=pick: p(m, fqn, grouped=False))
        for names in report["tied"]:
            shared = named[owners[names[0]]].weight
            for n in names:
                named[n].weight = shared
        for name, owner in owners.items():
            if is_quantized(named[name].weight):
                report[kinds[name]] += 1

    floats: dict[str, int] = {}
    for m in named.values():
        key = "conv" if isinstance(m, nn.modules.conv._ConvNd) else "other"
        for p in m.parameters(recurse=False):
            if not is_quantized(p):
                floats[key] = floats.get(key, 0) + p.numel()
    report["float_params"] = floats
    module.atomkit_quant = report
    return module


def tensor_bytes(t: torch.Tensor, *, packed: bool = False) -> int:
    """Real storage of a tensor: for a quantized subclass, the sum of its inner tensors (int data,
    scales, zero points). ``packed`` counts sub-byte int data at its bit width."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        bits = _BITS.get(getattr(t, "target_dtype", None)) if packed else None
        total = 0
        for name in names:
            inner = getattr(t, name)
            if inner is None:
                continue
            if name == "qdata" and bits and bits < 8:
                total += math.ceil(inner.numel() * bits / 8)
            else:
                total += tensor_bytes(inner, packed=packed)
        return total
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module, *, packed: bool = False) -> dict:
    """Bytes of parameters and buffers by layer kind: {"linear", "embedding", "other", "total"}.

    A tensor shared by several modules (tied weights) is counted once, under the first module that
    holds it. Quantized tensors count their real inner storage (see ``tensor_bytes``). Parameters marked
    ``atomkit_released`` (placeholders for matrices a decode engine holds itself) count nothing.
    """
    out = {"linear": 0, "embedding": 0, "other": 0}
    seen: set[int] = set()
    for m in module.modules():
        kind = "linear" if isinstance(m, nn.Linear) else "embedding" if isinstance(m, nn.Embedding) else "other"
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if t is None or id(t) in seen or getattr(t, "atomkit_released", False):  # released: not held
                continue
            seen.add(id(t))
            out[kind] += tensor_bytes(t, packed=packed)
    out["total"] = sum(out.values())
    return out


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(sum(ref^2) / sum((ref - test)^2)) in dB; inf when equal."""
    ref = reference.detach().to(torch.float64)
    tst = test.detach().to(device=ref.device, dtype=torch.float64)
    if ref.shape != tst.shape:
        raise ValueError(f"shapes differ: reference {tuple(ref.shape)}, test {tuple(tst.shape)}")
    noise = float((ref - tst).pow(2).sum())
    signal = float(ref.pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def finite_sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """``sqnr_db`` clamped to +-300 dB, for JSON (sidecars, export reports): identical outputs give 300 dB."""
    return max(-300.0, min(300.0, sqnr_db(reference, test)))
