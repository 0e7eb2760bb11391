"""Search-first indexing (a glance at each clip) and the full pass that follows (atomkit.retrieval.deferred), with
tiny-default: the real EfficientNet-Lite0 concepts and a random 2-layer LM whose captions differ from clip to clip,
so a caption that landed on the wrong clip, in another batch or not at all shows."""
from __future__ import annotations

import numpy as np
import pytest

import atomkit
from atomkit.retrieval.deferred import caption_pending, groups
from atomkit.retrieval.indexing import load_index, update
from atomkit.retrieval.library import Library, config_of

SHORT = atomkit.WindowConfig(length_s=2.0, stride_s=1.0)  # many clips per sample: several caption groups a video


@pytest.fixture(scope="module")
def short_session():
    with atomkit.Session("tiny-default", device="cpu", window=SHORT,
                         decode=atomkit.DecodeConfig(max_new_tokens=6, num_beams=2, backend="torch")) as s:
        yield s


@pytest.fixture(scope="module")
def one_pass(short_session, samples, tmp_path_factory):
    """The reference: the same two videos indexed in one pass (captions written with the clips)."""
    path = tmp_path_factory.mktemp("onepass") / "lib.db"
    with Library(path) as lib:
        update(short_session, lib, [samples["carphone_pristine.mp4"], samples["bikes.mp4"]])
        rows = lib.clips(lib.config_id(config_of(short_session)))
    return {(str(p), i): (cap, vec, con) for p, i, _, _, cap, con, vec in rows}


def test_search_first_is_searchable_before_any_caption(short_session, samples, tmp_path, one_pass):
    with Library(tmp_path / "lib.db") as lib:
        report = update(short_session, lib, [samples["carphone_pristine.mp4"], samples["bikes.mp4"]], search_first=True)
        assert report.pending == report.clips_new == len(one_pass) and lib.counts()["pending"] == len(one_pass)
        assert "captions to follow" in report.summary()
        idx = load_index(short_session, lib)
        assert {c.caption for c in idx.captions.clips} == {atomkit.config.PENDING}
        hits = short_session.retrieve(idx, "a man wearing a tie", k=3)
        # ranked on the concepts alone: the carphone man's tie, not the bikes
        assert hits[0].clip.clip.video.name == "carphone_pristine.mp4"
        assert hits[0].to_dict()["captioned"] is False
        # a first look: one frame's concepts, whose vector is not the full pass's (six frames, and the caption)
        first = idx.captions.clips[0]
        vec = idx.vectors[0].numpy()
        assert abs(np.linalg.norm(vec) - 1) < 1e-5
        assert not np.allclose(vec, one_pass[(str(first.clip.video), 0)][1], atol=1e-3)
        assert first.concepts != one_pass[(str(first.clip.video), 0)][2]


def test_captions_that_land_later_are_the_one_pass_captions(short_session, samples, tmp_path, one_pass):
    with Library(tmp_path / "lib.db") as lib:
        update(short_session, lib, [samples["carphone_pristine.mp4"], samples["bikes.mp4"]], search_first=True)
        cfg = lib.config_id(config_of(short_session))
        batches = groups(lib, cfg, short_session.decode.caption_batch)
        assert len(batches) >= 4 and all(1 <= len(g) <= 4 for g in batches)
        landed = caption_pending(short_session, lib)
        assert landed == len(one_pass) and lib.counts()["pending"] == 0
        rows = lib.clips(cfg)
    got = {(str(p), i): (cap, vec, con) for p, i, _, _, cap, con, vec in rows}
    assert got.keys() == one_pass.keys()
    assert len({cap for cap, *_ in got.values()}) > len(got) // 2  # the tiny LM writes a caption of its own per clip
    for key, (cap, vec, con) in got.items():
        assert cap == one_pass[key][0] and con == one_pass[key][2], key
        np.testing.assert_allclose(vec, one_pass[key][1], atol=1e-5)


def test_a_clip_a_query_ranked_high_is_captioned_first(short_session, samples, tmp_path):
    bikes = str(samples["bikes.mp4"].resolve())
    with Library(tmp_path / "lib.db") as lib:
        update(short_session, lib, [samples["carphone_pristine.mp4"], samples["bikes.mp4"]], search_first=True)
        before = {(str(p), i) for _, p, i, *_ in lib.pending(lib.config_id(config_of(short_session)))}
        asked = []
        n = caption_pending(short_session, lib, prefer=lambda: asked.append(1) or {(bikes, 5)}, limit=1)
        after = {(str(p), i) for _, p, i, *_ in lib.pending(lib.config_id(config_of(short_session)))}
    # the group of window 5 of the bikes (windows 4-7) landed, nothing else; carphone sorts first in the library
    assert sorted(before - after) == [(bikes, i) for i in range(4, 8)] and n == 4 and asked


def test_a_clip_indexed_again_meanwhile_is_not_overwritten(short_session, samples, tmp_path):
    with Library(tmp_path / "lib.db") as lib:
        update(short_session, lib, [samples["carphone_pristine.mp4"]], search_first=True)
        clip_id = lib.pending(lib.config_id(config_of(short_session)))[0][0]
        vec = np.zeros(384, dtype=np.float32)
        assert lib.set_clip(clip_id, "first", [], vec) is True
        assert lib.set_clip(clip_id, "second", [], vec) is False  # only a pending clip is written
        assert lib.set_clip(10**9, "gone", [], vec) is False


def test_search_first_needs_a_decoder_that_reads_concepts(samples, tmp_path):
    with atomkit.Session("tiny-paper", device="cpu") as s, Library(tmp_path / "lib.db") as lib:
        with pytest.raises(ValueError, match="names concepts"):
            update(s, lib, [samples["carphone_pristine.mp4"]], search_first=True)
        assert lib.counts()["videos"] == 0


def test_a_plain_index_run_finishes_what_a_search_first_run_left_pending(short_session, samples, tmp_path, one_pass):
    """A killed service leaves glances behind; `atomkit index` without the service gives them their full pass."""
    from atomkit.cli import main

    videos = [samples["carphone_pristine.mp4"], samples["bikes.mp4"]]
    with Library(tmp_path / "lib.db") as lib:
        update(short_session, lib, videos, search_first=True)
        assert lib.counts()["pending"] == len(one_pass)
    assert main(["index", *map(str, videos), "--db", str(tmp_path / "lib.db"), "--models", "tiny-default", "-q",
                 "--device", "cpu", "--backend", "torch", "--max-new-tokens", "6", "--beams", "2",
                 "--window", "2", "--stride", "1"]) == 0
    with Library(tmp_path / "lib.db") as lib:
        assert lib.counts()["pending"] == 0
        rows = lib.clips(lib.config_id(config_of(short_session)))
    assert {(str(p), i): cap for p, i, _, _, cap, _, _ in rows} == {k: v[0] for k, v in one_pass.items()}
