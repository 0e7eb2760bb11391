"""Structured script decoding: the JSON is written by the program, the choices by the model.

Unit tests use the tiny random-weight decoder (its text is noise; the structure is what is tested)
and a scripted stepper whose preferences are known; the integration test runs SmolLM2."""
from __future__ import annotations

import json

import pytest
import torch

import atomkit
from atomkit.registry import LoadOptions, get_spec
from atomkit.script import parse_script, script_messages
from atomkit.structured import script_json

CLIPS = [("dog#00", "a dog jumps over a fence"), ("car#01", "a red car drives by"), ("cat#02", "a cat sleeps")]


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


@pytest.mark.parametrize("budget", [160, 40])
def test_script_is_valid_json_with_every_clip_once(tiny, budget):
    stepper = CountingStepper(tiny.stepper("torch"))
    with torch.inference_mode():
        raw = script_json(tiny, stepper, script_messages("make a reel", CLIPS), len(CLIPS), max_new_tokens=budget)
    entries = json.loads(raw)  # strict JSON, not the lenient parser
    assert sorted(e["clip"] for e in entries) == ["c1", "c2", "c3"]  # every clip once, whatever the budget
    script = parse_script(raw, CLIPS)
    assert script.source == "decoder" and script.problems == []
    if budget == 160:  # fixed pieces + lines within the budget
        assert stepper.steps <= budget
    else:  # 40 tokens hardly cover the fixed pieces: the lines get at most (40 - fixed) / 3 tokens each
        assert all(len(tiny._ids(e["line"])[0]) <= 2 for e in entries)


class PreferenceStepper:
    """A stepper whose next-token scores are fixed: it likes clip 3, then 1, then 2, and ends every
    narration after two words by asking for a quote."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab = len(tok)
        ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.pref = {ids("3")[0]: 3.0, ids("1")[0]: 2.0, ids("2")[0]: 1.0}
        self.words = ids(" hello world")
        self.quote = next(i for i in range(self.vocab) if '"' in tok.decode([i]))
        self.in_line = 0

    def reset(self, batch_size, seq_len):
        self.in_line = 0

    def _logits(self):
        x = torch.zeros(1, self.vocab)
        for t, v in self.pref.items():
            x[0, t] = v
        x[0, self.words[self.in_line] if self.in_line < len(self.words) else self.quote] = 10.0
        return x

    def prefill(self, input_ids=None, inputs_embeds=None, pad=None):
        return self._logits()

    def step(self, tokens, pos):
        t = int(tokens[0])
        self.in_line = self.in_line + 1 if t in self.words else 0
        return self._logits()

    def reorder(self, index, keep=0):
        pass


def test_the_model_picks_the_order_and_ends_the_line(tiny):
    raw = script_json(tiny, PreferenceStepper(tiny.tokenizer), script_messages("reel", CLIPS), 3, max_new_tokens=160)
    entries = json.loads(raw)
    assert [e["clip"] for e in entries] == ["c3", "c1", "c2"]  # its preference among clips not used yet
    assert all(e["line"] == "hello world" for e in entries)  # stopped where it asked for a quote


def test_write_script_uses_structured_decoding_on_a_stepper_backend():
    from atomkit.tasks import write_script

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
    clips = [("a#0", "a majestic sea lion and a king penguin"), ("b#0", "a red sports car on a road"),
             ("c#0", "a person in an academic gown talking")]
    with atomkit.Session("default", device="cpu") as s:
        dec = s.get("decoder")
        for prompt in ("make a highlight reel", "show the animals", "vehicles and movement"):
            with torch.inference_mode():
                raw = script_json(dec, dec.stepper("torch"), script_messages(prompt, clips), 3, max_new_tokens=160)
            script = parse_script(raw, clips)
            assert script.source == "decoder" and script.problems == [], raw
            assert sorted(script.order) == ["a#0", "b#0", "c#0"] and all(e.narration for e in script.entries)
