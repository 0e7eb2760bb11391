"""Session: modules load once, stay resident across subtasks and prompts, and are thread safe."""
from __future__ import annotations

import threading

import pytest
import torch

import atomkit
from atomkit.errors import AtomkitError


def test_modules_load_lazily_and_once():
    s = atomkit.Session("tiny-default", device="cpu")
    assert s.loaded() == []
    enc = s.encoder
    assert s.loaded() == ["encoder"]
    assert s.encoder is enc and s.get("encoder") is enc
    rep = s.load_report()["encoder"]
    assert rep["loads"] == 1 and rep["params"] > 4e6 and rep["bytes"] >= 4 * rep["params"] and rep["seconds"] > 0
    s.close()
    with pytest.raises(AtomkitError, match="closed"):
        s.get("encoder")


def run_threads(n: int, fn) -> list:
    """Run ``fn`` in ``n`` threads released together; return their results, re-raising any error."""
    barrier = threading.Barrier(n)
    results, errors = [], []

    def worker():
        try:
            barrier.wait()
            results.append(fn())
        except Exception as e:  # collected and re-raised below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_first_use_loads_once():
    s = atomkit.Session("tiny-default", device="cpu")
    got = run_threads(8, lambda: s.get("encoder"))
    assert len(got) == 8 and all(m is got[0] for m in got)
    assert s.load_report()["encoder"]["loads"] == 1
    s.close()


def test_reuse_across_subtasks_and_prompts(tiny_session, tiny_captions, tmp_path):
    """caption, retrieve and assemble for several prompts: each module is loaded exactly once."""
    for i, prompt in enumerate(["make a highlight reel", "find the clip with a bike", "show the rabbit"]):
        hits = tiny_session.retrieve(tiny_captions, prompt, k=2)
        assert len(hits) == 2
        tiny_session.assemble(tiny_captions, prompt, tmp_path / str(i), k=2)
    tiny_session.caption([atomkit.sample_videos()[0]])
    report = tiny_session.load_report()
    assert set(report) == {"encoder", "decoder", "embedder"}
    assert all(r["loads"] == 1 for r in report.values())


def test_concurrent_tasks_on_one_session(tiny_session, samples):
    """Several threads captioning and retrieving at once give the same results as one thread."""
    video = [samples["carphone_pristine.mp4"]]
    expected = tiny_session.caption(video).clips[0].caption

    def worker():
        caps = tiny_session.caption(video)
        assert len(tiny_session.retrieve(caps, "a man in a car", k=1)) == 1
        return caps.clips[0].caption

    assert run_threads(4, worker) == [expected] * 4


def test_context_manager_closes():
    with atomkit.Session("tiny-default", device="cpu") as s:
        s.get("encoder")
    assert s.loaded() == []
    with pytest.raises(AtomkitError):
        s.encoder


def test_quantized_session_counts_real_bytes():
    """quant='int8' quantizes each module as it loads; the load report counts the int8 storage."""
    fp32 = atomkit.Session("tiny-default", device="cpu")
    int8 = atomkit.Session("tiny-default", device="cpu", quant="int8")
    fp32.get("decoder")
    b = int8.get("decoder")
    assert b.lm.model.embed_tokens.weight is b.lm.lm_head.weight  # the tie survives quantization
    ratio = int8.load_report()["decoder"]["bytes"] / fp32.load_report()["decoder"]["bytes"]
    assert ratio < 0.35, ratio
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    assert b.generate_ids(ids, max_new_tokens=3, num_beams=1).shape == (3,)
    with pytest.raises(atomkit.InputError, match="int8"):
        atomkit.Session("tiny-default", quant="fp8")
    fp32.close(), int8.close()
