"""Structured script decoding: the program writes the JSON, the decoder makes the choices.

A 135M chat model asked for a JSON script rarely writes valid JSON (greedy decoding ran to the whole
budget without closing the array), and when it does, it copies the narration of the prompt's format
example into every line. So the script is made in two passes over the resident decoder:

1. **Order**: the decoder is shown the ranked clips as handles ``c1``, ``c2``, ... and asked for the
   order as a JSON array of handles. The program writes ``["c`` ... ``", "c`` ... ``"]`` and the decoder
   picks each handle, greedily, among the clips not used yet (each clip exactly once). A handle may be
   several tokens (``c12`` is ``1`` ``2`` for SmolLM2): the choice is made token by token over the
   unused handles, the most likely token that continues one of them, or that ends one where it is
   complete (so ``c1`` is chosen only where the model prefers ending after ``1`` to going on to ``c12``).
   The fixed pieces are fed token by token, so the choices are conditioned on the text as it is parsed.
2. **Narration**: one line per clip, all clips as one batch (``TextDecoder.generate_batch``): the
   decoder is shown the request and that clip's caption, and its answer is started with the clip's
   subject (``An albatross``), so the line is about its own clip; the line is cut to its first sentence
   or clause.

The result is JSON text in the script format that ``atomkit.decode.script.parse_script`` reads
(``[{"clip": "c3", "line": "..."}, ...]``); it always parses and uses every clip once.
"""
from __future__ import annotations

import json
import re

import torch

from atomkit.decode.engine import Stepper
from atomkit.decode.script import ORDER_ANSWER_PREFIX, handles, narration_messages, order_messages

NEXT = '", "c'  # between two handles of the order array
CLOSE = '"]'
NARRATION_TOKENS = 20  # new tokens of a narration line (cut to a sentence or clause afterwards)


class _Cursor:
    """One row of a stepper: feeds tokens and keeps the position."""

    def __init__(self, stepper: Stepper, logits: torch.Tensor, pos: int):
        self.stepper, self.logits, self.pos = stepper, logits[0].float(), pos

    def feed(self, tokens: list[int]) -> None:
        for t in tokens:
            self.logits = self.stepper.step(torch.tensor([t]), self.pos)[0].float()
            self.pos += 1


def _choose(cur: _Cursor, ids: dict[int, list[int]], left: set[int], end: int) -> int:
    """The unused handle the model prefers, greedily over the token trie of the unused handles: at each step the
    most likely among the tokens that continue one of them, and ``end`` (the token after a handle) where a
    handle is complete. The chosen handle's tokens are fed; ``end`` is not."""
    prefix: list[int] = []
    while True:
        options: dict[int, int | None] = {}
        for k in left:
            seq = ids[k]
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


def choose_order(decoder, stepper: Stepper, prompt: str, captions: list[str]) -> list[int]:
    """The clips' play order (1-based handles), every clip once, chosen by the decoder as described above."""
    tokens = lambda text: decoder._ids(text)[0].tolist()  # noqa: E731 - no special tokens
    n = len(captions)
    ids = {k: tokens(str(k)) for k in range(1, n + 1)}
    nxt, close = tokens(NEXT), tokens(CLOSE)
    messages = order_messages(prompt, captions)
    prompt_ids = decoder._ids(decoder.render(messages) + ORDER_ANSWER_PREFIX).reshape(1, -1)
    stepper.reset(1, prompt_ids.shape[1] + n * (max(map(len, ids.values())) + len(nxt)) + 1)
    cur = _Cursor(stepper, stepper.prefill(prompt_ids), prompt_ids.shape[1])
    order, left = [], set(ids)
    while left:
        k = _choose(cur, ids, left, nxt[0] if len(left) > 1 else close[0])
        order.append(k)
        left.discard(k)
        if left:
            cur.feed(nxt)
    return order


def subject(caption: str) -> str:
    """What a caption is mainly about, to start its narration: the words before the first bracket, comma or full
    stop (``"An albatross (a kind of bird), or perhaps ..."`` -> ``"An albatross"``)."""
    return re.split(r"\s*[(,;:.!?]", caption.strip(), maxsplit=1)[0].strip()


def one_sentence(text: str) -> str:
    """The first sentence of ``text``; without one, the words up to the last clause break (a comma) of at least
    three words, else all of it; ending with a full stop. A clause the line already said is said once (a small
    model's greedy line can loop: "..., a life of its own, a life of its own.")."""
    text = " ".join(text.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    if m:
        return _without_repeated_clauses(m.group(1))
    cut = text.rfind(",")
    if cut > 0 and len(text[:cut].split()) >= 3:
        text = text[:cut]
    return _without_repeated_clauses(text.rstrip(" ,;:-") + ".") if text else ""


def _without_repeated_clauses(sentence: str) -> str:
    """``sentence`` with each comma-separated clause kept at its first occurrence only (case and spacing aside)."""
    body, end = sentence[:-1], sentence[-1]
    seen, kept = set(), []
    for clause in body.split(","):
        key = " ".join(clause.lower().split())
        if key and key in seen:
            continue
        seen.add(key)
        kept.append(clause)
    return ",".join(kept) + end


def sentence_end_ids(decoder) -> list[int]:
    """Tokens that end a narration line where they are generated: a full stop, a question or exclamation mark, a
    line break (each where the tokenizer has it as one token). A row stops there instead of running to
    ``NARRATION_TOKENS``; ``one_sentence`` would cut the line at the same place."""
    found = set()
    for text in (".", "!", "?", "\n", ".\n", "\n\n"):
        ids = decoder._ids(text)[0].tolist()
        if len(ids) == 1:
            found.add(ids[0])
    return sorted(found)


def narrations(decoder, prompt: str, captions: list[str], backend: str = "auto",
               max_new_tokens: int = NARRATION_TOKENS) -> list[str]:
    """One narration line per caption, decoded as one batch (greedy): each answer starts with its clip's subject
    and ends at its first sentence end."""
    starts = [subject(c) for c in captions]
    texts = [decoder.render(narration_messages(prompt, c)) + s for c, s in zip(captions, starts)]
    rows = decoder.generate_batch(prompts=[decoder._ids(t)[0] for t in texts], max_new_tokens=max_new_tokens,
                                  num_beams=1, backend=backend, stop=sentence_end_ids(decoder))
    lines = []
    for start, row in zip(starts, rows):  # decoded with the start's tokens, so the words join as the model wrote them
        text = decoder.tokenizer.decode(decoder._ids(start)[0].tolist() + row.tolist(), skip_special_tokens=True)
        lines.append(one_sentence(text.split("\n")[0]))
    return lines


def script_json(decoder, stepper: Stepper, prompt: str, captions: list[str], backend: str = "auto") -> str:
    """The assembly script of the ranked ``captions`` as JSON text (``[{"clip": "c3", "line": "..."}, ...]``):
    the order chosen by the decoder over ``stepper``, a narration line written for every clip."""
    order = choose_order(decoder, stepper, prompt, captions)
    lines = narrations(decoder, prompt, [captions[k - 1] for k in order], backend)
    hs = handles(len(captions))
    return json.dumps([{"clip": hs[k - 1], "line": line} for k, line in zip(order, lines)], ensure_ascii=False)
