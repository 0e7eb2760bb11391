"""torchao int8 / int4 quantization of modules (atomkit.deploy.quant), checked by bytes, SQNR and export."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from atomkit.errors import InputError
from atomkit.deploy.quant import SCHEMES, is_quantized, quant_config, quantize_module, sqnr_db, weight_bytes
from atomkit.models.registry import LoadOptions, get_spec


def toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()


def toy_ids() -> torch.Tensor:
    return torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(1))


def lin_emb(b: dict) -> int:
    return b["linear"] + b["embedding"]


@pytest.fixture(scope="module")
def tiny():
    return get_spec("tiny-default")


# -- toy model --------------------------------------------------------------------------------------
def test_toy_bytes_int8_int4():
    base = weight_bytes(toy())
    q8 = weight_bytes(quantize_module(toy(), "int8"))
    q4 = weight_bytes(quantize_module(toy(), "int4"))
    q4p = weight_bytes(quantize_module(toy(), "int4"), packed=True)
    assert base["total"] == sum(p.numel() * 4 for p in toy().parameters())
    assert lin_emb(q8) <= 0.30 * lin_emb(base)
    # int4 values are stored one per int8 byte in eager (unpacked format): smaller only once packed
    assert q4p["linear"] < q8["linear"] and q4p["embedding"] < q8["embedding"]
    assert q4["linear"] > q8["linear"]
    assert weight_bytes(quantize_module(toy(), "int8"), packed=True) == q8  # nothing sub-byte in int8


def test_toy_int8_sqnr_and_report():
    ref_model, ids = toy(), toy_ids()
    ref = ref_model(ids)
    m = quantize_module(copy.deepcopy(ref_model), "int8")
    assert is_quantized(m[0].weight) and is_quantized(m[1].weight) and is_quantized(m[3].weight)
    assert m.atomkit_quant["linear"] == 2 and m.atomkit_quant["embedding"] == 1
    assert m.atomkit_quant["float_params"] == {"other": 256 + 64}  # the two biases stay float
    assert sqnr_db(ref, m(ids)) >= 30.0
    m4 = quantize_module(copy.deepcopy(ref_model), "int4")
    assert 12.0 <= sqnr_db(ref, m4(ids)) < sqnr_db(ref, m(ids))
    x = torch.randn(8, 64)
    assert sqnr_db(ref_model[1](x), m[1](x)) >= 30.0  # one Linear on random normal inputs


def test_none_scheme_is_identity():
    m = toy()
    before = weight_bytes(m)
    assert quantize_module(m, "none") is m
    assert weight_bytes(m) == before and not is_quantized(m[1].weight)
    assert quant_config("none", "linear") is None


def test_unknown_scheme_and_layer():
    with pytest.raises(InputError, match="int8"):
        quantize_module(toy(), "fp8")
    with pytest.raises(InputError, match="none, int8, int4"):
        quant_config("int2", "linear")
    with pytest.raises(InputError, match="embedding"):
        quant_config("int8", "conv")
    assert SCHEMES == ("none", "int8", "int4")


def test_int4_per_axis_fallback():
    m = nn.Sequential(nn.Linear(48, 64), nn.Linear(64, 8)).eval()
    x = torch.randn(3, 48)
    ref = m(x)
    quantize_module(m, "int4")
    assert m.atomkit_quant["per_axis_fallback"] == ["0"]
    assert m[0].weight.block_size == (1, 48) and m[1].weight.block_size == (1, 32)
    assert m[0].weight.target_dtype == torch.int4 and sqnr_db(ref, m(x)) > 10.0


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_toy_exports(scheme):
    m, ids = quantize_module(toy(), scheme), toy_ids()
    ep = torch.export.export(m, (ids,))
    assert "dequantize_affine" in str(ep.graph)
    assert "choose_qparams" in str(ep.graph)  # dynamic activation quantization is in the graph
    torch.testing.assert_close(ep.module()(ids), m(ids))


# -- tiny-default modules -----------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_tiny_decoder_quantized_generates(tiny, scheme):
    dec = tiny.load("decoder", LoadOptions())
    lm = dec.lm
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # tied in the float model
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = lm(ids).logits
    base = weight_bytes(dec)
    quantize_module(dec, scheme)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # still one (quantized) tensor
    assert is_quantized(lm.lm_head.weight)
    assert dec.atomkit_quant["tied"] == [["lm.model.embed_tokens", "lm.lm_head"]]
    q = weight_bytes(dec, packed=True)
    if scheme == "int8":
        assert lin_emb(q) <= 0.30 * lin_emb(base)
    else:
        assert lin_emb(q) <= 0.20 * lin_emb(base)
    with torch.inference_mode():
        out = lm(ids).logits
    # the tiny LM's wide random weights amplify 4-bit noise through its layers (int4 6.5 dB, int8 25 dB here); the
    # logits of another prompt are -2.9 dB from these, so a quantization that lost the weights would fail either bound
    assert sqnr_db(ref, out) > (20.0 if scheme == "int8" else 5.0)
    new = dec.generate_ids(ids, max_new_tokens=5, num_beams=1)
    assert new.shape == (5,)
    assert dec.generate_ids(ids, max_new_tokens=3, num_beams=2).shape == (3,)


def test_tiny_encoder_only_linear_quantized(tiny):
    enc = tiny.load("encoder", LoadOptions())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        feats, probs = enc(x)
    base = weight_bytes(enc)
    quantize_module(enc, "int8")
    rep = enc.atomkit_quant
    assert rep["linear"] == 1 and rep["embedding"] == 0 and is_quantized(enc.net._fc.weight)
    assert rep["float_params"]["conv"] > 3_000_000  # convolutions are not quantized (paper: Linear/Embedding)
    assert not any(is_quantized(m.weight) for m in enc.modules() if isinstance(m, nn.Conv2d))
    q = weight_bytes(enc)
    assert q["linear"] <= 0.30 * base["linear"] and q["other"] == base["other"]
    with torch.inference_mode():
        feats_q, probs_q = enc(x)
    torch.testing.assert_close(feats_q, feats)  # features come before the classifier head
    assert sqnr_db(probs, probs_q) > 20.0


def test_tiny_embedder_int8_keeps_embeddings(tiny):
    emb = tiny.load("embedder", LoadOptions())
    texts = ["a man rides a bike down a hill", "a rabbit in a meadow", "someone talks on the phone in a car"]
    ref = emb.embed(texts)
    base = weight_bytes(emb)
    quantize_module(emb, "int8")
    assert emb.atomkit_quant["embedding"] >= 1 and emb.atomkit_quant["linear"] >= 36
    got = emb.embed(texts)
    cos = (ref * got).sum(-1)
    assert float(cos.min()) > 0.95
    assert lin_emb(weight_bytes(emb)) <= 0.30 * lin_emb(base)


# -- sqnr_db ---------------------------------------------------------------------------------------------
def test_sqnr_db_basic():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    assert sqnr_db(x, x.clone()) == math.inf
    assert sqnr_db(x, torch.zeros_like(x)) == pytest.approx(0.0)
    assert sqnr_db(x, 0.9 * x) == pytest.approx(20.0)  # noise is 0.1 x: 10*log10(1/0.01)
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    with pytest.raises(ValueError):
        sqnr_db(x, x[:10])


def test_finite_sqnr_db_for_json():
    from atomkit.deploy.quant import finite_sqnr_db

    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    assert finite_sqnr_db(x, x.clone()) == 300.0 and finite_sqnr_db(torch.zeros(3), torch.ones(3)) == -300.0
    assert finite_sqnr_db(x, 0.9 * x) == pytest.approx(20.0)  # finite values pass unchanged
