"""A quantized session checked against fp32 by numbers (tiny random-weight models)."""
from __future__ import annotations

import json

import atomkit
from atomkit.evaluate import quant_report


def test_int8_quant_report_tiny(samples):
    decode = atomkit.DecodeConfig(max_new_tokens=4, num_beams=1)
    r = quant_report("tiny-default", "int8", [samples["carphone_pristine.mp4"], samples["bigbuckbunny.mp4"]],
                     decode=decode)
    json.dumps(r)
    for m in ("encoder", "decoder", "embedder"):
        mod = r["modules"][m]
        assert mod["linear_embedding_ratio"] <= 0.30, (m, mod)
        assert mod["bytes"] < mod["bytes_fp32"]
    assert r["modules"]["encoder"]["sqnr_db"] >= 20  # int8 Linear only; convolutions stay fp32
    assert r["modules"]["embedder"]["sqnr_db"] >= 15
    caps = r["pipeline"]["captions"]
    assert caps["n"] == 2 and 0 <= caps["identical_share"] <= 1
    assert set(r["pipeline"]["retrieval"]) and all(0 <= v["topk_overlap"] <= 1 for v in r["pipeline"]["retrieval"].values())
