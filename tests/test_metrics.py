"""Caption and ranking agreement (atomkit.evaluation.metrics)."""
from __future__ import annotations

import math
import shutil

import pytest

from atomkit.errors import InputError
from atomkit.evaluation.metrics import _simple_tokenize, caption_agreement, rank_agreement

REFS = {
    "bikes": "A man rides a bicycle down a steep mountain trail.",
    "bunny": "A large white rabbit stands in a green meadow near a tree.",
    "carphone": "A person talks on a phone while sitting in a car.",
    "vtest": "People walk across a busy street in front of a building.",
}
OTHER = {
    "bikes": "Two birds fly over the ocean at sunset.",
    "bunny": "A chef chops onions in a small kitchen.",
    "carphone": "Snow falls on an empty parking lot at night.",
    "vtest": "A cat sleeps on a red sofa.",
}


def test_identical_captions_agree_fully():
    r = caption_agreement(REFS, dict(REFS))
    assert r["n"] == 4
    assert r["identical_share"] == 1.0
    assert r["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert r["cider"] > 5.0  # CIDEr-D is scaled by 10; distinct identical captions score near 10
    if shutil.which("java"):
        assert r["tokenizer"] == "ptb"


def test_different_captions_score_lower():
    same = caption_agreement(REFS, dict(REFS))
    diff = caption_agreement(REFS, OTHER)
    assert diff["identical_share"] == 0.0
    assert diff["bleu4"] < 0.1 < same["bleu4"]
    assert diff["cider"] < 1.0 < same["cider"]
    half = dict(REFS, bikes=OTHER["bikes"], bunny=OTHER["bunny"] + "  ")
    mid = caption_agreement(REFS, half)
    assert mid["identical_share"] == 0.5
    assert diff["bleu4"] < mid["bleu4"] < same["bleu4"]
    assert diff["cider"] < mid["cider"] < same["cider"]


def test_strip_and_empty_captions():
    cands = dict(REFS, bikes="  " + REFS["bikes"] + "\n", vtest="")
    r = caption_agreement(REFS, cands)
    assert r["identical_share"] == 0.75
    assert 0.0 < r["bleu4"] < 1.0
    assert caption_agreement({}, {})["n"] == 0


def test_mismatched_keys_raise():
    with pytest.raises(InputError, match="same clip ids"):
        caption_agreement(REFS, {"bikes": "x"})


def test_simple_tokenizer_fallback(monkeypatch):
    import atomkit.evaluation.metrics as M

    monkeypatch.setattr(M, "_ptb_tokenize", lambda texts: None)
    r = caption_agreement(REFS, dict(REFS))
    assert r["tokenizer"].startswith("simple")
    assert r["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert _simple_tokenize(["A Dog, running!"]) == ["a dog running"]


@pytest.mark.integration  # a JVM start and METEOR's paraphrase table: 10-20 s, kept out of test-fast
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_when_asked():
    # one call only: METEOR starts a JVM and loads its paraphrase table (10-16 s here)
    half = dict(REFS, bikes=OTHER["bikes"], bunny=OTHER["bunny"])
    r = caption_agreement(REFS, half, meteor=True)
    assert 0.15 < r["meteor"] < 0.8  # measured 0.33; identical captions give 1.0, unrelated ones 0.03
    assert caption_agreement(REFS, half)["meteor"] is None


def test_rank_agreement_identical_and_reversed():
    order = ["a", "b", "c", "d", "e"]
    same = rank_agreement(order, list(order), k=3)
    assert same == {"top1": 1.0, "topk_overlap": 1.0, "kendall_tau": 1.0, "shared": 5, "k": 3}
    rev = rank_agreement(order, order[::-1], k=3)
    assert rev["top1"] == 0.0
    assert rev["topk_overlap"] == pytest.approx(1 / 3)  # only "c" is in both top-3
    assert rev["kendall_tau"] == -1.0


def test_rank_agreement_partial():
    r = rank_agreement(["a", "b", "c", "d"], ["a", "c", "b", "x"], k=2)
    assert r["top1"] == 1.0
    assert r["topk_overlap"] == 0.5
    assert r["shared"] == 3
    assert r["kendall_tau"] == pytest.approx(1 / 3)  # pairs: (a,b)+ (a,c)+ (b,c)-
    one = rank_agreement(["a"], ["a", "b"], k=5)
    assert one["kendall_tau"] is None and one["topk_overlap"] == 0.2
    assert rank_agreement([], [], k=1)["top1"] == 0.0
    assert not math.isnan(rank_agreement(["a", "a", "b"], ["b", "a"], k=2)["kendall_tau"])
    with pytest.raises(InputError):
        rank_agreement(["a"], ["a"], k=0)


def test_captions_without_words_are_scored_not_crashed():
    r = caption_agreement({"a": "...", "b": "a dog runs"}, {"a": "!!", "b": "a dog runs"})
    assert r["n"] == 2 and r["identical_share"] == 0.5
    other = caption_agreement({"a": "...", "b": "a dog runs"}, {"a": "!!", "b": "a cat sleeps"})
    assert r["cider"] > other["cider"] and r["bleu4"] > other["bleu4"]  # the pair that agrees still counts
