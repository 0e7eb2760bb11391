"""Structured decoding of the assembly script: the decoder fills in a JSON array it cannot break.

A 135M chat model asked for JSON rarely writes valid JSON, and greedy decoding runs on for every
one of its ``script_max_new_tokens`` (it never closes the array). Here the structure is written by
the program and only the choices are the model's, all greedy over an engine ``Stepper``
(``atomkit.engine``):

    [{"clip": "c<k>", "line": "<narration>"}, ...]

* ``<k>``: the most likely handle among the clips not used yet (each clip at most once), chosen token by token
  over the handles' tokens (``c12`` may be two tokens): at each step the most likely token that continues an
  unused handle, or that ends one;
* ``<narration>``: free tokens to the end of a sentence, until the model wants a quote or a newline,
  or the line budget (a word in progress may finish);
* every retrieved clip gets an entry: the script orders the top clips, the model picks the order.

The fixed pieces are fed to the model token by token, so its choices are conditioned on the text
exactly as it will be parsed. The result always parses (``atomkit.script.parse_script``) and costs
a fraction of free decoding: a few tokens per entry instead of the whole budget.
"""
from __future__ import annotations

import torch

from .engine import Stepper
from .script import SCRIPT_ANSWER_PREFIX

NEXT_ENTRY = ', {"clip": "c'
LINE_OPEN = '", "line": "'
ENTRY_CLOSE = '"}'


class _Cursor:
    """One row of a stepper: feeds tokens and keeps the position."""

    def __init__(self, stepper: Stepper, logits: torch.Tensor, pos: int):
        self.stepper, self.logits, self.pos = stepper, logits[0].float(), pos

    def feed(self, tokens: list[int]) -> None:
        for t in tokens:
            self.logits = self.stepper.step(torch.tensor([t]), self.pos)[0].float()
            self.pos += 1


MIN_LINE_TOKENS = 8  # every clip's narration line may have at least this many tokens, whatever the budget
WORD_SLACK = 6  # past its budget a line may still finish the word it is in, up to this many tokens


def _choose(cur: _Cursor, handles: dict[int, list[int]], left: set[int], end: int) -> int:
    """The unused handle the model prefers, greedily over the token trie of the unused handles: at each step the
    most likely among the tokens that continue one of them, and ``end`` (the token after a handle) where a
    handle is complete. The chosen handle's tokens are fed; ``end`` is not."""
    prefix: list[int] = []
    while True:
        options: dict[int, int | None] = {}
        for k in left:
            seq = handles[k]
            if seq[:len(prefix)] == prefix:
                if len(seq) == len(prefix):
                    options[end] = k
                else:
                    options.setdefault(seq[len(prefix)], None)
        tok = max(options, key=lambda t: cur.logits[t]) if len(options) > 1 else next(iter(options))
        if tok == end:
            return options[end]
        prefix.append(tok)
        cur.feed([tok])


def script_json(decoder, stepper: Stepper, messages: list[dict], n_clips: int, *, max_new_tokens: int,
                max_line_tokens: int = 20) -> str:
    """The script as JSON text written under the grammar above.

    Every clip gets an entry; the narration lines share what ``max_new_tokens`` leaves after the fixed pieces
    and handles, at most ``max_line_tokens`` and at least ``MIN_LINE_TOKENS`` each (so a script of many clips
    may take more than ``max_new_tokens`` steps rather than leave lines empty).
    """
    ids = lambda text: decoder._ids(text)[0].tolist()  # noqa: E731 - no special tokens
    handles = {k: ids(str(k)) for k in range(1, n_clips + 1)}
    stop = set(decoder.stop_ids())  # none for random-weight decoders: their lines run to the budget
    fixed = {s: ids(s) for s in (NEXT_ENTRY, LINE_OPEN, ENTRY_CLOSE)}
    per_entry = (max(map(len, handles.values())) + len(fixed[LINE_OPEN]) + len(fixed[ENTRY_CLOSE])
                 + len(fixed[NEXT_ENTRY]))
    line_budget = min(max_line_tokens, max(MIN_LINE_TOKENS, (max_new_tokens - n_clips * per_entry) // n_clips))

    prompt = decoder._ids(decoder.render(messages) + SCRIPT_ANSWER_PREFIX).reshape(1, -1)
    stepper.reset(1, prompt.shape[1] + n_clips * (per_entry + line_budget + WORD_SLACK))
    cur = _Cursor(stepper, stepper.prefill(prompt), prompt.shape[1])
    text, left = SCRIPT_ANSWER_PREFIX, set(handles)
    while True:
        k = _choose(cur, handles, left, fixed[LINE_OPEN][0])
        left.discard(k)
        cur.feed(fixed[LINE_OPEN])
        line: list[int] = []
        while True:
            tok = int(cur.logits.argmax())
            piece = decoder.tokenizer.decode([tok])
            if tok in stop or any(c in piece for c in '"\\\n\r\t'):  # would end or break the JSON string
                break
            if len(line) >= line_budget and not (piece[:1].isalnum() and len(line) < line_budget + WORD_SLACK):
                break  # at the budget only a word in progress goes on, so a line is not cut inside a word
            line.append(tok)
            cur.feed([tok])
            if "." in piece and len(line) > 3:  # one sentence
                break
        text += f"{k}{LINE_OPEN}{decoder.tokenizer.decode(line).strip()}{ENTRY_CLOSE}"
        if not left:
            return text + "]"
        cur.feed(fixed[ENTRY_CLOSE] + fixed[NEXT_ENTRY])
        text += NEXT_ENTRY
