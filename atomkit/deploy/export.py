"""Export the three modules to ExecuTorch ``.pte`` programs lowered to XNNPACK (the on-device path).

Each ``export_*`` runs ``torch.export.export`` -> ``executorch.exir.to_edge_transform_and_lower(ep,
partitioner=[XnnpackPartitioner()])`` -> ``.to_executorch()``, writes ``<name>.pte`` and a sidecar
``<name>.json`` (shapes, versions, delegation, parity) atomically, and checks the program against
the eager module on the example input:

* encoder: ``forward(x float (frames, 3, size, size)) -> (features, probs)`` (or features alone);
* embedder: ``forward(input_ids, attention_mask (B, seq_len) int64) -> (B, D)`` unit vectors, the
  transformer plus mean pooling and L2 norm; tokenisation (pad/truncate to seq_len) stays on the host;
* decoder (a Llama LM): ``atomkit.deploy.decoder_program.LlamaDecodeProgram``, one program with five methods over
  a KV cache of ``batch`` rows (default 4, the beams) held inside it and shared by them:
  ``forward(tokens (B, 1), cache_position (1,)) -> logits (B, vocab)`` (a decode step),
  ``step(tokens (1, 1), cache_position (1,)) -> logits (1, vocab)`` (a greedy step of row 0 alone),
  ``prefill(tokens (1, P), cache_position (P,), last (1,)) -> logits (1, vocab)`` (a chunk of P prompt tokens),
  ``reorder(index (B,), cache_position (L,))`` (beam search moves its beams) and ``clear()``; cache writes and
  attention are ExecuTorch's LLM custom ops, so each layer of a step lowers to one or two XNNPACK pieces;
* decoder (any other LM): ``forward(input_ids (1, L), cache_position (L,)) -> logits (1, 1, vocab)`` over
  transformers' static cache (``TorchExportableModuleWithStaticCache``), batch 1 (greedy).

Parity: the program against the eager module it was exported from (the same quantization), SQNR
>= 40 dB for fp32 programs and >= 20 dB for quantized ones (XNNPACK quantizes activations with its
own rounding); the decoder's parity is teacher-forced over its prefill and ``PARITY_STEPS`` decode steps
(for the compact program: of all its rows, with a ``reorder`` halfway).
The quantization error itself (quantized vs fp32 eager) is reported beside it as
``vs_fp32`` and judged by ``atomkit.evaluation.parity``, not here. ``trace_encoder_torchscript`` is the paper's deprecated PyTorch Mobile path, kept for
comparison only; ``load_times`` measures load + first inference of eager / TorchScript / ``.pte``.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import operator
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from atomkit.io import atomic_path, write_json_atomic
from atomkit.deploy.program import load_method, save_tokenizer, tokenize_fixed
from atomkit.deploy.quant import finite_sqnr_db

SQNR_MIN_DB = {"fp32": 40.0, "quantized": 20.0}
PARITY_STEPS = 16  # teacher-forced decode steps in the decoder's parity check


@dataclass
class ExportResult:
    path: Path  # the .pte program
    sidecar: Path  # <name>.json next to it
    delegation: dict
    parity: dict
    seconds: float  # export + lowering + serialisation (parity run excluded)


# -- reports -----------------------------------------------------------------------------------------
def delegation_report(edge_program_manager, method: str = "forward") -> dict:
    """Ops inside XNNPACK delegates vs left outside (on portable CPU kernels), by op name."""
    import operator

    def _op_name(target) -> str:
        return (getattr(target, "__name__", None) or str(target)).removeprefix("aten.")

    gm = edge_program_manager.exported_program(method).graph_module
    inside: dict[str, int] = {}
    outside: dict[str, int] = {}
    subgraphs = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module"):
            subgraphs += 1
            for sub in getattr(gm, node.target).original_module.graph.nodes:
                if sub.op == "call_function" and sub.target is not operator.getitem:
                    inside[_op_name(sub.target)] = inside.get(_op_name(sub.target), 0) + 1
        elif node.op == "call_function" and node.target is not operator.getitem:
            name = _op_name(node.target)
            if name.startswith("auto_functionalized"):  # a custom op that writes a buffer (the KV cache): name it
                name = str(node.args[0]).removeprefix("aten.")
            if name != "executorch_call_delegate":
                outside[name] = outside.get(name, 0) + 1
    return {"delegated_ops": sum(inside.values()), "non_delegated_ops": sum(outside.values()),
            "delegate_subgraphs": subgraphs, "outside_ops": dict(sorted(outside.items())),
            "inside_ops": dict(sorted(inside.items()))}


def parity(refs: dict[str, torch.Tensor], outs: dict[str, torch.Tensor], quantized: bool,
           fp32: dict[str, torch.Tensor] | None = None) -> dict:
    """Program outputs ``outs`` vs the eager module's ``refs`` (same quantization); ``fp32``: the fp32
    module's outputs, reported as the quantization error."""
    tol = SQNR_MIN_DB["quantized" if quantized else "fp32"]
    per = {k: {"max_abs_diff": float((refs[k].float() - outs[k].float()).abs().max()),
               "sqnr_db": round(finite_sqnr_db(refs[k], outs[k]), 2),  # and the share of rows with the same argmax:
               "top1_agreement": float((refs[k].argmax(-1) == outs[k].argmax(-1)).float().mean())} for k in refs}
    out = {"tolerance": f"SQNR >= {tol} dB vs the eager module with the same quantization", "sqnr_min_db": tol,
           "outputs": per, "passed": all(v["sqnr_db"] >= tol for v in per.values())}
    if fp32 is not None and quantized:  # how far the program is from fp32: the quantization error
        out["vs_fp32"] = {k: {"sqnr_db": round(finite_sqnr_db(fp32[k], outs[k]), 2),
                              "top1_agreement": float((fp32[k].argmax(-1) == outs[k].argmax(-1)).float().mean())}
                          for k in fp32}
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None
    return {pkg: v(pkg) for pkg in ("torch", "torchao", "executorch", "transformers")}


def _spec(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


# -- the common pipeline -----------------------------------------------------------------------------
def _quantized(module: nn.Module, quant: str) -> nn.Module:
    if quant == "none":
        return module
    from atomkit.deploy.quant import quantize_module  # the project's int8/int4 schemes (torchao); the caller's copy stays fp32

    module = copy.deepcopy(module)
    for m in module.modules():  # padding_idx only matters for gradients, and it stops ExecuTorch's
        if isinstance(m, nn.Embedding):  # fusion of dequantize + embedding into embedding_byte
            m.padding_idx = None
    return quantize_module(module, quant)


def _lower(module: nn.Module, args: tuple, dynamic_shapes=None, strict: bool = False,
           init_buffers: list[str] | None = None, quantized: bool = False):
    """torch.export -> edge + XNNPACK -> ExecuTorch program manager; (etpm, delegation report).

    ``init_buffers``: name patterns of mutated buffers (KV caches) whose initial zeros are written into
    the program; ExecuTorch otherwise serialises only their shape and dtype (undefined contents).
    """
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=strict)
        edge = to_edge_transform_and_lower(ep, partitioner=[xnnpack_partitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        report = delegation_report(edge)  # before to_executorch, which consumes the edge program
        passes = [InitializedMutableBufferPass(init_buffers)] if init_buffers else []
        # quantized: fuse torchao dequantize_affine + embedding into quantized_decomposed::embedding_byte
        et = edge.to_executorch(ExecutorchBackendConfig(passes=passes, do_quant_fusion_and_const_prop=quantized))
    return et, report


def _write(et, out_dir: Path, name: str) -> Path:
    path = Path(out_dir) / f"{name}.pte"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        et.write_to_file(f)
    return path


def _sidecar(path: Path, report: dict, **fields) -> Path:
    meta = dict(fields, delegation={k: v for k, v in report.items() if k != "inside_ops"}, versions=_versions(),
                file_bytes=path.stat().st_size, program=path.name,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return write_json_atomic(path.with_suffix(".json"), meta)


def _finish(et, report, out_dir, name, *, t0, model, module, quant, inputs, run_eager, run_fp32=None,
            extra=None) -> ExportResult:
    path = _write(et, out_dir, name)
    seconds = time.perf_counter() - t0
    method = load_method(path)
    refs = run_eager()
    outs = dict(zip(refs, method.execute(list(inputs.values()))))
    par = parity(refs, outs, quant != "none", fp32=run_fp32() if run_fp32 and quant != "none" else None)
    side = _sidecar(path, report, name=name, model=model, module=module, quant=quant,
                    inputs={k: _spec(v) for k, v in inputs.items()},
                    outputs={k: _spec(v) for k, v in outs.items()},
                    parity=par, export_seconds=round(seconds, 2), **(extra or {}))
    return ExportResult(path, side, report, par, seconds)


# -- encoder -----------------------------------------------------------------------------------------
def export_encoder(encoder, out_dir, *, name: str, quant: str = "none", frames: int = 6, size: int = 224,
                   model: str | None = None) -> ExportResult:
    """The encoder's forward on float (frames, 3, size, size); frames are independent, so the runtime
    pads/chunks any clip length to ``frames``."""
    t0 = time.perf_counter()
    encoder = encoder.eval().cpu()
    x = torch.randn(frames, 3, size, size, generator=torch.Generator().manual_seed(0))
    qenc = _quantized(encoder, quant)
    et, report = _lower(qenc, (x,), quantized=quant != "none")

    def outputs(module):
        def run():
            with torch.inference_mode():
                out = module(x)
            return dict(zip(("features", "probs"), out if isinstance(out, tuple) else (out,)))
        return run

    return _finish(et, report, out_dir, name, t0=t0, model=model or type(encoder).__name__, module="encoder",
                   quant=quant, inputs={"x": x}, run_eager=outputs(qenc), run_fp32=outputs(encoder),
                   extra={"frames": frames, "size": size, "mean": list(encoder.mean), "std": list(encoder.std),
                          "feature_dim": int(encoder.feature_dim), "top_concepts": int(encoder.top_concepts),
                          "labels": "imagenet" if encoder.labels is not None else None})


# -- embedder ----------------------------------------------------------------------------------------
def export_embedder(embedder, out_dir, *, name: str, quant: str = "none", seq_len: int = 128,
                    batch: int = 1, dynamic_seq: bool = True, model: str | None = None) -> ExportResult:
    """The transformer + pooling at a static batch; the runtime pads the last batch.

    Batch stays static: a dynamic batch left every reshape outside XNNPACK (MiniLM: 65 delegate pieces,
    not 29). ``dynamic_seq`` (default): length 2..seq_len, the host pads only to the longest text (59
    pieces, but a short caption costs a fraction of a 128-token pass: the fixed-length program measured
    10-18x slower than eager on captions); ``dynamic_seq=False``: exactly seq_len tokens (29 pieces)."""
    t0 = time.perf_counter()
    wrapper = embedder.net.eval()  # BERT, mean pooling and normalisation, tensors in and out (MeanPooledBert)
    texts = (["a person rides a bike down a street", "a cartoon rabbit in a forest"] * batch)[:batch]
    ids, mask = tokenize_fixed(embedder.tokenizer, texts, seq_len, dynamic=dynamic_seq)
    seq = {1: torch.export.Dim("seq", min=2, max=seq_len)} if dynamic_seq else None
    qwrapper = _quantized(wrapper, quant)
    et, report = _lower(qwrapper, (ids, mask), dynamic_shapes=seq and (seq, seq), quantized=quant != "none")

    def outputs(module):
        def run():
            with torch.inference_mode():
                return {"embedding": module(ids, mask).float()}
        return run

    save_tokenizer(embedder.tokenizer, Path(out_dir) / f"{name}.pte")
    return _finish(et, report, out_dir, name, t0=t0, model=model or "sentence-transformers", module="embedder",
                   quant=quant, inputs={"input_ids": ids, "attention_mask": mask}, run_eager=outputs(qwrapper),
                   run_fp32=outputs(wrapper),
                   extra={"seq_len": seq_len, "batch": batch, "dynamic_seq": dynamic_seq, "dim": int(embedder.dim)})


# -- decoder -----------------------------------------------------------------------------------------
def _static_cache_module(lm, max_seq_len: int, batch_size: int = 1) -> nn.Module:
    """TorchExportableModuleWithStaticCache returning only the last position's logits."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    class LastLogits(TorchExportableModuleWithStaticCache):
        def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
            for layer in self.static_cache.layers:  # the cache length is where this call starts
                layer.cumulative_length.copy_(cache_position[0])
            out = self.model(input_ids=input_ids, attention_mask=None, past_key_values=self.static_cache,
                             use_cache=True, logits_to_keep=1)
            return out.logits

    saved = lm.generation_config
    gc = copy.deepcopy(saved)
    gc.use_cache, gc.cache_implementation = True, "static"
    lm.generation_config = gc  # the wrapper reads it once; the eager model's config is restored below
    try:
        return LastLogits(lm, batch_size=batch_size, max_cache_len=max_seq_len, device=torch.device("cpu")).eval()
    finally:
        lm.generation_config = saved


def export_decoder(decoder, out_dir, *, name: str, quant: str = "none", max_seq_len: int = 512, batch: int = 4,
                   model: str | None = None) -> ExportResult:
    """The decoder program: for a Llama LM the compact ``LlamaDecodeProgram`` (``atomkit.deploy.decoder_program``:
    ``forward`` / ``prefill`` / ``reorder`` over one KV cache of ``batch`` rows, so the runtime beam-searches with
    ``batch`` beams); any other LM goes through ``export_static_cache_decoder`` (batch 1, greedy)."""
    from atomkit.deploy.decoder_program import unsupported

    if unsupported(decoder.lm) is not None:
        return export_static_cache_decoder(decoder, out_dir, name=name, quant=quant, max_seq_len=max_seq_len,
                                           model=model)
    return export_llama_program(decoder, out_dir, name=name, quant=quant, max_seq_len=max_seq_len, batch=batch,
                                model=model)


# XNNPACK passes that rewrite what a Llama decode program never holds, so that all but ChannelsLastTaggedReshapePass
# are skipped: decomposed bilinear upsampling and attention (its attention is ``llama.custom_sdpa``, outside
# XNNPACK), BatchNorm, PReLU, convolutions, ReLU-like activations to fuse, pads, concatenations of more than five
# tensors, clones, dim-order and memory-format copies, addmm (its linears are kept whole), getitem of pooling,
# constants left to fold and custom metadata on q/dq nodes. XNNPACK runs every pass on every delegate piece, each a
# re-trace of the piece on fake tensors (SmolLM2 cut to 2 layers: the last ten added here took a quarter of its
# lowering; tested: the program is byte-identical without them).
LLAMA_PROGRAM_SKIPPED_PASSES = ("ConvertToUpsampleBilinear2d", "ConvertToSDPAPass", "FuseBatchNormPass",
                                "DecomposeBatchNorm", "PReLUReshapePass", "Conv1dUnsqueezePass",
                                "XNNPACKRemoveCloneOpsTransform", "DimOrderOpsRevertPass", "ConvertToLinearPass",
                                "PropagateCustomMetaPass", "ConstPropPass", "FuseActivationPass", "DecomposeConcatenate",
                                "RemoveGetItemPass", "InsertPadQDQPass", "RemoveRedundantCopyPass")


@contextlib.contextmanager
def xnnpack_passes_without(names: tuple[str, ...]):
    """Within the block, XNNPACK's preprocessing runs its default graph passes less those named."""
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    init = XNNPACKPassManager.__init__

    def without(self, exported_program, passes=None):
        init(self, exported_program, passes)
        if passes is None:
            self.passes = [p for p in self.passes if p.__name__ not in names]

    XNNPACKPassManager.__init__ = without
    try:
        yield
    finally:
        XNNPACKPassManager.__init__ = init


# ExecuTorch's own edge passes that rewrite nothing a Llama decode program holds: transposes to normalise, in-place
# or broken ops to make functional, symbolic ints to make tensors, operands of mixed dtypes, and dim-order copies to
# legalise for portable kernels. Each re-traces every method whole on fake tensors (SmolLM2 cut to 4 layers: about
# 1.5 s each of a 34 s lowering; tested: the program is byte-identical without them).
LLAMA_PROGRAM_SKIPPED_EDGE_PASSES = ("NormalizeTransposePass", "ReplaceBrokenOpsWithFunctionalOpsPass",
                                     "SymToTensorPass", "RemoveMixedTypeOperators", "LegalizePortableDimOrderPass")


def _pass_name(p) -> str:
    """A pass's class name (ExecuTorch wraps some passes in a function that keeps the pass as ``__wrapped__``)."""
    return type(getattr(p, "__wrapped__", p)).__name__


@contextlib.contextmanager
def edge_passes_without(names: tuple[str, ...]):
    """Within the block, ``to_edge`` and ``to_executorch`` run their default graph passes less those named."""
    import executorch.exir.program._program as prog

    to_edge, to_et = prog._get_aten_to_edge_passes, prog.edge_to_executorch_passes

    def edge_without(config):
        pre, post = to_edge(config)
        return [p for p in pre if _pass_name(p) not in names], [p for p in post if _pass_name(p) not in names]

    def et_without(*args, **kwargs):
        return [p for p in to_et(*args, **kwargs) if _pass_name(p) not in names]

    prog._get_aten_to_edge_passes, prog.edge_to_executorch_passes = edge_without, et_without
    try:
        yield
    finally:
        prog._get_aten_to_edge_passes, prog.edge_to_executorch_passes = to_edge, to_et


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off within the block, one collection after it.

    Exporting and lowering the decode program builds millions of short-lived graph objects, and the collector's
    scans of the whole heap took 16 s of a 244 s decoder export (measured with ``gc.callbacks``); the cycles
    left are collected once at the end."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()


class _Retarget:
    """A graph pass that renames ops node by node (``rename(op)``: the new op, or None to keep it), in place.

    ExecuTorch's passes that turn views into view copies and ATen ops into edge ops do the same renaming by
    re-tracing the whole method on fake tensors (15 s and 13 s of a 192 s lowering of the Llama decode program); a
    rename keeps each node's shapes and metadata, which the new op computes alike, and records the provenance
    (``from_node``) a re-trace records, which ExecuTorch's debug handles read. A graph with control flow
    (subgraphs) gets the stock pass."""

    def __init__(self, rename, stock):
        self.rename, self.stock, self.name = rename, stock, stock.__name__

    def __call__(self, gm):
        from torch._ops import OpOverload
        from torch.fx.passes.infra.pass_base import PassResult
        from torch.fx.traceback import NodeSource, NodeSourceAction

        if any(isinstance(m, torch.fx.GraphModule) for m in gm.children()):
            return self.stock()(gm)
        for n in gm.graph.nodes:
            if n.op == "call_function" and isinstance(n.target, OpOverload):
                op = self.rename(n.target)
                if op is not None:
                    n.target = op
            if n.op not in ("placeholder", "output") and "from_node" not in n.meta:  # as a re-trace records it
                n.meta["from_node"] = [NodeSource(n, self.name, NodeSourceAction.CREATE)]
        gm.recompile()
        return PassResult(gm, True)


class _IfNeeded:
    """A stock graph pass run only on a graph where ``needed(gm)`` finds something for it to rewrite (a scan of
    the nodes, where the pass itself re-traces the whole method)."""

    def __init__(self, stock, needed):
        self.stock, self.needed = stock, needed

    def __call__(self, gm):
        from torch.fx.passes.infra.pass_base import PassResult

        return self.stock(gm) if self.needed(gm) else PassResult(gm, False)


def _python_scalar_for_tensor(gm) -> bool:
    """Whether a node passes a Python number where its op takes a tensor (what ``ScalarToTensorPass`` rewrites)."""
    from torch._ops import OpOverload

    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, OpOverload):
            schema = n.target._schema.arguments
            given = [*zip(schema, n.args), *((a, n.kwargs[a.name]) for a in schema if a.name in n.kwargs)]
            if any(isinstance(v, (bool, int, float)) and isinstance(a.type, torch.TensorType) for a, v in given):
                return True
    return False


def _memory_format_op(gm) -> bool:
    """Whether a node is an op that takes a memory format (what ``MemoryFormatOpsPass`` makes a dim-order op)."""
    from executorch.exir.passes.memory_format_ops_pass import DimOrderOpsMap

    return any(n.op == "call_function" and n.target in DimOrderOpsMap for n in gm.graph.nodes)


@contextlib.contextmanager
def edge_passes_lean():
    """Within the block, ``to_edge`` does four of its passes without re-tracing every method for each: views to view
    copies and ATen ops to edge ops are renamed in place (``_Retarget``); Python numbers to tensors and memory-format
    ops to dim-order ops run only on a method that has one (``_IfNeeded``; ``LlamaDecodeProgram`` has neither)."""
    import executorch.exir.program._program as prog
    from executorch.exir.passes.replace_aten_with_edge_pass import aten_to_edge, should_lower_to_edge
    from torch._export.passes import replace_view_ops_with_view_copy_ops_pass as views

    def view_copy(op):
        if op in views._NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS:
            return views._NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS[op]
        return views.get_view_copy_of_view_op(op._schema)

    def to_edge(config):
        pre, post = stock[3](config)
        pre = [_IfNeeded(p, _python_scalar_for_tensor) if _pass_name(p) == "ScalarToTensorPass" else p for p in pre]
        return pre, post

    stock = prog.ReplaceViewOpsWithViewCopyOpsPass, prog.OpReplacePass, prog.MemoryFormatOpsPass, \
        prog._get_aten_to_edge_passes
    prog.ReplaceViewOpsWithViewCopyOpsPass = lambda: _Retarget(view_copy, stock[0])
    prog.OpReplacePass = lambda: _Retarget(lambda op: aten_to_edge(op) if should_lower_to_edge(op) else None, stock[1])
    prog.MemoryFormatOpsPass = lambda: _IfNeeded(stock[2](), _memory_format_op)
    prog._get_aten_to_edge_passes = to_edge
    try:
        yield
    finally:
        (prog.ReplaceViewOpsWithViewCopyOpsPass, prog.OpReplacePass, prog.MemoryFormatOpsPass,
         prog._get_aten_to_edge_passes) = stock


@contextlib.contextmanager
def delegate_outputs_from_metadata():
    """Within the block, a delegate call on fake tensors returns fake outputs made from the shapes its lowered
    graph records, instead of running that graph op by op on fake tensors.

    ``to_executorch`` re-traces every method once more to refresh tensor specs, and on fake tensors a delegate
    call runs the whole graph the delegate holds: for the Llama decode program, where XNNPACK holds nearly every
    op, that is one more re-trace of every method. A delegate whose outputs have a symbolic shape, or whose graph
    does not record them, is run as before."""
    import importlib

    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils import _pytree as pytree

    hop = importlib.import_module("torch._higher_order_ops.executorch_call_delegate")  # the package names the op so
    stock = hop.call_delegate_cpu

    def outputs(lowered_module, *args):
        fakes = [a for a in pytree.tree_leaves(args) if isinstance(a, FakeTensor)]
        ep = lowered_module.original_module
        if fakes:
            node = ep.graph_module.graph.output_node()
            by_name = {getattr(n, "name", None): n for n in pytree.tree_leaves(node.args[0])}
            vals = [getattr(by_name.get(name), "meta", {}).get("val") for name in ep.graph_signature.user_outputs]
            if all(isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in (*v.shape, *v.stride()))
                   for v in vals):
                mode = fakes[0].fake_mode
                made = [FakeTensor(mode, torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta"),
                                   v.device) for v in vals]
                return pytree.tree_unflatten(made, ep.call_spec.out_spec)
        return stock(lowered_module, *args)

    hop.call_delegate_cpu = outputs
    try:
        yield
    finally:
        hop.call_delegate_cpu = stock


@contextlib.contextmanager
def partitioning_lean():
    """Within the block, two costs of partitioning a method that grow with its size times its number of pieces are
    cut, with the same pieces in the same graph:

    - XNNPACK's partitioner asks of every pair of candidate pieces whether merging them makes a cycle, by looking
      up each node downstream of their users one by one in Python; here one ``set.isdisjoint`` per user does it.
    - Fusing each piece into a submodule re-sorts the method's graph (``legalize_graph``), and assigning the sorted
      graph regenerates the module's Python code and that of every piece fused before it. Here the code is
      generated once, after all pieces of the method are fused; nothing in between runs the module.

    The two were 27 s and 29 s of the 140 s ``to_backend`` of the Llama decode program (SmolLM2, 30 layers, under
    cProfile)."""
    import executorch.exir.backend.backend_api as api
    import executorch.exir.lowered_backend_module as lbm
    from executorch.exir.backend.canonical_partitioners.group_partitioner import GroupBasedPartitioner
    from torch.fx.passes.utils.fuser_utils import validate_partition

    def can_merge(self, p1, p2, partitions_by_id):
        combined = set(partitions_by_id[p1].nodes) | set(partitions_by_id[p2].nodes)
        downstream = self.dependency_viewer.downstreams_of
        if any(not combined.isdisjoint(downstream(u)) for n in combined for u in n.users if u not in combined):
            return False
        return validate_partition(list(combined))

    stale: list = []

    def legalize(gm):
        gm.__dict__["recompile"] = lambda: None  # the graph setter's regeneration, deferred to the end of the method
        try:
            return stock[1](gm)
        finally:
            del gm.__dict__["recompile"]
            stale.append(gm)

    def create_partitions(tagged_graph_module, *args, **kwargs):
        try:
            return stock[2](tagged_graph_module, *args, **kwargs)
        finally:
            for gm in dict.fromkeys(stale):
                gm.recompile()
            stale.clear()

    stock = GroupBasedPartitioner._can_merge_partitions, lbm.legalize_graph, api._create_partitions_in_graph_module
    GroupBasedPartitioner._can_merge_partitions, lbm.legalize_graph = can_merge, legalize
    api._create_partitions_in_graph_module = create_partitions
    try:
        yield
    finally:
        GroupBasedPartitioner._can_merge_partitions, lbm.legalize_graph, api._create_partitions_in_graph_module = stock


@contextlib.contextmanager
def make_fx_without_module_patches():
    """Within the block, a ``make_fx`` trace does not patch ``nn.Module.__call__`` and ``__getattr__`` for its run.

    Every FX trace sets both on ``nn.Module`` and restores them after, and each assignment makes CPython update the
    call and attribute slots of every ``nn.Module`` subclass in the process (hundreds, with transformers loaded):
    about 3 ms each. ``to_executorch`` traces one small graph per mutating custom op (the decoder program's cache
    writes: 300 traces, 10.5 s of its 49 s under cProfile). For ``make_fx``'s own tracer the two patches do nothing:
    it calls every module as Python would and reads attributes as they are (``PythonKeyTracer.call_module`` and
    ``getattr``) and wraps no functions (no autowrap modules). A tracer that overrides either, and every other
    tracer, patches as before."""
    from torch.fx import _symbolic_trace as st
    from torch.fx.experimental.proxy_tensor import PythonKeyTracer

    state = threading.local()
    stock_trace, stock_patch = st.Tracer.trace, st._Patcher.patch_method

    def trace(self, *args, **kwargs):
        before = getattr(state, "plain", False)
        state.plain = (type(self).call_module is PythonKeyTracer.call_module and type(self).getattr is
                       PythonKeyTracer.getattr and not self._autowrap_function_ids)
        try:
            return stock_trace(self, *args, **kwargs)
        finally:
            state.plain = before

    def patch_method(self, cls, name, new_fn, deduplicate=True):
        if cls is torch.nn.Module and name in ("__call__", "__getattr__") and getattr(state, "plain", False):
            return None
        return stock_patch(self, cls, name, new_fn, deduplicate)

    st.Tracer.trace, st._Patcher.patch_method = trace, patch_method
    try:
        yield
    finally:
        st.Tracer.trace, st._Patcher.patch_method = stock_trace, stock_patch


PREPROCESS_WORKERS = 4  # each forked worker holds copies of the pieces it touches (copy on write)
_PIECES: list = []  # (program, compile specs) of every delegate piece, read by the forked workers of the block below


def _preprocess_piece(i: int):
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    program, specs = _PIECES[i]
    return XnnpackBackend.preprocess(program, specs)


@contextlib.contextmanager
def xnnpack_preprocess_in(workers: int):
    """Within the block, XNNPACK preprocesses the delegate pieces of all methods in ``workers`` processes at once.

    Preprocessing is Python graph passes over each piece alone (its own named data, nothing shared between pieces),
    about a third of lowering the Llama decode program before ``LLAMA_PROGRAM_SKIPPED_PASSES``; the pieces are handed
    to forked processes (which inherit them, so nothing but the serialized results crosses a pipe) and come back in
    order, the same bytes as one by one. ``workers`` <= 1, or a platform without fork, changes nothing."""
    import multiprocessing

    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield
        return

    def parallel(cls, edge_programs, compile_specs):
        names = list(edge_programs)
        _PIECES[:] = [(p, s) for m in names for p, s in zip(edge_programs[m], compile_specs[m])]
        try:
            if len(_PIECES) < 2:
                results = [_preprocess_piece(i) for i in range(len(_PIECES))]
            else:
                pool = multiprocessing.get_context("fork").Pool(min(workers, len(_PIECES)),
                                                                initializer=torch.set_num_threads, initargs=(1,))
                with pool:
                    results = pool.map(_preprocess_piece, range(len(_PIECES)), chunksize=1)
        finally:
            _PIECES.clear()
        out, k = {}, 0
        for m in names:
            out[m], k = results[k: k + len(edge_programs[m])], k + len(edge_programs[m])
        return out

    own = XnnpackBackend.__dict__.get("preprocess_multimethod")  # None: inherited from BackendDetails
    XnnpackBackend.preprocess_multimethod = classmethod(parallel)
    try:
        yield
    finally:
        if own is None:
            del XnnpackBackend.preprocess_multimethod
        else:
            XnnpackBackend.preprocess_multimethod = own


def xnnpack_partitioner(*, whole_ops: bool = True):
    """XNNPACK's partitioner; ``whole_ops``: one that spares ExecuTorch a decomposition pass where it can.

    XNNPACK names the ops it wants kept whole (``linear``, torchao's quantize ops) with a per-node check, and for
    such a partitioner ``to_edge_transform_and_lower`` decomposes every method three times (each a re-trace of the
    whole graph) to keep only the nodes the check accepts. Where the check accepts every node of those ops in the
    program, keeping them all is the same decision, and without the check ExecuTorch decomposes once less
    (tested: the same program; a quarter of the decomposition time of the Llama decode program)."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import ViewCopyConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class ViewOfNoBuffer(ViewCopyConfig):
        """A reshape of a buffer (the KV cache seen as one row) stays outside: ExecuTorch makes it a view of the
        buffer's memory, where inside a delegate it would be a copy of the whole cache at every call."""

        def check_constraints(self, node, ep) -> bool:
            base = node.args[0]
            if base.op == "call_function" and base.target is operator.getitem:  # a buffer a custom op wrote
                base = base.args[0]
                if base.op == "call_function" and str(base.target).startswith("auto_functionalized"):
                    return False
            if base.op == "placeholder" and base.name in ep.graph_signature.inputs_to_buffers:
                return False
            return super().check_constraints(node, ep)

    configs = [ViewOfNoBuffer if c is ViewCopyConfig else c for c in ALL_PARTITIONER_CONFIGS]

    class WholeOpsXnnpackPartitioner(XnnpackPartitioner):
        def ops_to_not_decompose(self, ep):
            ops, check = super().ops_to_not_decompose(ep)
            if check is not None and all(check(n) for n in ep.graph.nodes
                                         if n.op == "call_function" and n.target in ops):
                return ops, None
            return ops, check

    return WholeOpsXnnpackPartitioner(configs) if whole_ops else XnnpackPartitioner(configs)


def _lower_methods(methods: dict, *, quantized: bool, skip_passes: tuple[str, ...] = LLAMA_PROGRAM_SKIPPED_PASSES,
                   skip_edge_passes: tuple[str, ...] = LLAMA_PROGRAM_SKIPPED_EDGE_PASSES, whole_ops: bool = True,
                   lean_edge_passes: bool = True, workers: int | None = None):
    """Several exported methods -> one ExecuTorch program whose methods share their mutable buffers (the KV
    cache); (etpm, {method: delegation report}). ``skip_passes``, ``skip_edge_passes``, ``whole_ops``,
    ``lean_edge_passes`` and ``workers`` (processes that preprocess delegate pieces; default: one per core, at most
    ``PREPROCESS_WORKERS``) save lowering time and change nothing in the program (``xnnpack_passes_without``,
    ``edge_passes_without``, ``xnnpack_partitioner``, ``xnnpack_preprocess_in``; ``lean_edge_passes``:
    ``edge_passes_lean``, ``delegate_outputs_from_metadata``, ``partitioning_lean`` and
    ``make_fx_without_module_patches``)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    if workers is None:
        workers = min(len(os.sched_getaffinity(0)), PREPROCESS_WORKERS)
    lean = (edge_passes_lean, delegate_outputs_from_metadata, partitioning_lean, make_fx_without_module_patches)
    with torch.no_grad(), warnings.catch_warnings(), xnnpack_passes_without(skip_passes), \
            edge_passes_without(skip_edge_passes), xnnpack_preprocess_in(workers), contextlib.ExitStack() as stack:
        for shortcut in lean if lean_edge_passes else ():
            stack.enter_context(shortcut())
        warnings.simplefilter("ignore")
        edge = to_edge_transform_and_lower(methods, partitioner=[xnnpack_partitioner(whole_ops=whole_ops)],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        reports = {m: delegation_report(edge, m) for m in methods}
        et = edge.to_executorch(ExecutorchBackendConfig(
            do_quant_fusion_and_const_prop=quantized,
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True), emit_mutable_buffer_names=True))
    return et, reports


def _program_run(method_fn, prompt: torch.Tensor, cont: list[int], batch: int, vocab: int, chunk: int,
                 max_seq_len: int, greedy: bool = True) -> dict[str, torch.Tensor]:
    """Prefill ``prompt`` (1, n) in chunks, then decode teacher-forced: row 0 gets ``cont``, row r the token r places
    further in the vocabulary (rows differ), with one reversal of the rows (``reorder``) halfway; ``greedy``: then
    ``cont`` once more through the one-row ``step`` method.
    ``method_fn(name, args)`` runs a method (eager or program); returns the logits of the prefill and of every step."""
    from atomkit.deploy.program import prefill_chunks

    n = prompt.shape[1]
    for args in prefill_chunks(prompt[0].tolist(), chunk, max_seq_len):
        first = method_fn("prefill", args)
    rows = []
    for j, tok in enumerate(cont):
        pos = n + j
        if j == len(cont) // 2 and j > 0:  # beams move: row i becomes old row B-1-i at the generated positions
            method_fn("reorder", (torch.arange(batch).flip(0), torch.arange(n, pos)))
        toks = (torch.tensor([tok]) + torch.arange(batch)) % vocab
        rows.append(method_fn("forward", (toks[:, None], torch.tensor([pos]))))
    out = {"prefill_logits": first.reshape(1, -1), "decode_logits": torch.cat(rows) if rows else first[:0]}
    if greedy:  # the prompt again, then row 0 alone through ``step`` (every position it reads, it wrote anew)
        for args in prefill_chunks(prompt[0].tolist(), chunk, max_seq_len):
            method_fn("prefill", args)
        steps = [method_fn("step", (torch.tensor([[tok]]), torch.tensor([n + j]))) for j, tok in enumerate(cont)]
        out["step_logits"] = torch.cat(steps) if steps else first[:0]
    return out


# what ExecuTorch's LLM ops print on every eager call: their ATen wrappers give the kernels no scratch allocator
EAGER_OP_NOISE = b"No temp allocator provided"


@contextlib.contextmanager
def _native_stderr_without(noise: bytes):
    """Native code's writes to stderr (file descriptor 2) within the block, less the lines containing ``noise``
    (written out after the block). Python's own ``sys.stderr`` is flushed first and unaffected otherwise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = b"".join(line for line in tmp if noise not in line)
            if kept:
                os.write(2, kept)


def export_llama_program(decoder, out_dir, *, name: str, quant: str = "none", max_seq_len: int = 512,
                         batch: int = 4, model: str | None = None) -> ExportResult:
    """``LlamaDecodeProgram`` of a Llama decoder -> one ``.pte`` with methods forward, step, prefill, reorder, clear.

    Parity (teacher-forced, against the eager program of the same quantization, and fp32 for the record):
    the prompt's last logits, then ``PARITY_STEPS`` steps of all ``batch`` rows with a reorder halfway, and the same
    steps of row 0 alone (``step``)."""
    from atomkit.deploy.decoder_program import METHODS, LlamaDecodeProgram

    t0 = time.perf_counter()
    lm = decoder.lm.eval().cpu()
    fp32 = LlamaDecodeProgram(lm, batch=batch, max_seq_len=max_seq_len).eval()
    prog = _quantized(fp32, quant)
    prompt = decoder._ids(decoder.render([{"role": "user", "content": "Describe a video of a dog on a beach."}]))
    prompt = prompt[:, : max_seq_len // 2].cpu()
    chunk = prog.prefill_chunk
    with gc_paused():
        with torch.no_grad(), warnings.catch_warnings():
            # in executorch's meta kernels
            warnings.filterwarnings("ignore", message="_check_is_size", category=FutureWarning)
            methods = prog.export_methods()
        et, reports = _lower_methods(methods, quantized=quant != "none")
    path = _write(et, out_dir, name)
    save_tokenizer(decoder.tokenizer, path)
    seconds = time.perf_counter() - t0

    from atomkit.deploy.program import load_methods

    loaded = load_methods(path, METHODS)
    loaded["clear"].execute([])
    vocab = int(lm.config.vocab_size)
    steps = min(PARITY_STEPS, max_seq_len - prompt.shape[1] - 1)
    run = dict(batch=batch, vocab=vocab, chunk=chunk, max_seq_len=max_seq_len)

    def eager(module):
        def call(m, a):
            if m == "step":  # its reference: forward's row 0 with the token in every row (eager int8 rounds one row
                # alone differently from the same row among four: 30-35 dB apart for SmolLM2; XNNPACK's are equal)
                return module.forward(a[0].expand(batch, 1), a[1])[:1]
            return getattr(module, m)(*a)
        return call

    with torch.inference_mode(), _native_stderr_without(EAGER_OP_NOISE):
        prog.clear()
        cont = [int(_program_run(eager(prog), prompt, [], greedy=False, **run)["prefill_logits"].argmax())]
        for j in range(steps - 1):  # the eager program's own greedy continuation (row 0)
            toks = torch.full((batch, 1), cont[-1])
            cont.append(int(prog(toks, torch.tensor([prompt.shape[1] + j]))[0].argmax()))
        prog.clear()
        ref = _program_run(eager(prog), prompt, cont, **run)
        ref_fp32 = None
        if quant != "none":
            fp32.clear()
            ref_fp32 = _program_run(eager(fp32), prompt, cont, **run)
    got = _program_run(lambda m, a: loaded[m].execute(list(a))[0], prompt, cont, **run)
    par = parity(ref, got, quant != "none", fp32=ref_fp32)
    par["decode_steps"] = len(cont)
    layers = len(prog.layers)
    step = reports["forward"]
    delegation = dict(step, methods={m: {k: v for k, v in r.items() if k != "inside_ops"} for m, r in reports.items()},
                      pieces_per_layer=round(step["delegate_subgraphs"] / layers, 2), layers=layers)
    eos = lm.generation_config.eos_token_id
    side = _sidecar(path, delegation, name=name, model=model or type(lm).__name__, module="decoder", quant=quant,
                    program_kind="llama-custom-ops", methods=list(METHODS),
                    inputs={"tokens": {"shape": [batch, 1], "dtype": "int64"},
                            "cache_position": {"shape": [1], "dtype": "int64"}},
                    outputs={"logits": {"shape": [batch, vocab], "dtype": "float32"}},
                    method_inputs={"forward": {"tokens": [batch, 1], "cache_position": [1]},
                                   "step": {"tokens": [1, 1], "cache_position": [1]},
                                   "prefill": {"tokens": [1, chunk], "cache_position": [chunk], "last": [1]},
                                   "reorder": {"index": [batch], "cache_position": ["L"]}},
                    example_prompt_tokens=int(prompt.shape[1]), prefill="chunk", max_seq_len=max_seq_len,
                    max_prefill=chunk, batch=batch, beams=f"up to {batch}",
                    eos_token_id=eos, pad_token_id=decoder.tokenizer.pad_token_id, stop_at_eos=decoder.stop_at_eos,
                    parity=par, export_seconds=round(seconds, 2))
    return ExportResult(path, side, delegation, par, seconds)


def export_static_cache_decoder(decoder, out_dir, *, name: str, quant: str = "none", max_seq_len: int = 512,
                                model: str | None = None) -> ExportResult:
    """transformers' LM over its static KV cache, batch 1 (greedy only); prefill length dynamic (else token by
    token). The path for LMs ``LlamaDecodeProgram`` does not handle."""
    t0 = time.perf_counter()
    lm = decoder.lm.eval()
    qlm = _quantized(lm, quant).cpu()
    wrapper = _static_cache_module(qlm, max_seq_len)
    prompt = decoder._ids(decoder.render([{"role": "user", "content": "Describe a video of a dog on a beach."}]))
    prompt = prompt[:, : max_seq_len // 2].cpu()
    ids, pos = prompt, torch.arange(prompt.shape[1])
    try:
        seq = torch.export.Dim("seq", min=1, max=max_seq_len - 1)
        et, report = _lower(wrapper, (ids, pos), dynamic_shapes=({1: seq}, {0: seq}), strict=True,
                             init_buffers=["static_cache"], quantized=quant != "none")
        prefill = "dynamic"
    except Exception as e:  # noqa: BLE001 - fall back to one token per call
        warnings.warn(f"decoder: dynamic prefill did not export ({type(e).__name__}: {e}); token-by-token")
        wrapper = _static_cache_module(qlm, max_seq_len)
        et, report = _lower(wrapper, (ids[:, :1], pos[:1]), strict=True, init_buffers=["static_cache"],
                             quantized=quant != "none")
        prefill = "token"
    path = _write(et, out_dir, name)
    save_tokenizer(decoder.tokenizer, path)
    seconds = time.perf_counter() - t0

    # parity, teacher-forced: the prompt's last logits, then PARITY_STEPS decode steps fed with the eager
    # model's own greedy continuation, against the eager LM of the same quantization (and fp32 for the record).
    # One step alone is a noisy measure for a quantized LM (per position 12-31 dB for int8 SmolLM2).
    method = load_method(path)
    with torch.inference_mode():
        steps = min(PARITY_STEPS, max_seq_len - ids.shape[1] - 1)
        pad = decoder.tokenizer.pad_token_id if decoder.tokenizer.pad_token_id is not None else 0
        cont = qlm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                            do_sample=False, num_beams=1, pad_token_id=pad)[:, ids.shape[1]:]
        full = torch.cat([ids, cont], 1)
        n = ids.shape[1]
        ref = qlm(input_ids=full).logits[0, n - 1:]
        fp32 = None
        if quant != "none":
            f = lm(input_ids=full).logits[0, n - 1:]
            fp32 = {"prefill_logits": f[:1], "decode_logits": f[1:]}
    step_len = n if prefill == "dynamic" else 1
    for i in range(0, n, step_len):
        first = method.execute([ids[:, i:i + step_len], pos[i:i + step_len]])[0]
    rows = [first.reshape(1, -1)]
    for j, tok in enumerate(cont[0].tolist()):
        rows.append(method.execute([torch.tensor([[tok]]), torch.tensor([n + j])])[0].reshape(1, -1))
    got = torch.cat(rows)
    par = parity({"prefill_logits": ref[:1], "decode_logits": ref[1:]},
                 {"prefill_logits": got[:1], "decode_logits": got[1:]}, quant != "none", fp32=fp32)
    par["decode_steps"] = int(cont.shape[1])
    eos = lm.generation_config.eos_token_id
    side = _sidecar(path, report, name=name, model=model or type(lm).__name__, module="decoder", quant=quant,
                    inputs={"input_ids": {"shape": [1, "L"], "dtype": "int64"},
                            "cache_position": {"shape": ["L"], "dtype": "int64"}},
                    outputs={"logits": {"shape": [1, 1, int(got.shape[-1])], "dtype": "float32"}},
                    example_prompt_tokens=n, prefill=prefill, max_seq_len=max_seq_len,
                    max_prefill=max_seq_len - 1 if prefill == "dynamic" else 1, batch=1, beams="greedy only",
                    eos_token_id=eos, pad_token_id=decoder.tokenizer.pad_token_id, stop_at_eos=decoder.stop_at_eos,
                    parity=par, program_kind="static-cache", export_seconds=round(seconds, 2))
    return ExportResult(path, side, report, par, seconds)


# -- TorchScript (the paper's path) and load times ----------------------------------------------------
def trace_encoder_torchscript(encoder, path, *, frames: int = 6, size: int = 224) -> Path:
    """torch.jit.trace of the encoder (deprecated PyTorch Mobile path), saved atomically."""
    x = torch.randn(frames, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(encoder.eval().cpu(), x, check_trace=False), str(tmp))
    return Path(path)


_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
kind, target, frames, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "eager":
    from atomkit.models.registry import LoadOptions, get_spec
elif kind == "pte":
    from atomkit.deploy.program import load_method
x = torch.randn(frames, 3, size, size)
def load():
    if kind == "eager":
        return get_spec(target).load("encoder", LoadOptions())
    if kind == "torchscript":
        return torch.jit.load(target)
    return load_method(target)
def run(m):
    if kind == "pte":
        return m.execute([x])
    with torch.inference_mode():
        return m(x)
t1 = time.perf_counter(); m = load(); t2 = time.perf_counter(); run(m); t3 = time.perf_counter()
res = dict(import_s=t1 - t0, first_load_s=t2 - t1, first_inference_s=t3 - t2)
t1 = time.perf_counter(); m = load(); t2 = time.perf_counter(); run(m); t3 = time.perf_counter()
res.update(warm_load_s=t2 - t1, warm_inference_s=t3 - t2)
t1 = time.perf_counter(); run(m); res["steady_inference_s"] = time.perf_counter() - t1
print("PROBE" + json.dumps(res))
"""


def drop_page_cache() -> str | None:
    """Drop the OS page cache (Linux, root) so the next file read comes from disk; None when done, else why not."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return None
    except OSError as e:
        return f"cannot drop the page cache ({e.strerror or e}); loads may be served from memory"


def load_times(pte: Path | None = None, torchscript: Path | None = None, eager: str | None = None, *,
               frames: int = 6, size: int = 224, timeout: float = 600, cold: bool = False) -> dict:
    """Encoder load + first inference, each kind in a fresh Python process.

    "first" = the first load in a new process; "warm" = a second load in the same process; "steady" =
    a third inference. With ``cold`` the OS page cache is dropped before each process (needs root on
    Linux), so the first load reads the file from disk; otherwise the file may already be in memory.
    ``eager`` is a registry spec name ("default").
    """
    out: dict = {"cold": False}
    for kind, target in (("eager", eager), ("torchscript", torchscript), ("pte", pte)):
        if target is None:
            continue
        if cold:
            why = drop_page_cache()
            out["cold"] = why is None
            if why:
                out["cold_note"] = why
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _PROBE, kind, str(target), str(frames), str(size)],
                              capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")), None)
        if proc.returncode != 0 or line is None:
            out[kind] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            continue
        res = {k: round(v, 4) for k, v in json.loads(line[5:]).items()}
        res["process_wall_s"] = round(wall, 3)
        if kind != "eager":
            res["file_bytes"] = Path(target).stat().st_size
        out[kind] = res
    return out
