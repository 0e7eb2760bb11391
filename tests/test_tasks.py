"""Tasks over a Session with tiny random-weight models: batches, skipping, retrieval, assembly outputs."""
from __future__ import annotations

import hashlib
import json

import av
import pytest
import torch

import atomkit
from atomkit.errors import InputError
from atomkit.pipeline.tasks import Captions, CaptionedClip, Index
from atomkit.media.video import Clip


def test_caption_all_sample_clips(tiny_captions, samples):
    assert tiny_captions.skipped == []
    ids = [c.id for c in tiny_captions.clips]
    assert sorted(ids) == sorted(f"{p.stem}#00" for p in samples.values())  # every sample is <= one window
    from atomkit.models.concepts import with_article
    from atomkit.decode.grounded import candidates

    for c in tiny_captions.clips:
        assert len(c.concepts) == 10
        subjects = [with_article(n) for n, _ in candidates(c.concepts)]  # a grounded caption opens with one of them
        assert any(c.caption.lower().startswith(s.lower()) for s in subjects), (c.caption, subjects)


def test_tiny_captions_differ_per_clip(tiny_session, tiny_captions):
    """What makes the comparisons of captions in these tests able to fail: every sample clip has its own caption,
    grounded (the real encoder's concepts differ) and raw free decoding (the tiny LM's greedy tokens follow its prompt)."""
    from dataclasses import replace

    grounded = [c.caption for c in tiny_captions.clips]
    assert len(set(grounded)) == len(grounded) == 4, grounded
    assert len({c.concepts[0][0] for c in tiny_captions.clips}) == 4
    default = tiny_session.decode
    try:
        tiny_session.decode = replace(default, captions="raw")
        free = [c.caption for c in tiny_session.caption(atomkit.sample_videos()).clips]
    finally:
        tiny_session.decode = default
    assert len(set(free)) == 4 and not set(free) & set(grounded), free


def test_caption_skips_corrupt_and_missing_inputs(tiny_session, mixed_folder):
    caps = tiny_session.caption([mixed_folder, mixed_folder / "nope.mp4"])
    assert sorted(c.clip.video.name for c in caps.clips) == ["bunny.mp4", "carphone.mp4"]
    skipped = {s.path: s.reason for s in caps.skipped}
    assert str(mixed_folder / "broken.mp4") in skipped
    assert skipped[str(mixed_folder / "nope.mp4")] == "file not found"
    json.dumps(caps.to_dict())  # serialisable as it is


def _captions(texts: list[str]) -> Captions:
    clips = [CaptionedClip(Clip(video=atomkit.sample_videos()[0], index=i, start_s=0.0, end_s=1.0), t)
             for i, t in enumerate(texts)]
    return Captions("hand-made", clips, [])


def test_retrieve_ranks_by_caption_similarity(tiny_session):
    """The embedder is the real all-MiniLM-L6-v2 in every spec, so ranking is meaningful here."""
    caps = _captions(["a plate of pasta on a table", "a dog jumps over a fence", "cars on a highway at night"])
    hits = tiny_session.retrieve(caps, "the dog jumping", k=2)
    assert [h.rank for h in hits] == [1, 2]
    assert hits[0].clip.caption == "a dog jumps over a fence"
    assert hits[0].score > hits[1].score
    idx = atomkit.index(tiny_session, caps)
    assert isinstance(idx, Index) and idx.vectors.shape == (3, 384)
    assert torch.allclose(idx.vectors.norm(dim=1), torch.ones(3), atol=1e-4)
    assert tiny_session.retrieve(idx, "the dog jumping", k=1)[0].clip.id == hits[0].clip.id


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_empty_query_or_prompt_is_an_input_error(tiny_session, tiny_captions, bad, tmp_path):
    with pytest.raises(InputError, match="empty"):
        tiny_session.retrieve(tiny_captions, bad)
    with pytest.raises(InputError, match="empty"):
        tiny_session.assemble(tiny_captions, bad, tmp_path)
    assert not any(tmp_path.iterdir())


def test_assemble_writes_reel_script_and_captions(tiny_session, tiny_captions, tmp_path):
    asm = tiny_session.assemble(tiny_captions, "make a highlight reel", tmp_path, k=3)
    assert asm.reel == tmp_path / "reel.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".atomkit", "captions.json", "reel.mp4", "script.json"]
    script = json.loads((tmp_path / "script.json").read_text())
    assert script["reel"]["sha256"] == hashlib.sha256(asm.reel.read_bytes()).hexdigest()
    assert script["captions_sha256"] == hashlib.sha256((tmp_path / "captions.json").read_bytes()).hexdigest()
    # structured decoding: even random weights fill in a valid script that orders every retrieved clip
    # (free text that does not parse falls back to rank order: tests/test_script.py)
    assert script["source"] == "decoder", script["raw"]
    # the tiny LM's narration is noise after the clip's subject; noise with a number gives way to the caption
    assert all(p.startswith("narration for ") and p.endswith("its caption is used instead") for p in script["problems"])
    assert sorted(e["clip_id"] for e in script["entries"]) == sorted(h["id"] for h in script["retrieved"])
    caption = {h["id"]: h["caption"] for h in script["retrieved"]}
    for e in script["entries"]:
        subject = caption[e["clip_id"]].split(" (")[0].rstrip(".").lower()
        assert e["narration"] == caption[e["clip_id"]] or e["narration"].lower().startswith(subject), e
    assert script["random_weights"] is True
    caps = json.loads((tmp_path / "captions.json").read_text())
    assert len(caps["clips"]) == len(tiny_captions.clips)
    with av.open(str(asm.reel)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    expected = sum(h.clip.clip.duration_s for h in asm.hits)
    assert abs(asm.reel_info["duration_s"] - expected) < 0.3
    assert frames > 10


def test_assemble_with_nothing_captioned(tiny_session, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(InputError, match="bad.mp4"):
        tiny_session.assemble([bad], "make a highlight reel", tmp_path / "out")
    assert not (tmp_path / "out" / "reel.mp4").exists()


@pytest.mark.parametrize("threads", [None, [1, 1, 1]])
def test_captions_identical_whichever_executor_runs(tiny_session, tiny_captions, threads):
    """Pipelined captioning (shared or disjoint thread budgets) writes the sequential path's captions, in order."""
    from atomkit.pipeline.executor import PipelinedExecutor

    caps = tiny_session.caption(atomkit.sample_videos(), executor=PipelinedExecutor(depth=1, threads=threads))
    assert [(c.id, c.caption) for c in caps.clips] == [(c.id, c.caption) for c in tiny_captions.clips]


def test_caption_batches_keep_order_and_match_one_by_one(tiny_session, tmp_path):
    """Captions decoded in groups of 3 (two groups here, one partial), pipelined over the groups: every clip, in
    order, with the caption it gets alone (the tiny fp32 decoder is exact, so batching changes nothing)."""
    from dataclasses import replace

    from atomkit.pipeline.executor import PipelinedExecutor

    import shutil

    extra = tmp_path / "copy.mp4"
    shutil.copy(atomkit.sample_videos()[0], extra)
    videos = atomkit.sample_videos() + [extra]  # 5 clips
    default = tiny_session.decode
    try:
        tiny_session.decode = replace(default, caption_batch=1)
        alone = tiny_session.caption(videos)
        tiny_session.decode = replace(default, caption_batch=3)
        grouped = tiny_session.caption(videos, executor=PipelinedExecutor(depth=1))
    finally:
        tiny_session.decode = default
    assert [(c.id, c.caption) for c in grouped.clips] == [(c.id, c.caption) for c in alone.clips]
    assert len(grouped.clips) == 5


def test_clip_that_fails_to_decode_leaves_its_group_captioned(tiny_session, tiny_captions, monkeypatch):
    """A clip whose frames do not decode is reported; the other clips of its caption batch are captioned, each with
    the caption it gets when no clip fails."""
    import atomkit.pipeline.tasks as tasks
    from atomkit.errors import VideoError

    real = tasks.sample_frames
    bad = atomkit.sample_videos()[1]

    def flaky(clip, cfg):
        if clip.video == bad:
            raise VideoError(clip.video, "cannot decode clip 0.000-1.000 s: test")
        return real(clip, cfg)

    monkeypatch.setattr(tasks, "sample_frames", flaky)
    caps = tiny_session.caption(atomkit.sample_videos())
    assert len(caps.clips) == len(atomkit.sample_videos()) - 1
    assert bad not in [c.clip.video for c in caps.clips]
    assert [s.path.startswith(str(bad)) for s in caps.skipped] == [True]
    assert [(c.id, c.caption) for c in caps.clips] == [(c.id, c.caption) for c in tiny_captions.clips
                                                       if c.clip.video != bad]
