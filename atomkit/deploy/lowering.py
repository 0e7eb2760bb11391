"""Lowering modules to ExecuTorch programs: ``torch.export`` -> edge + XNNPACK -> ``.to_executorch()``, the
delegation report, the XNNPACK partitioner atomkit uses, and the shortcuts that make lowering the Llama decode
program fast (the private-API ones live in ``atomkit.deploy.patches``)."""
from __future__ import annotations

import contextlib
import copy
import gc
import operator
import os
import warnings

import torch
from torch import nn

from atomkit.deploy.patches import (PREPROCESS_WORKERS, delegate_outputs_from_metadata, edge_passes_lean,
                                    edge_passes_without, make_fx_without_module_patches, partitioning_lean,
                                    xnnpack_passes_without, xnnpack_preprocess_in)


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



# ExecuTorch's own edge passes that rewrite nothing a Llama decode program holds: transposes to normalise, in-place
# or broken ops to make functional, symbolic ints to make tensors, operands of mixed dtypes, and dim-order copies to
# legalise for portable kernels. Each re-traces every method whole on fake tensors (SmolLM2 cut to 4 layers: about
# 1.5 s each of a 34 s lowering; tested: the program is byte-identical without them).
LLAMA_PROGRAM_SKIPPED_EDGE_PASSES = ("NormalizeTransposePass", "ReplaceBrokenOpsWithFunctionalOpsPass",
                                     "SymToTensorPass", "RemoveMixedTypeOperators", "LegalizePortableDimOrderPass")



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
