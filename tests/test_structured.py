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
import re

from atomkit.structured import LINE_OPEN, MIN_LINE_TOKENS, NEXT_ENTRY, WORD_SLACK, script_json

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
    line_tokens = [len(tiny._ids(e["line"])[0]) for e in entries]
    if budget == 160:  # fixed pieces + lines within the budget
        assert stepper.steps <= budget
    else:  # 40 tokens hardly cover the fixed pieces: every line still gets MIN_LINE_TOKENS (+ a word's end)
        assert max(line_tokens) <= MIN_LINE_TOKENS + WORD_SLACK


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


class SplitDigits:
    """The tiny decoder with a tokenizer that writes every digit as its own token (as SmolLM2's does), so the
    handles c10 and up are two tokens and c1 is a prefix of c12."""

    def __init__(self, dec):
        self.dec, self.tokenizer = dec, dec.tokenizer

    def _ids(self, text):
        return self.dec._ids(re.sub(r"(?<=\d)(?=\d)", " ", text))

    def render(self, messages):
        return self.dec.render(messages)

    def stop_ids(self):
        return self.dec.stop_ids()


class WantsOrder:
    """A stepper that wants the clips in a given order: while a handle is written it scores the next token of
    the handle it wants (and the token after a handle once that handle is complete) highest; a narration line
    is "clip <k>" and then a quote."""

    def __init__(self, dec, order):
        self.order, self.ids = list(order), lambda s: dec._ids(s)[0].tolist()
        self.vocab = len(dec.tokenizer)
        self.open, self.next_entry = self.ids(LINE_OPEN), self.ids(NEXT_ENTRY)
        self.end = self.open[0]
        self.quote = next(i for i in range(self.vocab) if '"' in dec.tokenizer.decode([i]))
        self.written, self.fed, self.mode, self.line = [], [], "handle", []

    def reset(self, batch_size, seq_len):
        pass

    def _logits(self):
        x = torch.zeros(1, self.vocab)
        if self.mode == "handle":
            want = self.ids(str(self.order[len(self.written)]))
            done = self.fed[-len(want):] == want if len(self.fed) >= len(want) else False
            x[0, self.end if done else want[len(self.fed)]] = 10.0
            for t in range(10):  # every other digit is a plausible but worse choice
                x[0, self.ids(str(t))[0]] += 1.0
        elif not self.fed:
            words = self.ids(f" clip {self.written[-1]}")
            x[0, words[len(self.line)] if len(self.line) < len(words) else self.quote] = 10.0
        return x

    def prefill(self, input_ids=None, inputs_embeds=None, pad=None):
        return self._logits()

    def step(self, tokens, pos):
        t = int(tokens[0])
        if self.mode == "handle":
            if t == self.end:
                self.written.append(self.order[len(self.written)])
                self.mode, self.line, self.fed = "line", [], self.open[1:]
            else:
                self.fed.append(t)
        elif self.fed:  # the rest of the line's opening
            self.fed = self.fed[1:]
        else:
            self.line.append(t)
            if self.line[-len(self.next_entry):] == self.next_entry:
                self.mode = "handle"
        return self._logits()

    def reorder(self, index, keep=0):
        pass


@pytest.mark.parametrize("n", [12, 31])
def test_scripts_of_many_clips_use_multi_token_handles(tiny, n):
    dec = SplitDigits(tiny)
    assert len(dec._ids("12")[0]) == 2  # c12 is two tokens and starts like c1
    clips = [(f"v{i}#00", f"caption {i}") for i in range(1, n + 1)]
    order = [12, 1, 10, 2, 11, 3] + [k for k in range(n, 0, -1) if k not in (12, 1, 10, 2, 11, 3)]
    raw = script_json(dec, WantsOrder(dec, order), script_messages("reel", clips), n, max_new_tokens=160)
    entries = json.loads(raw)
    assert [e["clip"] for e in entries] == [f"c{k}" for k in order]  # c1 is not taken where c12 was wanted
    lines = [re.sub(r"(?<=\d) (?=\d)", "", e["line"]) for e in entries]  # the tokenizer spaced the digits
    assert lines == [f"clip {k}" for k in order]  # a line written for each clip
    script = parse_script(raw, clips)
    assert script.source == "decoder" and script.problems == [] and len(script.entries) == n


def test_write_script_uses_structured_decoding_on_a_stepper_backend():
    from atomkit.tasks import write_script

    with atomkit.Session("tiny-default", device="cpu") as s:
        idx = s.retrieve([atomkit.sample_videos()[0]], "a reel", k=2)
        script = write_script(s, "a reel", idx)
    assert script.source == "decoder" and script.problems == []
    assert json.loads(script.raw) and len(script.entries) == len(idx)


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
