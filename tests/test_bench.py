"""The benchmark's bookkeeping and one small run with tiny random-weight models (correctness, not speed)."""
from __future__ import annotations

import json
import time

import pytest

import atomkit
from atomkit.bench.reuse import benchmark, stage_times
from atomkit.bench.figures import plot_timeline, table
from atomkit.bench.memory import MemoryMonitor


def test_stage_times_from_trace():
    trace = [(0, 0, 0.0, 0.1), (1, 0, 0.1, 0.4), (2, 0, 0.4, 1.4), (0, 1, 0.2, 0.3), (1, 1, 0.4, 0.6), (2, 1, 1.4, 2.0)]
    le, ld = stage_times(trace)
    assert le == pytest.approx([0.4, 0.3]) and ld == pytest.approx([1.0, 0.6])


def test_memory_monitor_sees_an_allocation():
    import torch

    from atomkit.bench.memory import trim_heap

    trim_heap()  # memory freed by earlier tests goes back to the OS first, so the new 64 MiB raise the RSS
    with MemoryMonitor("cpu", interval_s=0.001) as mon:
        with mon.phase("run", "alloc"):
            x = torch.ones(64, 2**20, dtype=torch.uint8)  # 64 MiB, touched
            x.add_(1)
            time.sleep(0.05)  # a sampling monitor sees what lives for at least a few of its intervals
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
                     warmup=False, overlap_repeats=1, repeats=2, progress=False)


@pytest.mark.slow
def test_benchmark_schema_and_consistency(tiny_bench, tmp_path):
    r = tiny_bench
    assert r["random_weights"] is True and r["clips"] == 2 and len(r["prompts"]) == 2
    cs = r["concept_sources"]  # tiny-default's encoder: the classifier alone, no detector
    assert cs["clips"] == 2 and cs["classifier_s"] > 0 and "detector_s" not in cs
    comps = r["components"]
    assert set(comps) == {"model_loading", "model_unloading", "video_encoding", "caption_generation", "indexing",
                          "script_generation"}
    # every load is closed again: reuse once at the end, no_reuse after each of its 3 subtasks per prompt
    assert r["repeats"] == 2  # both paths twice (ABBA): samples of both runs, totals per run
    assert len(comps["model_unloading"]["reuse"]["samples"]) == 1 * 2
    assert len(comps["model_unloading"]["no_reuse"]["samples"]) == 3 * 2 * 2
    load = comps["model_loading"]["no_reuse"]
    assert load["total"] == pytest.approx(sum(load["samples"]) / 2, abs=1e-3)
    # readying the decode engine is part of loading, and the components account for the end-to-end time
    for name in ("reuse", "no_reuse"):
        assert 0 <= r["engine_prepare_s"][name] <= comps["model_loading"][name]["total"]
    # sequential: the components add up to the end-to-end time (pipelined, encoding overlaps decoding)
    assert abs(r["unattributed_s"]["no_reuse"]) < 0.25 * r["end_to_end"]["assembly"]["no_reuse"]
    assert r["reuse_executor"] in ("sequential", "pipelined", "pipelined-disjoint", "prefetch")
    for name in ("reuse", "no_reuse"):  # the collector's time is measured per path (unloads collect at least once)
        assert r["gc"][name]["collections"] >= 1 and 0 <= r["gc"][name]["seconds"] < r["end_to_end"]["assembly"][name] * 2
    # reuse loads each module once; no_reuse loads 4 modules for every prompt (captioner x2, embedder, LM)
    assert len(comps["model_loading"]["reuse"]["samples"]) == 3 * 2
    assert len(comps["model_loading"]["no_reuse"]["samples"]) == 4 * 2 * 2
    # one sample per caption batch: the 2 clips decode together (caption_batch 4), per prompt and repeat
    assert len(comps["caption_generation"]["reuse"]["samples"]) == 1 * 2 * 2
    assert r["decode"]["caption_batch"] == 4
    # what ``auto`` ran is recorded, with the CPU kind that decides how int4 prefills (bf16 copies or fp32 matrices)
    from atomkit.decode.llama import native_bf16

    assert r["device"]["cpu_native_bf16"] is native_bf16()
    assert r["decode"]["engine"] == ["int4"]
    assert r["reuse_executor"] == "sequential"  # measured: one caption batch per prompt leaves nothing to overlap
    for task in ("retrieval", "assembly"):
        e = r["end_to_end"][task]
        assert e["reuse"] > 0 and e["no_reuse"] > 0 and e["ratio"] == pytest.approx(e["reuse"] / e["no_reuse"], abs=1e-3)
        assert e["reuse"] == pytest.approx(sum(e["samples"]["reuse"]) / 2, abs=1e-3)  # median of two
        # the paired ratio of each repeat (both stored to 4 decimals: compare to 1e-3, not digit by digit)
        assert e["ratio_per_run"] == pytest.approx(
            [a / b for a, b in zip(e["samples"]["reuse"], e["samples"]["no_reuse"])], abs=1e-3)
    assert r["end_to_end"]["assembly"]["reuse"] >= r["end_to_end"]["retrieval"]["reuse"]
    import os

    c = r["cpu_s"]  # process CPU time per path run: positive, at most all cores for the run's wall time
    for name in ("reuse", "no_reuse"):
        assert len(c[name]["samples"]) == 2 and all(x > 0 for x in c[name]["samples"])
        assert c[name]["wall_s"] >= r["end_to_end"]["assembly"][name] * 0.9  # the run holds the assembly and more
        assert c[name]["cpu_s"] <= c[name]["wall_s"] * (os.cpu_count() or 1) + 0.05
    assert c["ratio"] == pytest.approx(c["reuse"]["cpu_s"] / c["no_reuse"]["cpu_s"], abs=1e-3)
    assert c["ratio_per_run"] == pytest.approx(
        [a / b for a, b in zip(c["reuse"]["samples"], c["no_reuse"]["samples"])], abs=1e-3)
    assert "process CPU time per run" in table(r)
    assert r["outputs_identical"] == {"captions": True, "scripts": True}
    o = r["overlap"]
    assert o["caption_batch"] == 1  # overlap is measured per clip, as the paper defines L_E and L_D
    assert o["N"] == 2 and o["ideal_s"] == pytest.approx(2 * max(o["L_E"], o["L_D"]), abs=1e-3)
    assert len(o["timeline"]["pipelined"]) == 3 * 2
    d = o["disjoint"]  # CPU: the stages once more on disjoint cores, with the bound that gives
    assert d["threads"][1] >= 1 and d["threads"][2] >= 1 and d["bound_s"] == pytest.approx(2 * max(d["L_E"], d["L_D"]), abs=1e-3)
    assert o["best_s"] == min(o["sequential_s"], o["pipelined_s"], d["pipelined_s"], o["prefetch"]["pipelined_s"])
    assert len(o["prefetch"]["samples"]) == 1  # one per overlap repeat
    for name in ("reuse", "no_reuse"):
        assert r["memory"][name]["model_weights_mib"] > 0 and r["memory"][name]["peak_mib"] >= 0
    assert r["device"]["cores"] >= 1 and r["device"]["torch"]
    json.dumps(r)
    text = table(r)
    assert "End-to-end assembly" in text and "Model loading" in text
    png = plot_timeline(r, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cold_bench_drops_the_page_cache_before_every_load_untimed(monkeypatch):
    """--cold: one drop per load of either path; the drops (here a 0.3 s stand-in) are not in any time."""
    import time

    import atomkit.bench.host as host
    import atomkit.bench.reuse as bench

    drops = []
    for module in (bench, host):  # before each load (reuse) and before each read of the floor (host)
        monkeypatch.setattr(module, "drop_page_cache", lambda: drops.append(time.sleep(0.3)))
    samples = {p.name: p for p in atomkit.sample_videos()}
    decode = atomkit.DecodeConfig(max_new_tokens=3, num_beams=1, script_max_new_tokens=4)
    r = benchmark("tiny-default", prompts=1, videos=[samples["carphone_pristine.mp4"]], k=1, device="cpu",
                  decode=decode, warmup=False, overlap_repeats=1, cold=True, progress=False)
    loads = r["components"]["model_loading"]
    n_loads = len(loads["reuse"]["samples"]) + len(loads["no_reuse"]["samples"])
    floors = r["load_vs_read_floor"]  # each module's files read 3 times from "storage" after the runs
    assert r["cold"] is True and n_loads == 7 and len(drops) == n_loads + 3 * len(floors)
    assert "embedder" in floors and floors["embedder"]["mib"] > 80  # all-MiniLM-L6-v2's 87 MiB of safetensors
    assert set(floors["embedder"]["load_s"]) == {"reuse", "no_reuse"}
    # 3 and 4 untimed drops of 0.3 s: the end-to-end times would exceed their components by 0.9 and 1.2 s
    assert abs(r["unattributed_s"]["no_reuse"]) < 0.25 and r["unattributed_s"]["reuse"] < 0.25


def test_cold_bench_without_root_says_how(monkeypatch):
    import atomkit.bench.reuse as bench
    from atomkit.errors import AtomkitError

    monkeypatch.setattr(bench, "drop_page_cache", lambda: "cannot drop the page cache (Permission denied)")
    with pytest.raises(AtomkitError, match="run as root on Linux, or without --cold"):
        benchmark("tiny-default", prompts=1, videos=[atomkit.sample_videos()[0]], k=1, device="cpu",
                  decode=atomkit.DecodeConfig(max_new_tokens=2, num_beams=1, script_max_new_tokens=2),
                  warmup=False, overlap_repeats=1, cold=True, progress=False)


def test_measured_choice_needs_a_clear_win_to_pipeline():
    from atomkit.bench.reuse import PIPELINE_MARGIN, measured_choice

    seq = 4.0
    base = {"sequential_s": seq, "sequential_samples": [seq, seq * 1.2], "pipelined_s": seq * 1.1,
            "pipelined_samples": [seq * 1.1, seq * 1.1], "disjoint": None, "prefetch": None}
    assert measured_choice(base) == "sequential"
    tie = {**base, "disjoint": {"pipelined_s": seq * 0.99}}
    assert measured_choice(tie) == "sequential"  # within noise of the fastest sequential sample
    clear = {**base, "disjoint": {"pipelined_s": seq * (0.99 - PIPELINE_MARGIN)}}
    assert measured_choice(clear) == "pipelined-disjoint"
    # one fast sample and one slow one is no clear win
    mixed = {**base, "sequential_samples": [4.14, 3.34], "pipelined_samples": [2.94, 3.44]}
    assert measured_choice(mixed) == "sequential"
    ahead = {**base, "prefetch": {"pipelined_s": seq * 0.8, "samples": [seq * 0.8, seq * 0.85]}}
    assert measured_choice(ahead) == "sequential"  # measured, never chosen (see measured_choice)
    both = {**clear, "pipelined_samples": [seq * 0.7, seq * 0.75]}
    assert measured_choice(both) == "pipelined"  # the fastest of the clear winners
    assert measured_choice(both, groups=2) == "pipelined"
    assert measured_choice(both, groups=1) == "sequential"  # one caption batch per call: nothing to overlap
