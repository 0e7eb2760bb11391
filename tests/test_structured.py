"""Structured script decoding: the JSON is written by the program, the choices by the model.

Unit tests use the tiny random-weight decoder (its text is noise; the structure is what is tested)
and a scripted stepper whose preferences are known; the integration test runs SmolLM2."""
from __future__ import annotations

import json
import re

import pytest
import torch

import atomkit
from atomkit.models.registry import LoadOptions, get_spec
from atomkit.decode.script import parse_script
from atomkit.decode.structured import NEXT, one_sentence, script_json, subject

CLIPS = [("dog#00", "A dog jumps over a fence."), ("car#01", "A red car (a kind of vehicle), or perhaps a cab."),
         ("cat#02", "A cat sleeps")]
CAPTIONS = [c for _, c in CLIPS]


class CountingStepper:
    """Wraps a stepper and counts the tokens it is asked to run after the prompt."""

    def __init__(self, inner):
        self.inner, self.steps = inner, 0

    def reset(self, batch_size, seq_len):
        self.seq_len = seq_len
        self.inner.reset(batch_size, seq_len)

    def prefill(self, input_ids=None, inputs_embeds=None, pad=None):
        self.prompt_len = input_ids.shape[1]
        return self.inner.prefill(input_ids=input_ids, pad=pad)

    def step(self, tokens, pos):
        assert pos < self.seq_len
        self.steps += 1
        return self.inner.step(tokens, pos)

    def reorder(self, index, keep=0):
        self.inner.reorder(index, keep)


@pytest.fixture(scope="module")
def tiny():
    return get_spec("tiny-default").load("decoder", LoadOptions())


def test_generate_batch_ends_each_row_at_its_own_stop(tiny):
    """``stop`` ends a row at the first stop token it generates (kept, as EOS is); the other rows go on."""
    prompts = [tiny._ids(tiny.render([{"role": "user", "content": t}]))[0]
               for t in ("a cat sleeps on a mat", "two dogs run in the park", "a red car on a wet road")]
    full = [r.tolist() for r in tiny.generate_batch(prompts=prompts, max_new_tokens=8, num_beams=1, backend="torch")]
    assert len({tuple(r) for r in full}) == 3  # the rows differ, so a mixed-up row would show
    stop = full[0][2]  # row 0's third token
    cut = [r.tolist() for r in tiny.generate_batch(prompts=prompts, max_new_tokens=8, num_beams=1, backend="torch",
                                                   stop=[stop])]
    expected = [r[:r.index(stop) + 1] if stop in r else r for r in full]
    assert cut == expected and len(cut[0]) <= 3


def test_subject_and_one_sentence():
    assert subject("An albatross (a kind of bird), or perhaps a gorilla.") == "An albatross"
    assert subject("A tripod.") == "A tripod" and subject("  A dog jumps over a fence") == "A dog jumps over a fence"
    assert one_sentence("An albatross soars. It is big") == "An albatross soars."
    assert one_sentence("An albatross, a seabird with long wings, soaring over the") == \
        "An albatross, a seabird with long wings."
    assert one_sentence("A tripod, on") == "A tripod, on."  # no clause of three words to cut back to
    assert one_sentence("") == ""
    # a line that loops (atomkit assemble wrote this one) says each clause once
    assert one_sentence("A streetcar, a beautiful sight, a life of its own, a life of its own.") == \
        "A streetcar, a beautiful sight, a life of its own."
    assert one_sentence("A dog, a Dog , runs, jumps, a dog") == "A dog, runs, jumps."


def test_script_is_valid_json_with_every_clip_once_and_a_line_each(tiny):
    stepper = CountingStepper(tiny.stepper("torch"))
    with torch.inference_mode():
        raw = script_json(tiny, stepper, "make a reel", CAPTIONS)
    entries = json.loads(raw)  # strict JSON, not the lenient parser
    assert sorted(e["clip"] for e in entries) == ["c1", "c2", "c3"]
    assert stepper.steps <= 3 * (1 + len(tiny._ids(NEXT)[0]))  # a handle and a separator per clip, no more
    for e in entries:  # each line is about its own clip: it starts with that clip's subject
        # (the stand-in tokenizer of the tiny model is uncased)
        assert e["line"].lower().startswith(subject(CAPTIONS[int(e["clip"][1:]) - 1]).lower()), entries
    script = parse_script(raw, CLIPS, "make a reel")
    assert script.source == "decoder" and script.problems == []


WORDS = ("apple brick cloud drum eagle flute grape harbor island jacket kettle lemon mirror needle orchid parrot "
         "quilt rocket saddle tulip umbrella violin walrus yacht zebra anchor bottle candle dolphin engine falcon").split()


class SplitDigits:
    """The tiny decoder with a tokenizer that writes every digit as its own token (as SmolLM2's does), so the
    handles c10 and up are two tokens and c1 is a prefix of c12."""

    def __init__(self, dec):
        self.dec = dec

    def __getattr__(self, name):
        return getattr(self.dec, name)

    def _ids(self, text):
        return self.dec._ids(re.sub(r"(?<=\d)(?=\d)", " ", text))


class WantsOrder:
    """A stepper that wants the clips in a given order: it scores the next token of the handle it wants highest,
    and the token after a handle once that handle is complete; every digit is a plausible, worse choice."""

    def __init__(self, dec, order):
        self.order, self.ids = list(order), lambda s: dec._ids(s)[0].tolist()
        self.vocab = len(dec.tokenizer)
        self.next = self.ids(NEXT)
        self.written, self.fed, self.separator = [], [], []

    def reset(self, batch_size, seq_len):
        pass

    def _logits(self):
        x = torch.zeros(1, self.vocab)
        for t in range(10):
            x[0, self.ids(str(t))[0]] = 1.0
        if len(self.written) < len(self.order) and not self.separator:
            want = self.ids(str(self.order[len(self.written)]))
            x[0, self.next[0] if self.fed == want else want[len(self.fed)]] = 10.0
        return x

    def prefill(self, input_ids=None, inputs_embeds=None, pad=None):
        return self._logits()

    def step(self, tokens, pos):
        t = int(tokens[0])
        if self.separator:  # the rest of the separator
            self.separator.pop(0)
        elif t == self.next[0]:
            self.written.append(self.order[len(self.written)])
            self.fed, self.separator = [], self.next[1:]
        else:
            self.fed.append(t)
        return self._logits()

    def reorder(self, index, keep=0):
        pass


@pytest.mark.parametrize("n", [12, 31])
def test_scripts_of_many_clips_use_multi_token_handles(tiny, n):
    dec = SplitDigits(tiny)
    assert len(dec._ids("12")[0]) == 2  # c12 is two tokens and starts like c1
    captions = [f"A {w}, or perhaps something else" for w in WORDS[:n]]
    order = [12, 1, 10, 2, 11, 3] + [k for k in range(n, 0, -1) if k not in (12, 1, 10, 2, 11, 3)]
    with torch.inference_mode():
        raw = script_json(dec, WantsOrder(dec, order), "reel", captions)
    entries = json.loads(raw)
    assert [e["clip"] for e in entries] == [f"c{k}" for k in order]  # c1 is not taken where c12 was wanted
    for k, e in zip(order, entries):  # each line starts with its own clip's subject (no word starts another)
        assert [w for w in WORDS[:n] if e["line"].lower().startswith(f"a {w}")] == [WORDS[k - 1]], e
    clips = [(f"v{i}#00", c) for i, c in enumerate(captions, 1)]
    script = parse_script(raw, clips, "reel")
    assert script.source == "decoder" and script.problems == [] and len(script.entries) == n


def test_write_script_uses_structured_decoding_on_a_stepper_backend():
    from atomkit.pipeline.tasks import write_script

    with atomkit.Session("tiny-default", device="cpu") as s:
        idx = s.retrieve([atomkit.sample_videos()[0]], "a reel", k=2)
        script = write_script(s, "a reel", idx)
    assert script.source == "decoder" and sorted(script.order) == sorted(h.clip.id for h in idx)
    assert len(json.loads(script.raw)) == len(idx)
    # the tiny LM's lines are noise: a line with a number or an unreported object is replaced by the clip's caption
    captions = {h.clip.id: h.clip.caption for h in idx}
    replaced = {e.clip_id for e in script.entries if e.narration == captions[e.clip_id]}
    assert len(script.problems) == len(replaced) and all(f"narration for {c} " in " ".join(script.problems)
                                                         for c in replaced)


@pytest.mark.integration
def test_smollm2_scripts_always_parse():
    clips = [("a#0", "A king penguin (a kind of bird), or perhaps a sea lion."), ("b#0", "A sports car on a road."),
             ("c#0", "An academic gown (a kind of clothing), or perhaps a bow tie.")]
    with atomkit.Session("default", device="cpu", decode=atomkit.config.exact()) as s:
        dec = s.get("decoder")
        for prompt in ("make a highlight reel", "show the animals", "vehicles and movement"):
            with torch.inference_mode():
                raw = script_json(dec, dec.stepper("torch"), prompt, [c for _, c in clips])
            script = parse_script(raw, clips, prompt)
            assert script.source == "decoder" and script.problems == [], raw
            assert sorted(script.order) == ["a#0", "b#0", "c#0"]
            caption = dict(clips)
            for e in script.entries:  # a line of its own for each clip, starting with its subject
                assert e.narration.startswith(subject(caption[e.clip_id])), raw
            # the decoder wrote on after the subject ("A king penguin, with its majestic appearance ...")
            assert sum(len(e.narration) > len(subject(caption[e.clip_id])) + 1 for e in script.entries) >= 2, raw
