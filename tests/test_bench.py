"""The benchmark's bookkeeping and one small run with tiny random-weight models (correctness, not speed)."""
from __future__ import annotations

import json

import pytest

import atomkit
from atomkit.bench import benchmark, plot_timeline, stage_times, table
from atomkit.memory import MemoryMonitor


def test_stage_times_from_trace():
    trace = [(0, 0, 0.0, 0.1), (1, 0, 0.1, 0.4), (2, 0, 0.4, 1.4), (0, 1, 0.2, 0.3), (1, 1, 0.4, 0.6), (2, 1, 1.4, 2.0)]
    le, ld = stage_times(trace)
    assert le == pytest.approx([0.4, 0.3]) and ld == pytest.approx([1.0, 0.6])


def test_memory_monitor_sees_an_allocation():
    import torch

    with MemoryMonitor("cpu", interval_s=0.001) as mon:
        with mon.phase("run", "alloc"):
            x = torch.ones(64, 2**20, dtype=torch.uint8)  # 64 MiB, touched
            x.add_(1)
            del x
    split = mon.split()
    assert split["activations_mib"] >= 60
    assert split["peak_mib"] >= 60


@pytest.fixture(scope="module")
def tiny_bench():
    samples = {p.name: p for p in atomkit.sample_videos()}
    videos = [samples["carphone_pristine.mp4"], samples["bigbuckbunny.mp4"]]
    decode = atomkit.DecodeConfig(max_new_tokens=4, num_beams=2, script_max_new_tokens=8)
    return benchmark("tiny-default", prompts=2, videos=videos, k=2, device="cpu", decode=decode,
                     warmup=False, overlap_repeats=1, progress=False)


def test_benchmark_schema_and_consistency(tiny_bench, tmp_path):
    r = tiny_bench
    assert r["random_weights"] is True and r["clips"] == 2 and len(r["prompts"]) == 2
    comps = r["components"]
    assert set(comps) == {"model_loading", "video_encoding", "caption_generation", "indexing", "script_generation"}
    # reuse loads each module once; no_reuse loads 4 modules for every prompt (captioner x2, embedder, LM)
    assert len(comps["model_loading"]["reuse"]["samples"]) == 3
    assert len(comps["model_loading"]["no_reuse"]["samples"]) == 4 * 2
    assert len(comps["caption_generation"]["reuse"]["samples"]) == 2 * 2  # clips x prompts
    for task in ("retrieval", "assembly"):
        e = r["end_to_end"][task]
        assert e["reuse"] > 0 and e["no_reuse"] > 0 and e["ratio"] == pytest.approx(e["reuse"] / e["no_reuse"], abs=1e-3)
    assert r["end_to_end"]["assembly"]["reuse"] >= r["end_to_end"]["retrieval"]["reuse"]
    assert r["outputs_identical"] == {"captions": True, "scripts": True}
    o = r["overlap"]
    assert o["N"] == 2 and o["ideal_s"] == pytest.approx(2 * max(o["L_E"], o["L_D"]), abs=1e-3)
    assert len(o["timeline"]["pipelined"]) == 3 * 2
    for name in ("reuse", "no_reuse"):
        assert r["memory"][name]["model_weights_mib"] > 0 and r["memory"][name]["peak_mib"] >= 0
    assert r["device"]["cores"] >= 1 and r["device"]["torch"]
    json.dumps(r)
    text = table(r)
    assert "End-to-end assembly" in text and "Model loading" in text
    png = plot_timeline(r, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
