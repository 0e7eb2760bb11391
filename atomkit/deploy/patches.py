"""Every patch of a private ExecuTorch or torch function that atomkit makes, in one place.

Each patch is a context manager that replaces a private function or class attribute for the length of a block and
restores it after. Each only saves lowering time: the program it gives is the program the stock path gives (the
tests compare them byte for byte). They were written against the versions in ``WRITTEN_FOR``; with any other
version installed, every patch is skipped and the stock path runs (slower, the same program), and one warning says
so. ``PATCHES`` names each patch, what it replaces and why.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings

import torch

WRITTEN_FOR = {"executorch": "1.5.1", "torch": "2.13.0"}
PATCHES: dict[str, str] = {}  # patch name -> "what it replaces: why" (filled by @_guarded below)
_warned: set[str] = set()


def version_mismatch() -> str | None:
    """Why the patches do not apply here (None: the installed versions are those they were written for)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg, want in WRITTEN_FOR.items():
        try:
            found[pkg] = version(pkg).split("+")[0]
        except PackageNotFoundError:
            found[pkg] = None
    off = {pkg: v for pkg, v in found.items() if v != WRITTEN_FOR[pkg]}
    if not off:
        return None
    return ("atomkit's lowering shortcuts were written for " + ", ".join(f"{p} {v}" for p, v in WRITTEN_FOR.items())
            + "; found " + ", ".join(f"{p} {v}" for p, v in off.items())
            + ": lowering takes the stock path (slower, the same program)")


def _guarded(replaces: str):
    """Make a generator a context manager that patches only on the versions in ``WRITTEN_FOR``, and register it."""
    def wrap(gen):
        patch = contextlib.contextmanager(gen)
        PATCHES[gen.__name__] = f"{replaces}: " + " ".join((gen.__doc__ or "").strip().split("\n\n")[0].split())

        @functools.wraps(gen)
        @contextlib.contextmanager
        def guarded(*args, **kwargs):
            why = version_mismatch()
            if why is not None:
                if why not in _warned:
                    _warned.add(why)
                    warnings.warn(why, RuntimeWarning, stacklevel=3)
                yield
                return
            with patch(*args, **kwargs):
                yield
        return guarded
    return wrap


def _pass_name(p) -> str:
    """A pass's class name (ExecuTorch wraps some passes in a function that keeps the pass as ``__wrapped__``)."""
    return type(getattr(p, "__wrapped__", p)).__name__




@_guarded('executorch XNNPACKPassManager.__init__')
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


@_guarded('executorch.exir.program._program: _get_aten_to_edge_passes, edge_to_executorch_passes')
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


@_guarded('executorch.exir.program._program: ReplaceViewOpsWithViewCopyOpsPass, OpReplacePass, MemoryFormatOpsPass, _get_aten_to_edge_passes')
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


@_guarded('torch._higher_order_ops.executorch_call_delegate.call_delegate_cpu')
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


@_guarded('executorch GroupBasedPartitioner._can_merge_partitions, lowered_backend_module.legalize_graph, backend_api._create_partitions_in_graph_module')
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


@_guarded('torch.fx._symbolic_trace: Tracer.trace, _Patcher.patch_method')
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


@_guarded('executorch XnnpackBackend.preprocess_multimethod')
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
