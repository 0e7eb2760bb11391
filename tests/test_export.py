"""ExecuTorch export (.pte lowered to XNNPACK) of the tiny-default modules, and the host runtime wrappers."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from atomkit.deploy.export import SQNR_MIN_DB, export_decoder, export_embedder, export_encoder
from atomkit.deploy.loads import load_times, trace_encoder_torchscript
from atomkit.deploy.quant import sqnr_db
from atomkit.models.registry import LoadOptions, get_spec
from atomkit.deploy.runtime import PteDecoder, PteEmbedder, PteEncoder

pytestmark = pytest.mark.slow  # make test-fast leaves these out (see pyproject.toml)

FP32 = SQNR_MIN_DB["fp32"]


def _load(module):
    return get_spec("tiny-default").load(module, LoadOptions())


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pte")


@pytest.fixture(scope="module")
def encoder():
    return _load("encoder")


@pytest.fixture(scope="module")
def embedder():
    """all-MiniLM-L6-v2 cut to its first layer: the same ops, a fraction of the lowering time."""
    emb = _load("embedder")
    bert = emb.net.bert
    bert.encoder.layer = torch.nn.ModuleList(list(bert.encoder.layer)[:1])
    bert.config.num_hidden_layers = 1
    return emb


@pytest.fixture(scope="module")
def decoder():
    return _load("decoder")


@pytest.fixture(scope="module")
def enc_export(encoder, out_dir):
    return export_encoder(encoder, out_dir, name="encoder", model="tiny-default")


@pytest.fixture(scope="module")
def emb_export(embedder, out_dir):
    return export_embedder(embedder, out_dir, name="embedder", seq_len=32, model="tiny-default")


@pytest.fixture(scope="module")
def dec_export(decoder, out_dir):
    return export_decoder(decoder, out_dir, name="decoder", max_seq_len=128, model="tiny-default")


def _check_result(res, module):
    assert res.path.exists() and res.path.suffix == ".pte" and res.path.stat().st_size > 0
    side = json.loads(res.sidecar.read_text())
    assert res.sidecar == res.path.with_suffix(".json")
    assert side["module"] == module and side["quant"] == "none" and side["model"] == "tiny-default"
    assert side["file_bytes"] == res.path.stat().st_size
    assert {"torch", "torchao", "executorch", "transformers"} <= set(side["versions"])
    assert side["inputs"] and side["outputs"] and side["created"]
    assert res.delegation["delegated_ops"] > 0 and res.delegation["delegate_subgraphs"] >= 1
    assert side["delegation"]["non_delegated_ops"] == res.delegation["non_delegated_ops"]
    assert res.parity["passed"], res.parity
    assert side["parity"]["passed"] and side["parity"]["sqnr_min_db"] == FP32
    assert not list(res.path.parent.glob(".*tmp*")), "atomic writes left temp files"
    return side


def test_encoder_exports_with_sidecar_delegation_and_parity(enc_export):
    side = _check_result(enc_export, "encoder")
    assert side["inputs"]["x"] == {"shape": [6, 3, 224, 224], "dtype": "float32"}
    assert side["outputs"]["features"]["shape"] == [6, 1280] and side["outputs"]["probs"]["shape"] == [6, 1000]
    # EfficientNet-Lite0 (convs, ReLU6, BN folded, mean, linear, softmax) lowers whole to XNNPACK
    assert enc_export.delegation["non_delegated_ops"] <= 2, enc_export.delegation["outside_ops"]


def test_pte_encoder_matches_eager_encode(enc_export, encoder):
    pte = PteEncoder(enc_export.path, like=encoder)
    frames = torch.randint(0, 256, (1, 3, 6, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ref, got = encoder.encode(frames), pte.encode(frames)
    assert got.features.shape == ref.features.shape == (6, 1280)
    assert sqnr_db(ref.features, got.features) >= FP32
    assert [c for c, _ in got.concepts] == [c for c, _ in ref.concepts]
    with torch.inference_mode():  # a clip of 4 frames is padded to the program's 6 and cut back
        x = encoder.preprocess(frames[:, :, :4])
        ref_f, ref_p = encoder(x)
        got_f, got_p = pte(x)
    assert got_f.shape == (4, 1280) and sqnr_db(ref_f, got_f) >= FP32 and sqnr_db(ref_p, got_p) >= FP32


def test_load_times_in_a_fresh_process(enc_export):
    """The .pte runtime loads and runs in a new process (without importing the export stack)."""
    times = load_times(pte=enc_export.path)["pte"]
    assert "error" not in times, times.get("error")
    assert times["first_load_s"] >= 0 and times["first_inference_s"] > 0 and times["file_bytes"] > 0


def test_embedder_exports_and_pte_embedder_matches_eager(emb_export, embedder):
    side = _check_result(emb_export, "embedder")
    assert side["seq_len"] == 32 and side["dim"] == 384
    pte = PteEmbedder(emb_export.path, embedder.tokenizer, seq_len=32)
    texts = ["a dog runs on the beach", "a man rides a bicycle", "cartoon rabbit", "", "two cars"]
    ref, got = embedder.embed(texts), pte.embed(texts)
    assert got.shape == ref.shape == (5, 384)
    assert torch.allclose(got.norm(dim=1), torch.ones(5), atol=1e-4)
    assert (got * ref).sum(1).min() > 0.9999
    assert sqnr_db(ref, got) >= FP32
    assert pte.dim == 384 and pte.embed([]).shape == (0, 384)


def test_decoder_program_is_compact_and_multi_method(dec_export):
    """The Llama decoder lowers as LlamaDecodeProgram: five methods over one KV cache of 4 rows, each decode-step
    layer one XNNPACK piece between the custom cache/attention ops (a few pieces per layer, no portable-kernel
    arithmetic left in the step). The one-row ``step`` reads the cache through views that stay outside XNNPACK
    (inside a piece each would be a copy of a whole cache buffer per call)."""
    side = _check_result(dec_export, "decoder")
    assert side["max_seq_len"] == 128 and side["batch"] == 4 and side["prefill"] == "chunk" and side["max_prefill"] == 32
    methods = ["forward", "step", "prefill", "reorder", "clear"]
    assert side["program_kind"] == "llama-custom-ops" and side["methods"] == methods
    d, layers = dec_export.delegation, dec_export.delegation["layers"]
    assert layers == 2 and list(d["methods"]) == methods
    step = d["methods"]["step"]
    assert step["delegate_subgraphs"] <= 2 * layers + 1 and step["outside_ops"].get("view_copy.default") == 2 * layers
    assert "view_copy.default" not in d["outside_ops"]  # forward reads its cache rows as they are
    assert d["delegate_subgraphs"] <= 2 * layers + 1, d["outside_ops"]  # the decode step
    assert d["pieces_per_layer"] <= 2.5
    outside = d["outside_ops"]
    assert outside.get("llama.update_cache.default", 0) == 2 * layers and outside.get("llama.custom_sdpa.default") == layers
    assert d["non_delegated_ops"] <= 6 * layers + 8, outside
    assert d["methods"]["prefill"]["delegate_subgraphs"] <= 6 * layers + 4, d["methods"]["prefill"]["outside_ops"]
    assert side["parity"]["decode_steps"] >= 8  # teacher-forced rows that differ, with a reorder halfway
    assert side["parity"]["outputs"]["step_logits"]["sqnr_db"] >= 20.0  # row 0 alone, against forward's row 0



def test_the_lowering_shortcuts_change_nothing_in_the_decoder_program(decoder, monkeypatch):
    """What the decoder program's lowering skips or spreads for time (XNNPACK and ExecuTorch passes that rewrite
    nothing it holds, the decomposition pass the per-node op check costs, two re-tracing renames done in place,
    delegate outputs made from recorded shapes, a set test for cycles when pieces merge, the method's code generated
    once after its pieces are fused, the pieces preprocessed in two forked processes) changes nothing:
    the int8 program (dynamic-quantized linears, the fused q/k/v and gate/up weights, the one-row step's cache
    views) is byte for byte the one the stock lowering gives, one piece after another in this process."""
    from executorch.backends.xnnpack._passes import XNNPACKPassManager
    import executorch.exir.lowered_backend_module as lbm
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig
    from executorch.exir.backend.canonical_partitioners.group_partitioner import GroupBasedPartitioner
    from executorch.exir.passes.memory_format_ops_pass import MemoryFormatOpsPass
    from executorch.exir.passes.replace_aten_with_edge_pass import OpReplacePass
    from executorch.exir.passes.scalar_to_tensor_pass import ScalarToTensorPass
    from executorch.exir.program._program import _get_aten_to_edge_passes, edge_to_executorch_passes
    from torch._export.passes import ReplaceViewOpsWithViewCopyOpsPass

    from atomkit.deploy.decoder_program import LlamaDecodeProgram
    from atomkit.deploy.lowering import (LLAMA_PROGRAM_SKIPPED_EDGE_PASSES, LLAMA_PROGRAM_SKIPPED_PASSES, _lower_methods,
                                         _quantized, xnnpack_partitioner)
    from atomkit.deploy.patches import _pass_name

    every = {p.__name__ for p in XNNPACKPassManager(None).passes}
    assert set(LLAMA_PROGRAM_SKIPPED_PASSES) <= every  # a renamed pass would silently be run again
    edge = [*_get_aten_to_edge_passes(EdgeCompileConfig())[0], *edge_to_executorch_passes(ExecutorchBackendConfig())]
    assert set(LLAMA_PROGRAM_SKIPPED_EDGE_PASSES) <= {_pass_name(p) for p in edge}
    prog = _quantized(LlamaDecodeProgram(decoder.lm, batch=2, max_seq_len=64), "int8")
    with torch.no_grad():  # the shortcut applies: XNNPACK's check accepts every linear, so no check is passed on
        ops, check = xnnpack_partitioner().ops_to_not_decompose(prog.export_methods()["forward"].run_decompositions({}))
    assert torch.ops.aten.linear.default in ops and check is None
    sorts = []

    def deferred(gm, _stock=lbm.legalize_graph):
        sorts.append("recompile" in gm.__dict__)  # partitioning_lean's stand-in for the graph setter's regeneration
        return _stock(gm)

    programs = []
    for shortcuts in (True, False):
        with torch.no_grad():
            methods = {m: ep for m, ep in prog.export_methods().items() if m in ("forward", "step", "clear")}
        with monkeypatch.context() as mp:
            if shortcuts:  # the stock renames, the passes with nothing to do and the op-by-op run of a delegate's
                # graph on fake tensors do not run (else a shortcut silently went away)
                for stock in (ScalarToTensorPass, MemoryFormatOpsPass, OpReplacePass, ReplaceViewOpsWithViewCopyOpsPass):
                    mp.setattr(stock, "call_operator", _raises(stock.__name__))
                mp.setattr(importlib.import_module("torch._higher_order_ops.executorch_call_delegate"),
                           "call_delegate_cpu", _raises("call_delegate_cpu"))
                mp.setattr(GroupBasedPartitioner, "_can_merge_partitions", _raises("_can_merge_partitions"))
                mp.setattr(lbm, "legalize_graph", deferred)  # each re-sort leaves the module's code for later
            et, reports = _lower_methods(methods, quantized=True, skip_passes=LLAMA_PROGRAM_SKIPPED_PASSES if shortcuts
                                         else (), skip_edge_passes=LLAMA_PROGRAM_SKIPPED_EDGE_PASSES if shortcuts
                                         else (), whole_ops=shortcuts, lean_edge_passes=shortcuts,
                                         workers=2 if shortcuts else 1)
        assert reports["forward"]["delegate_subgraphs"] >= 2  # the linears are in XNNPACK pieces
        programs.append(et.buffer)
    assert programs[0] == programs[1]
    assert len(sorts) >= 3 and all(sorts), sorts  # every piece fused without regenerating the method's code


def _raises(name):
    def ran(*args, **kwargs):
        raise AssertionError(f"{name} ran")
    return ran


def test_lean_edge_passes_run_a_needed_pass_and_change_nothing(monkeypatch, tmp_path):
    """A method with a Python number for a tensor operand and an int-to-float copy (the decoder program has neither)
    gets ExecuTorch's scalar-to-tensor and memory-format passes from the lean lowering too: the same program as the
    stock lowering's, and it computes what the module does."""
    from executorch.exir.passes.memory_format_ops_pass import MemoryFormatOpsPass
    from executorch.exir.passes.scalar_to_tensor_pass import ScalarToTensorPass

    from atomkit.deploy.lowering import _lower_methods
    from atomkit.deploy.program import load_method

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, pos):
            return self.lin(x) * 0.5 + pos.float()

    torch.manual_seed(0)
    module, args = Scaled().eval(), (torch.randn(2, 8), torch.tensor([3, 7]).view(2, 1))
    ran = {ScalarToTensorPass: 0, MemoryFormatOpsPass: 0}
    for cls in ran:
        def counted(self, op, *a, _cls=cls, _stock=cls.call_operator, **k):
            ran[_cls] += 1
            return _stock(self, op, *a, **k)
        monkeypatch.setattr(cls, "call_operator", counted)
    programs = []
    for lean in (True, False):
        with torch.no_grad():
            ep = torch.export.export(module, args, strict=False)
        et, _ = _lower_methods({"forward": ep}, quantized=False, lean_edge_passes=lean, workers=1)
        programs.append(et.buffer)
        if lean:
            assert all(ran.values()), ran  # the method needs both, so both ran
    assert programs[0] == programs[1]
    path = tmp_path / "scaled.pte"
    path.write_bytes(programs[0])
    got = load_method(path).execute(list(args))[0]
    torch.testing.assert_close(got, module(*args))


def test_make_fx_without_module_patches_traces_the_same_graph():
    """Under ``make_fx_without_module_patches`` a ``make_fx`` trace leaves ``nn.Module.__call__`` as it is and gives
    the graph the patched trace gives (a module call inside); FX's own symbolic tracer still patches, so a leaf
    module stays a ``call_module`` node."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from atomkit.deploy.patches import make_fx_without_module_patches

    torch.manual_seed(0)
    lin, stock_call, seen = torch.nn.Linear(4, 3), torch.nn.Module.__call__, []

    def f(x):
        seen.append(torch.nn.Module.__call__ is stock_call)
        return lin(x).relu() * 2

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x) + 1

    x = torch.randn(2, 4)
    with make_fx_without_module_patches():
        lean = make_fx(f)(x)
        symbolic = torch.fx.symbolic_trace(Outer())
    stock = make_fx(f)(x)
    assert seen == [True, False]  # the lean trace left nn.Module alone; the stock one patched it
    assert lean.code == stock.code and "addmm" in lean.code
    torch.testing.assert_close(lean(x), f(x))
    assert [n.op for n in symbolic.graph.nodes].count("call_module") == 1  # the Linear, a leaf of the symbolic trace
    assert torch.nn.Module.__call__ is stock_call


def _prompts(decoder):
    texts = ["A classifier saw: golden retriever (0.81), seashore (0.10). Write one short sentence describing it.",
             "A classifier saw: sports car (0.62), race track (0.20). Write one short sentence describing it."]
    return [decoder._ids(decoder.render([{"role": "user", "content": t}])) for t in texts]


def test_pte_decoder_greedy_and_beam4_equal_the_exact_engine(dec_export, decoder):
    """Greedy and beam 4 on the program give the exact eager engine's tokens, for two prompts whose tokens differ."""
    pte = PteDecoder(dec_export.path, like=decoder)
    seen = {}
    for beams in (1, 4):
        for i, ids in enumerate(_prompts(decoder)):
            ref = decoder.generate_ids(ids, max_new_tokens=12, num_beams=beams, backend="torch")  # exact engine
            got = pte.generate_ids(ids, max_new_tokens=12, num_beams=beams)
            assert got.tolist() == ref.tolist() and len(got) == 12, (beams, i)
            seen[beams, i] = tuple(got.tolist())
    assert seen[1, 0] != seen[1, 1] and seen[4, 0] != seen[4, 1]
    assert seen[4, 0] != seen[1, 0] or seen[4, 1] != seen[1, 1]  # beam search is not greedy here
    assert pte.greedy_fallbacks == 0
    msgs = [{"role": "user", "content": "Write one short sentence about a dog."}]
    assert pte.chat(msgs, max_new_tokens=5) == decoder.chat(msgs, max_new_tokens=5, backend="torch")
    from atomkit.errors import AtomkitError, InputError

    with pytest.warns(UserWarning, match="greedy"):  # more beams than rows: greedy (documented)
        wide = pte.generate_ids(_prompts(decoder)[0], max_new_tokens=4, num_beams=8)
    assert wide.tolist() == list(seen[1, 0][:4]) and pte.greedy_fallbacks == 1
    with pytest.raises(AtomkitError, match="decoder-batch 5"):
        PteDecoder(dec_export.path, like=decoder, strict_beams=True).generate_ids(_prompts(decoder)[0],
                                                                                   max_new_tokens=2, num_beams=5)
    with pytest.raises(InputError, match="static cache"):
        pte.generate_ids(_prompts(decoder)[0], max_new_tokens=200, num_beams=1)


def _four_rows(dec_export, decoder):
    """The program, a prompt's ids and length n, four different tokens (one per row) and one token in every row."""
    pte = PteDecoder(dec_export.path, like=decoder)
    ids = _prompts(decoder)[0][0].tolist()
    return pte, ids, len(ids), torch.tensor([5, 17, 29, 41]), torch.tensor([7, 7, 7, 7])


def test_program_reorder_moves_cache_rows(dec_export, decoder):
    """reorder(index) makes row i continue old row index[i]: four rows fed different tokens, reversed, then fed one
    token, give the logits of rows fed the reversed tokens directly (and the rows' logits differ)."""
    pte, ids, n, a, b = _four_rows(dec_export, decoder)
    with pte.generation():
        pte._prefill(ids)
        pte._forward(a, n)
        pte._forward(b, n + 1)  # written at n + 1 and then overwritten below: positions past the reorder are not read
        pte._reorder(torch.tensor([3, 2, 1, 0]), n, n + 1)
        moved = pte._forward(b, n + 1)
        pte._prefill(ids)
        pte._forward(a.flip(0), n)
        direct = pte._forward(b, n + 1)
    assert torch.allclose(moved, direct, atol=1e-5)
    assert not torch.allclose(moved[0], moved[3], atol=1e-3)
    from atomkit.deploy.runtime import PteStepper

    stepper = PteStepper(pte)  # the engine's view: one prompt, rows after prefill are equal until a step
    stepper.reset(4, n + 4)
    logits = stepper.prefill(torch.tensor([ids]))
    assert logits.shape == (1, pte.meta["outputs"]["logits"]["shape"][1]) and stepper.same_rows
    assert stepper.step(a[:2], n).shape[0] == 2 and not stepper.same_rows


def test_program_step_decodes_row_0_alone(dec_export, decoder):
    """``step`` (one token) continues row 0 of the cache: after four rows fed different tokens, a step gives row 0's
    logits of ``forward`` fed the same token (and not another row's: their logits differ), and greedy decoding on the
    engine's stepper runs ``step``, not ``forward``."""
    pte, ids, n, a, b = _four_rows(dec_export, decoder)
    with pte.generation():
        pte._prefill(ids)
        pte._forward(a, n)
        rows = pte._forward(b, n + 1)
        pte._prefill(ids)
        pte._forward(a, n)
        one = pte._forward(b[:1], n + 1)
    assert one.shape == (1, rows.shape[1]) and torch.allclose(one[0], rows[0], atol=1e-5)
    assert not torch.allclose(rows[0], rows[1], atol=1e-3) and not torch.allclose(rows[0], rows[3], atol=1e-3)

    calls = {"forward": 0, "step": 0}

    class Counted:
        def __init__(self, name):
            self.name, self.method = name, pte._methods[name]

        def execute(self, args):
            calls[self.name] += 1
            return self.method.execute(args)

    pte._methods["step"], pte._method = Counted("step"), Counted("forward")
    greedy = pte.generate_ids(_prompts(decoder)[1], max_new_tokens=6, num_beams=1)
    assert calls == {"forward": 0, "step": 5} and len(greedy) == 6  # the first token comes from the prefill
    pte.generate_ids(_prompts(decoder)[1], max_new_tokens=6, num_beams=4)
    assert calls["forward"] >= 5 and calls["step"] == 5


def test_pte_decoder_serialises_whole_generations(dec_export, decoder):
    """Eight threads generate on one program at once: its KV cache holds one sequence from prefill to the last
    step, so each thread must get the tokens its prompt gets alone (the prompts' tokens differ)."""
    from conftest import run_threads

    pte = PteDecoder(dec_export.path, like=decoder)
    texts = ("a cat", "a dog jumps over the fence", "sunset over the sea today", "two people talk in a car")
    prompts = [decoder._ids(decoder.render([{"role": "user", "content": t}])) for t in texts]
    alone = [pte.generate_ids(p, max_new_tokens=10, num_beams=1).tolist() for p in prompts]
    assert len({tuple(a) for a in alone}) == 4
    counter = iter(range(8))

    def worker():
        i = next(counter) % 4
        return i, pte.generate_ids(prompts[i], max_new_tokens=10, num_beams=1).tolist()

    for i, got in run_threads(8, worker):
        assert got == alone[i], texts[i]


def test_bench_decode_times_a_program_beside_the_engines(decoder, out_dir):
    """`bench_decode(programs=...)` runs the decoder program as contender pte-<quant> on the same prompts: its greedy
    and beam-4 tokens equal generate's (the tiny program is fp32), it runs the pipeline's decoder work, and it has no
    several-prompt batch (one prompt at a time); a folder without a decoder program is refused by name."""
    from atomkit.bench.decode import bench_decode
    from atomkit.errors import InputError

    folder = out_dir / "long"  # the bench's script prompt needs a longer cache than dec_export's
    export_decoder(decoder, folder, name="decoder", max_seq_len=1024, model="tiny-default")
    r = bench_decode("tiny-default", backends=["torch"], new_tokens=(3, 5), repeats=1, llama_cpp=False,
                     caption_tokens=4, script_tokens=4, batch=2, profile_steps=0, progress=False,
                     programs=[folder])
    assert list(r["tok_s"]) == ["hf_generate", "torch", "pte-none"]
    assert r["tok_s"]["pte-none"] > 0 and r["prefill_s"]["pte-none"] > 0
    assert r["greedy_agreement_with_hf"]["pte-none"]["equal"] and r["caption_beam4_equal_hf"]["pte-none"]
    assert r["script_greedy_equal_hf"]["pte-none"]
    assert r["grounded_clips_per_s"]["pte-none"] > 0 and r["structured_script_s"]["pte-none"] > 0
    assert r["batch2_tok_s"]["pte-none"] is None and r["batch2_tok_s"]["torch"] > 0
    assert "decoder.pte" in r["backends"]["pte-none"]
    empty = out_dir / "no-programs"
    empty.mkdir(exist_ok=True)
    with pytest.raises(InputError, match="no decoder program.*--only decoder"):
        bench_decode("tiny-default", backends=["torch"], llama_cpp=False, progress=False, programs=[empty])


def test_export_and_runtime_do_not_import_each_other():
    """Both build on atomkit.deploy.program; a program runs without the export stack imported."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "atomkit" / "deploy"
    for mod, other in (("export", "runtime"), ("runtime", "export"), ("runtime", "lowering"), ("runtime", "patches")):
        tree = ast.parse((root / f"{mod}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert f"atomkit.deploy.{other}" not in imported, f"atomkit.deploy.{mod} imports atomkit.deploy.{other}"
    code = "import sys, atomkit.deploy.runtime; print('atomkit.deploy.export' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_torchscript_trace_matches_eager(encoder, tmp_path):
    path = trace_encoder_torchscript(encoder, tmp_path / "encoder.ts")
    traced = torch.jit.load(str(path))
    x = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref, got = encoder(x), traced(x)
    for r, g in zip(ref, got):
        assert sqnr_db(r, g) >= 60


def test_int8_dynamic_length_embedder(embedder, tmp_path):
    pytest.importorskip("atomkit.deploy.quant")
    res = export_embedder(embedder, tmp_path, name="embedder_int8", quant="int8", seq_len=32, dynamic_seq=True)
    side = json.loads(res.sidecar.read_text())
    assert side["quant"] == "int8" and side["parity"]["sqnr_min_db"] == SQNR_MIN_DB["quantized"]
    assert side["dynamic_seq"] is True
    assert res.parity["passed"], res.parity  # int8 embedding (embedding_byte kernel) + int8 dynamic linears
    assert not hasattr(embedder.net, "atomkit_quant"), "the caller's embedder must stay fp32"
    texts = ["a dog runs on the beach at sunset with its owner", "two cars", ""]  # 3 lengths, one program
    assert sqnr_db(embedder.embed(texts), PteEmbedder(res.path, embedder.tokenizer).embed(texts)) >= 20


def test_private_api_patches_are_registered_and_skip_on_other_versions(monkeypatch):
    """Every patch of a private function is named in one table with what it replaces; on versions other than those
    it was written for, entering it changes nothing (the stock path) and one warning says why."""
    from torch.fx import _symbolic_trace as st

    from atomkit.deploy import patches

    assert set(patches.PATCHES) == {"xnnpack_passes_without", "edge_passes_without", "edge_passes_lean",
                                    "delegate_outputs_from_metadata", "partitioning_lean",
                                    "make_fx_without_module_patches", "xnnpack_preprocess_in"}
    assert all(":" in why and len(why) > 40 for why in patches.PATCHES.values())
    stock = st.Tracer.trace
    assert patches.version_mismatch() is None  # the pinned versions: the patches apply
    with patches.make_fx_without_module_patches():
        assert st.Tracer.trace is not stock
    assert st.Tracer.trace is stock
    monkeypatch.setitem(patches.WRITTEN_FOR, "executorch", "0.0.1")
    monkeypatch.setattr(patches, "_warned", set())
    with pytest.warns(RuntimeWarning, match="written for executorch 0.0.1.*stock path"):
        with patches.make_fx_without_module_patches():
            assert st.Tracer.trace is stock
