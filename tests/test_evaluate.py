"""A quantized session checked against fp32 by numbers (the tiny test models)."""
from __future__ import annotations

import json

import pytest

import atomkit
from atomkit.evaluation.parity import quant_report


@pytest.mark.slow
def test_int8_quant_report_tiny(samples):
    decode = atomkit.DecodeConfig(max_new_tokens=4, num_beams=1)
    r = quant_report("tiny-default", "int8", [samples["carphone_pristine.mp4"], samples["bigbuckbunny.mp4"]],
                     decode=decode)
    json.dumps(r)
    for m in ("encoder", "decoder", "embedder"):
        mod = r["modules"][m]
        assert mod["linear_embedding_ratio"] <= 0.30, (m, mod)
        assert mod["bytes"] < mod["bytes_fp32"]
    # measured: encoder 52 dB (int8 classifier head only; convolutions stay fp32), decoder 25, embedder 27
    assert r["modules"]["encoder"]["sqnr_db"] >= 40
    assert r["modules"]["decoder"]["sqnr_db"] >= 20 and r["modules"]["embedder"]["sqnr_db"] >= 20
    caps, pairs = r["pipeline"]["captions"], r["pipeline"]["examples"]
    assert caps["n"] == 2 == len(pairs) and len({p["fp32"] for p in pairs}) == 2  # the two clips' captions differ
    # int8 keeps each clip's concepts, so each grounded caption stays what fp32 wrote, and so does every ranking
    assert caps["identical_share"] == 1.0 and all(p["test"] == p["fp32"] for p in pairs)
    assert set(r["pipeline"]["retrieval"]) == {"a man wearing a tie", "an animal outdoors", "people riding bikes"}
    assert all(v["top1"] == 1.0 and v["kendall_tau"] == 1.0 for v in r["pipeline"]["retrieval"].values())
