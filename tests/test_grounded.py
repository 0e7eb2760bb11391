"""Grounded captions (atomkit.decode.grounded), the grounding measure (atomkit.models.concepts) and the fused ranking
(atomkit.retrieval.ranking). Expected sentences and words are written by hand; the tiny model has random weights
(its decoder's preferences are noise), its embedder is the real MiniLM."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atomkit.decode import grounded
from atomkit.models.concepts import broader, grounding, grounding_table, has_number, named_objects
from atomkit.pipeline.tasks import CaptionedClip
from atomkit.media.video import Clip

CAT = [("Egyptian cat", 0.63), ("tiger cat", 0.20), ("tabby", 0.12), ("lynx", 0.02), ("plastic bag", 0.001)]


def test_broader_words_come_from_the_table():
    assert broader("pug")[:1] == ["dog"] and "animal" in broader("pug")
    assert broader("espresso")[0] == "coffee" and broader("moped")[0] == "motorbike"
    assert broader("Windsor tie")[0] == "tie" and broader("tripod") == [] and broader("not a class") == []


def test_render_names_the_subject_first_and_nothing_outside_the_concepts():
    assert grounded.render("Egyptian cat", CAT) == "An Egyptian cat, or perhaps a tiger cat, a tabby or a lynx."
    # plastic bag (0.001) is under 2 % of the subject's 0.63: left out
    assert grounded.render("tabby", CAT, max_others=1) == "A tabby (a kind of cat), or perhaps an Egyptian cat."
    assert grounded.render("pug", [("pug", 0.9)]) == "A pug (a kind of dog)."
    assert grounded.render("bow tie", [("bow tie", 0.7), ("Windsor tie", 0.1)]) == "A bow tie, or perhaps a Windsor tie."


def test_grounding_counts_invented_objects_and_numbers():
    free = "The clip shows an Egyptian cat (0.41), a tiger cat (0.34), a tab"
    assert grounding(free, CAT) == {"named": ["egyptian cat", "tiger cat"], "invented": [], "unsupported": ["tab"],
                                    "number": True, "grounded": False}
    g = grounding("A person wearing an academic gown and a bow tie", [("academic gown", 0.2), ("bow tie", 0.1)])
    assert g["invented"] == ["person"] and not g["number"]
    assert grounding("Two dogs chase a cat", [("pug", 0.5)])["invented"] == ["cat"]  # "dogs": a pug is a dog
    assert has_number("six frames of a clip") and not has_number("a frame of a clip")
    assert not has_number("A three-toed sloth (a kind of animal).") and has_number("three sloths")
    assert named_objects("a tiger cat") == ["tiger cat"]  # one object, not a tiger and a cat
    t = grounding_table([(free, CAT), ("A lynx next to a car.", CAT)])
    assert t["object_words"] == 4 and t["grounded_share"] == 0.75
    assert t["captions_with_invented_object"] == 1 and t["captions_with_number"] == 1 and t["invented_examples"] == ["car"]


def test_every_content_word_a_caption_adds_must_be_supported():
    street = [("streetcar", 0.3), ("person", 0.6), ("cab", 0.05)]
    g = grounding("A streetcar, a classic Japanese film noir.", street)
    assert g["invented"] == [] and g["unsupported"] == ["classic", "japanese", "film", "noir"] and not g["grounded"]
    assert grounding("A man in a suit next to a streetcar", street)["unsupported"] == ["suit"]  # a person was seen
    assert grounding("A man next to a cab", [("cab", 0.5)])["invented"] == ["man"]  # nobody was seen
    people = [("two people", 0.7), ("car", 0.5), ("tie", 0.4)]
    for text in ("Two people with a car and a tie.", "People next to cars."):
        assert grounding(text, people)["grounded"], text  # the detector's count is not an invented number
    assert grounding("Three people with a car.", people)["number"]  # a count nobody reported
    t = grounding_table([("A streetcar, a classic Japanese film noir.", street), ("A person with a cab.", street)])
    assert t["captions_with_unsupported_word"] == 1 and t["captions_grounded"] == 1
    assert t["unsupported_examples"] == ["classic", "japanese", "film", "noir"]


def test_render_joins_what_the_detector_saw_with_with():
    seen = [("person", 0.72), ("tie", 0.55), ("bow tie", 0.4), ("chair", 0.3), ("Windsor tie", 0.1)]
    assert grounded.render("person", seen) == "A person with a tie and a chair, or perhaps a bow tie or a Windsor tie."
    assert grounded.render("bow tie", seen, max_others=2) == "A person with a bow tie and a tie."  # people lead
    assert grounded.render("tie", [("tie", 0.6), ("car", 0.5)]) == "A tie with a car."
    assert grounded.render("two people", [("two people", 0.8), ("car", 0.5)]) == "Two people with a car."
    for subject in ("person", "bow tie", "two people"):
        assert grounding(grounded.render(subject, seen + [("two people", 0.1)]), seen + [("two people", 0.1)])["grounded"]


def test_subject_is_a_candidate_and_follows_a_confident_classifier(tiny_session):
    dec = tiny_session.decoder
    sure = [("pizza", 0.999999), ("tabby", 1e-7), ("lynx", 1e-7)]
    # log-prior gap ~16 nats: more than any mean log-probability of a 2-3 token phrase can undo
    assert grounded.subjects(dec, [sure, list(reversed(sure))]) == ["pizza", "pizza"]
    even = [("pizza", 0.25), ("tabby", 0.25), ("lynx", 0.25), ("tench", 0.25)]
    assert grounded.subjects(dec, [even])[0] in {"pizza", "tabby", "lynx", "tench"}
    assert grounded.subjects(dec, [[]]) == [None]
    assert grounded.captions(dec, [[]]) == ["Nothing the classifier recognises."]


def test_batched_scores_equal_the_lms_own_forward_pass(tiny_session):
    """All prompts in one left-padded batch, spread over their options: the same log-probabilities as
    transformers' forward pass of each prompt + option (the exact fp32 engine)."""
    dec = tiny_session.decoder
    lists = [CAT, [("pug", 0.5), ("Chihuahua", 0.3)], [("espresso", 0.8), ("cup", 0.1), ("eggnog", 0.05)]]
    prompts = [dec._ids(dec.render(grounded.messages(c)) + grounded.ANSWER_PREFIX)[0] for c in lists]
    options = [grounded._options(dec, grounded.candidates(c)) for c in lists]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    stepper = dec.stepper("torch")
    pad = dec._search(1, 1)["pad_token_id"]
    batched = grounded._stepper_scores(stepper, prompts, options, pad)
    for p, opts, got in zip(prompts, options, batched):
        ref = grounded._hf_scores(dec, p, opts)
        assert got == pytest.approx(ref, abs=1e-4)
    one = grounded._stepper_scores(stepper, [prompts[1]], [[options[1][1]]], 0)[0][0]
    assert one == pytest.approx(batched[1][1], abs=1e-4)  # a batch-1 program's path


def test_captions_fit_the_token_budget(tiny_session):
    dec = tiny_session.decoder
    many = [("black-and-tan coonhound", 0.3), ("curly-coated retriever", 0.25), ("Mexican hairless", 0.2),
            ("Great Dane", 0.15), ("Doberman", 0.1)]
    full = grounded.captions(dec, [many])[0]
    short = grounded.captions(dec, [many], max_tokens=12)[0]
    assert len(dec._ids(full)[0]) > 12 and len(short) < len(full)
    assert len(dec._ids(short)[0]) <= 12 or ", or perhaps" not in short  # the subject alone may pass it


def test_fused_vectors_rank_on_what_the_encoder_saw(tiny_session):
    from atomkit.retrieval.ranking import clip_vectors, concept_vectors

    emb = tiny_session.embedder
    clip = lambda i, cap, con: CaptionedClip(Clip(Path("/v/x.mp4"), i, 0, 1), cap, con)  # noqa: E731
    clips = [clip(0, "A clip.", [("golden retriever", 0.7), ("Labrador retriever", 0.2)]),
             clip(1, "A clip.", [("pizza", 0.8), ("plate", 0.1)]),
             clip(2, "A clip.", [])]
    v = clip_vectors(emb, clips)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    q = emb.embed(["a dog playing"])[0]
    assert float(v[0] @ q) > float(v[1] @ q)  # the captions are equal: only the concepts tell them apart
    names = emb.embed(["golden retriever, Labrador retriever"])[0]
    caption = emb.embed(["A clip."])[0]
    part = concept_vectors(emb, [clips[0].concepts])[0]
    want = torch.nn.functional.normalize(caption + names + part, dim=0)
    assert torch.allclose(v[0], want, atol=1e-5)  # the three unit vectors, summed
    assert torch.allclose(v[2], emb.embed(["A clip."])[0], atol=1e-6)  # no concepts: the caption alone
    c = concept_vectors(emb, [[("pizza", 1.0)], [("pizza", 0.2)]])
    assert torch.allclose(c[0], c[1], atol=1e-6)  # one concept: its direction, whatever its probability


def test_narration_that_names_what_the_clip_does_not_show_is_replaced_by_its_caption():
    from atomkit.decode.script import Script, ScriptEntry
    from atomkit.pipeline.tasks import Hit, grounded_narration

    tie = CaptionedClip(Clip(Path("/v/car.mp4"), 0, 0, 10), "A bow tie, or perhaps a Windsor tie.",
                        [("bow tie", 0.7), ("Windsor tie", 0.1)])
    cat = CaptionedClip(Clip(Path("/v/cat.mp4"), 0, 0, 10), "An Egyptian cat.", CAT)
    hits = [Hit(tie, 0.9, 1), Hit(cat, 0.8, 2)]
    script = Script([ScriptEntry(tie.id, "A bow tie (a kind of bird) in a car"), ScriptEntry(cat.id, "A tabby next to a lynx")],
                    "decoder")
    out = grounded_narration(script, hits)
    assert [e.narration for e in out.entries] == ["A bow tie, or perhaps a Windsor tie.", "A tabby next to a lynx"]
    assert out.problems == [f"narration for {tie.id} names bird, car, which its clip's encoder did not report: "
                            "its caption is used instead"]
    noir = grounded_narration(Script([ScriptEntry(cat.id, "An Egyptian cat, a classic Japanese film noir.")], "decoder"), hits)
    assert noir.entries[0].narration == "An Egyptian cat."
    assert noir.problems == [f"narration for {cat.id} says classic, japanese, film, noir, which nothing its clip's "
                             "encoder reported supports: its caption is used instead"]
    three = grounded_narration(Script([ScriptEntry(cat.id, "Three cats")], "decoder"), hits)
    assert three.entries[0].narration == "An Egyptian cat." and "has a number" in three.problems[0]


def test_a_free_caption_that_claims_more_than_was_seen_takes_the_grounded_form(tiny_session):
    """The tiny LM's random weights write noise, which no concept supports: every free caption falls back."""
    from atomkit.config import DecodeConfig
    from atomkit.models.encoder import Encoded

    dec = tiny_session.decoder
    concepts = [CAT, [("person", 0.8), ("car", 0.5), ("streetcar", 0.2)]]
    encs = [Encoded(torch.zeros(0), c) for c in concepts]
    before = getattr(dec, "caption_fallbacks", 0)
    free = dec.captions(encs, DecodeConfig(captions="free", max_new_tokens=8, num_beams=1))
    assert free == grounded.captions(dec, concepts, max_tokens=8)
    assert all(grounding(t, c)["grounded"] for t, c in zip(free, concepts))
    assert dec.caption_fallbacks - before == 2
    assert dec.captions([Encoded(torch.zeros(0), [])], DecodeConfig(captions="free", max_new_tokens=4, num_beams=1))[0]
