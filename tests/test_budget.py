"""A module's size before it loads (atomkit.pipeline.budget.footprint) and the session's memory budget."""
from __future__ import annotations

import pytest

import atomkit
from atomkit.pipeline.budget import MIB, MemoryBudgetError, footprint
from atomkit.cli import main
from atomkit.pipeline.session import module_bytes


@pytest.mark.parametrize("quant, backend", [("none", "torch"), ("none", "int8"), ("none", "int4"), ("none", "fused"),
                                            ("int8", "hf"), ("int4", "hf")])
def test_footprint_is_what_the_loaded_module_holds(quant, backend):
    with atomkit.Session("tiny-default", device="cpu", quant=quant, decode=atomkit.DecodeConfig(backend=backend)) as s:
        for module in ("encoder", "decoder", "embedder"):
            before = footprint(s.spec, module, s.options, quant=quant, backend=backend)
            assert s.loaded().count(module) == 0  # measured without loading
            assert before.total == module_bytes(s.get(module))[1] == s.load_report()[module]["bytes"], module
            if module == "decoder" and backend in ("int8", "int4", "fused"):
                assert before.engine > 0  # packed weights, bf16 copies or fused matrices are counted


@pytest.mark.integration
def test_footprint_of_the_default_models(monkeypatch):
    monkeypatch.setattr("atomkit.decode.llama.native_bf16", lambda: True)  # bf16 prefill copies, as on an AVX512-BF16 CPU
    with atomkit.Session("default", device="cpu", decode=atomkit.DecodeConfig(backend="int4")) as s:
        sizes = {m: footprint(s.spec, m, s.options, backend="int4") for m in ("encoder", "decoder", "embedder")}
        for m, f in sizes.items():
            assert module_bytes(s.get(m))[1] == f.total, m
        # SmolLM2-135M on the int4 engine: the LM keeps its fp32 token table (49152 x 576: 108 MiB) and norms, its
        # layer matrices are released; the engine holds packed int4 weights, the head and bf16 prefill copies
        assert 107 < sizes["decoder"].weights / MIB < 110 and 250 < sizes["decoder"].engine / MIB < 350


@pytest.mark.integration
def test_footprint_on_first_use_converts_outside_the_meta_device(tmp_path):
    """The first use of SmolLM2 converts its GGUF file; sizing the decoder before any load does it too (it once
    raised transformers' "from_pretrained with a meta device context" error on a fresh cache)."""
    opts = atomkit.models.registry.LoadOptions(cache=tmp_path)
    f = footprint(atomkit.models.registry.get_spec("default"), "decoder", opts, backend="torch")
    assert 500 < f.total / MIB < 520  # 134.5 M fp32 parameters, tied head
    from safetensors import safe_open

    with safe_open(str(tmp_path / "smollm2-135m-instruct" / "model.safetensors"), "pt") as st:
        table = st.get_tensor("lm_head.weight")  # tied to the token table: stored once
    assert table.shape == (49152, 576) and table.device.type == "cpu" and table.abs().sum() > 0  # real weights


def test_a_module_that_would_not_fit_is_refused_before_it_loads(samples):
    need = {m: footprint(atomkit.models.registry.get_spec("tiny-default"), m, atomkit.models.registry.LoadOptions()).total
            for m in ("encoder", "decoder", "embedder")}
    budget = (need["encoder"] + need["decoder"] // 2) / MIB  # the encoder fits, the decoder does not
    with atomkit.Session("tiny-default", device="cpu", memory_budget_mib=budget) as s:
        with pytest.raises(MemoryBudgetError) as e:
            s.caption([samples["carphone_pristine.mp4"]])
        assert s.loaded() == ["encoder"]  # the decoder was refused before anything of it was read
    msg = str(e.value)
    assert f"loading the decoder of 'tiny-default' needs {need['decoder'] / MIB:.0f} MiB" in msg
    assert f"{need['encoder'] / MIB:.0f} MiB resident (encoder)" in msg
    assert "what would fit: torchao int8 weights (Session(quant='int8'))" in msg  # int8 decoder: ~1/3 the bytes


def test_memory_budget_from_the_command_line(samples, capsys):
    argv = ["caption", str(samples["carphone_pristine.mp4"]), "--models", "tiny-default", "--device", "cpu", "--exact",
            "--memory-budget", "20", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # the encoder (18 MiB) fits in 20 MiB, the decoder (8 MiB) no longer does
    assert err.startswith("atomkit: error: loading the decoder of 'tiny-default' needs 8 MiB but the memory budget "
                          "is 20 MiB with 18 MiB resident (encoder)"), err
    assert "Traceback" not in err
    assert main([*argv[:-3], "--memory-budget", "0", "-q"]) == 2
    assert "memory budget must be a number of MiB > 0" in capsys.readouterr().err


def test_a_packed_engine_releases_the_float_matrices_and_decodes_the_same(monkeypatch):
    import torch

    monkeypatch.setattr("atomkit.decode.llama.native_bf16", lambda: True)  # bf16 prefill copies: the engine needs no matrix

    from atomkit.errors import AtomkitError
    from atomkit.models.registry import LoadOptions, get_spec

    kept = get_spec("tiny-default").load("decoder", LoadOptions())  # loaded outside a session: nothing released
    with atomkit.Session("tiny-default", device="cpu", decode=atomkit.DecodeConfig(backend="int4")) as s:
        lean = s.get("decoder")
        layer_matrices = sum(m.weight.numel() * 4 for m in kept.lm.model.layers.modules()
                             if isinstance(m, torch.nn.Linear))
        from atomkit.deploy.quant import weight_bytes

        assert weight_bytes(kept)["total"] - weight_bytes(lean)["total"] == layer_matrices
        assert all(m.weight.device.type == "meta" for m in lean.lm.model.layers.modules()
                   if isinstance(m, torch.nn.Linear))
        ids = lean._ids("a dog runs on the beach")
        same = kept.generate_ids(ids, max_new_tokens=8, num_beams=2, backend="int4")
        assert torch.equal(lean.generate_ids(ids, max_new_tokens=8, num_beams=2, backend="int4"), same)
        with pytest.raises(AtomkitError, match="keeps only what decode backend 'int4' needs"):
            lean.engine("torch")


def test_a_packed_engine_that_prefills_in_fp32_keeps_the_float_matrices(monkeypatch):
    """On a CPU without native bf16 the quantized engines prefill with the LM's fp32 matrices: nothing is released,
    the footprint counts them, and the other backends still decode."""
    import torch

    monkeypatch.setattr("atomkit.decode.llama.native_bf16", lambda: False)
    with atomkit.Session("tiny-default", device="cpu", decode=atomkit.DecodeConfig(backend="int4")) as s:
        dec = s.get("decoder")
        assert not any(m.weight.device.type == "meta" for m in dec.lm.modules() if isinstance(m, torch.nn.Linear))
        assert module_bytes(dec)[1] == footprint(s.spec, "decoder", s.options, backend="int4").total
        ids = dec._ids("a dog runs on the beach")
        assert dec.generate_ids(ids, max_new_tokens=4, num_beams=1, backend="torch").shape == (4,)
