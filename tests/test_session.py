"""Session: modules load once, stay resident across subtasks and prompts, and are thread safe."""
from __future__ import annotations

import threading

import pytest
import torch

import atomkit
from atomkit.errors import AtomkitError
from conftest import run_threads


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


def test_concurrent_first_use_loads_once():
    s = atomkit.Session("tiny-default", device="cpu")
    got = run_threads(8, lambda: s.get("encoder"))
    assert len(got) == 8 and all(m is got[0] for m in got)
    assert s.load_report()["encoder"]["loads"] == 1
    s.close()


@pytest.mark.slow
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


QUERIES = ["a bird by the sea", "a tram in a city street", "a man in a suit and tie", "a rabbit in a forest",
           "people riding bicycles", "a graduation ceremony", "an animal outdoors", "a vehicle on the road"]


@pytest.mark.slow
def test_32_threads_x_8_queries_equal_sequential(tiny_captions):
    """32 threads x 8 queries on one session, the embedder loading under them: every ranking (ids and scores) is
    the one the same query gets alone, and the embedder loads once. The queries rank the 4 clips differently, so a
    result handed to the wrong thread, or a query embedded with another's tokens, fails the comparison."""
    s = atomkit.Session("tiny-default", device="cpu")
    try:
        idx = atomkit.index(s, tiny_captions)

        def ranking(q):
            return [(h.clip.id, h.score, h.rank) for h in s.retrieve(idx, q, k=4)]

        expected = {q: ranking(q) for q in QUERIES}
        assert len({tuple(i for i, _, _ in r) for r in expected.values()}) > 1  # the rankings differ...
        assert len({r[0][1] for r in expected.values()}) == len(QUERIES)  # ...and so do the best scores
        s.unload("embedder")  # the threads race to load it again
        counter = iter(range(32))

        def worker():
            i = next(counter)  # thread i asks the queries in its own rotation: different queries run at once
            return [(q, ranking(q)) for q in QUERIES[i % 8:] + QUERIES[:i % 8]]

        results = run_threads(32, worker)
        assert len(results) == 32 and all(len(r) == 8 for r in results)
        for r in results:
            for q, got in r:
                assert got == expected[q], q
        assert s.load_report()["embedder"]["loads"] == 2  # the first load above, then exactly one for 32 threads
    finally:
        s.close()


def test_concurrent_captions_equal_sequential(samples):
    """Four threads caption four different videos at once (raw free captions: the decoder's own tokens), twice
    over; each gets the caption its video gets alone, and the four captions differ."""
    decode = atomkit.DecodeConfig(max_new_tokens=6, num_beams=2, captions="raw")
    videos = [samples[n] for n in sorted(samples)]
    with atomkit.Session("tiny-default", device="cpu", decode=decode) as s:
        alone = {v: [(c.id, c.caption) for c in s.caption([v]).clips] for v in videos}
        assert len({c[0][1] for c in alone.values()}) == 4
        counter = iter(range(8))

        def worker():
            v = videos[next(counter) % 4]
            return v, [(c.id, c.caption) for c in s.caption([v]).clips]

        for v, got in run_threads(8, worker):
            assert got == alone[v], v


def _blocking(load, started: threading.Event, release: threading.Event):
    """A module loader that says when it started and waits to be released before loading."""
    def slow(opts):
        started.set()
        assert release.wait(30)
        return load(opts)
    return slow


def test_close_waits_for_a_load_in_flight_and_never_loads_after():
    """close() while a module is loading: calls that start after close began raise SessionClosed at once, close
    returns only when the load finished, and the loaded module is dropped, not left in the closed session."""
    from dataclasses import replace

    from atomkit.errors import SessionClosed

    s = atomkit.Session("tiny-default", device="cpu")
    started, release = threading.Event(), threading.Event()
    s.spec = replace(s.spec, encoder=_blocking(s.spec.encoder, started, release))
    got, closer = [], threading.Thread(target=s.close)
    loader = threading.Thread(target=lambda: got.append(s.get("encoder")))
    loader.start()
    assert started.wait(30)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # waits for the load in flight
    with pytest.raises(SessionClosed, match="closed.*open a new"):
        s.get("embedder")  # refused while close() waits
    with pytest.raises(SessionClosed):
        with s.use("encoder"):
            pass
    release.set()
    loader.join(30), closer.join(30)
    assert not closer.is_alive() and len(got) == 1  # the call that began before close() finished
    assert s.loaded() == [] and s.load_report()["encoder"]["loads"] == 1
    with pytest.raises(SessionClosed):
        s.get("encoder")


def test_close_during_use_waits_for_the_block_and_refuses_new_calls():
    from atomkit.errors import SessionClosed

    s = atomkit.Session("tiny-default", device="cpu")
    inside, leave = threading.Event(), threading.Event()
    seen = []

    def user():
        with s.use("decoder") as dec:
            inside.set()
            assert leave.wait(30)
            seen.append(dec.generate_ids(torch.tensor([[101, 2023, 2003]]), max_new_tokens=3, num_beams=1).tolist())

    t = threading.Thread(target=user)
    t.start()
    assert inside.wait(30)
    closer = threading.Thread(target=s.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive() and s.loaded() == ["decoder"]  # the module stays while a call uses it
    with pytest.raises(SessionClosed):
        s.get("decoder")
    leave.set()
    t.join(30), closer.join(30)
    assert len(seen) == 1 and len(seen[0]) == 3 and s.loaded() == []


def test_close_while_threads_query(tiny_captions):
    """Threads query in a loop while the session closes: every call returns the right ranking or raises
    SessionClosed, nothing else; afterwards no module is loaded and none was loaded again."""
    from atomkit.errors import SessionClosed

    s = atomkit.Session("tiny-default", device="cpu")
    idx = atomkit.index(s, tiny_captions)
    expected = {q: [h.clip.id for h in s.retrieve(idx, q, k=4)] for q in QUERIES}
    go, outcomes = threading.Event(), []

    def worker():
        ok, refused = 0, 0
        for q in QUERIES * 50:
            try:
                got = [h.clip.id for h in s.retrieve(idx, q, k=4)]
            except SessionClosed:
                refused += 1
                continue
            assert got == expected[q]
            ok += 1
            go.set()
        return ok, refused

    threads = [threading.Thread(target=lambda: outcomes.append(worker())) for _ in range(8)]
    for t in threads:
        t.start()
    assert go.wait(30)
    s.close()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 8  # no thread died of another error
    assert sum(ok for ok, _ in outcomes) > 0 and sum(r for _, r in outcomes) > 0
    assert s.loaded() == [] and s.load_report()["embedder"]["loads"] == 1


def test_context_manager_closes():
    with atomkit.Session("tiny-default", device="cpu") as s:
        s.get("encoder")
    assert s.loaded() == []
    with pytest.raises(atomkit.SessionClosed):
        s.encoder
    s.close()  # twice is harmless


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
