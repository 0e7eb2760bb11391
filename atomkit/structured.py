"""Structured decoding of the assembly script: the decoder fills in a JSON array it cannot break.

A 135M chat model asked for JSON rarely writes valid JSON, and greedy decoding runs on for every
one of its ``script_max_new_tokens`` (it never closes the array). Here the structure is written by
the program and only the choices are the model's, all greedy over an engine ``Stepper``
(``atomkit.engine``):

    [{"clip": "c<k>", "line": "<narration>"}, ...]

* ``<k>``: the most likely handle among the clips not used yet (each clip at most once);
* ``<narration>``: free tokens to the end of a sentence, until the model wants a quote or a newline,
  or ``max_line_tokens``;
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


def script_json(decoder, stepper: Stepper, messages: list[dict], n_clips: int, *, max_new_tokens: int,
                max_line_tokens: int = 20) -> str | None:
    """The script as JSON text written under the grammar above, or None when the tokenizer cannot
    express a clip handle as one token (the caller then decodes freely and parses leniently).

    Every clip gets an entry; the narration lines share what ``max_new_tokens`` leaves after the
    fixed pieces (at most ``max_line_tokens`` each, possibly none).
    """
    ids = lambda text: decoder._ids(text)[0].tolist()  # noqa: E731 - no special tokens
    digits = {}
    for k in range(1, n_clips + 1):
        tok = ids(str(k))
        if len(tok) != 1:
            return None
        digits[k] = tok[0]
    stop = set(decoder.stop_ids())  # none for random-weight decoders: their lines run to the budget
    fixed = {s: ids(s) for s in (NEXT_ENTRY, LINE_OPEN, ENTRY_CLOSE)}
    per_entry = 1 + len(fixed[LINE_OPEN]) + len(fixed[ENTRY_CLOSE]) + len(fixed[NEXT_ENTRY])
    line_budget = max(0, min(max_line_tokens, (max_new_tokens - n_clips * per_entry) // n_clips))

    prompt = decoder._ids(decoder.render(messages) + SCRIPT_ANSWER_PREFIX).reshape(1, -1)
    stepper.reset(1, prompt.shape[1] + n_clips * (per_entry + line_budget))
    cur = _Cursor(stepper, stepper.prefill(prompt), prompt.shape[1])
    text, left = SCRIPT_ANSWER_PREFIX, set(digits)
    while True:
        k = max(left, key=lambda j: cur.logits[digits[j]])
        left.discard(k)
        cur.feed([digits[k]])
        cur.feed(fixed[LINE_OPEN])
        line: list[int] = []
        while len(line) < line_budget:
            tok = int(cur.logits.argmax())
            piece = decoder.tokenizer.decode([tok])
            if tok in stop or any(c in piece for c in '"\\\n\r\t'):  # would end or break the JSON string
                break
            line.append(tok)
            cur.feed([tok])
            if "." in piece and len(line) > 3:  # one sentence
                break
        text += f"{k}{LINE_OPEN}{decoder.tokenizer.decode(line).strip()}{ENTRY_CLOSE}"
        if not left:
            return text + "]"
        cur.feed(fixed[ENTRY_CLOSE] + fixed[NEXT_ENTRY])
        text += NEXT_ENTRY

