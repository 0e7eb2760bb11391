"""Grounded captions: the decoder chooses what the clip mainly shows among what the encoder saw, and the
sentence around that choice is written by the program, so a caption never names an object the encoder did
not report and never carries a probability or an id.

    "<Subject>[ (a kind of <broader word>)][ with <seen>[, <seen> and <seen>]][, or perhaps <other>[, <other> or <other>]]."

* ``<Subject>``: one of the clip's top concepts, the one that maximises the decoder's mean log-probability
  of the phrase after "The clip mainly shows" (it sees all the concepts, most likely first, with no
  numbers) plus the log of the classifier's probability: the decoder can promote a plausible subject over
  a likelier but odd class, never pick something outside the list;
* ``<broader word>``: the most specific broader word of the subject (``atomkit.models.concepts``), when it has one;
* ``with <seen>``: the detector's objects among the others (boxes of people and COCO objects, there together); where
  people are among them, they lead the sentence and the subject joins the others ("A person with a bow tie and a
  chair");
* ``<other>``: the next concepts in the classifier's order, at most ``MAX_OTHERS``, each at least
  ``MIN_SHARE`` of the subject's probability, and fewer where the caption would pass its token budget.

A group of clips costs one batched prefill of their prompts, spread over every candidate phrase, plus a
step per phrase token, on the same decode engine (and so the same quantized weights) as free captions; a
``.pte`` program (a few rows, one prompt at a time) scores a prompt's phrases that many at a time, and a decoder
without a stepper (``hf``) with the LM's forward pass.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from atomkit.models.concepts import broader, detector_labels, head, with_article
from atomkit.models.detector import PEOPLE_LABELS

MAX_CANDIDATES = 5
MAX_OTHERS = 4
MIN_SHARE = 0.02
ANSWER_PREFIX = "The clip mainly shows"


def _name(label: str) -> str:
    return label.split(",")[0].strip()


def candidates(concepts) -> list[tuple[str, float]]:
    """The concepts the subject is chosen from: the top ``MAX_CANDIDATES``, duplicates of a name dropped."""
    seen, out = set(), []
    for label, p in concepts:
        name = _name(label)
        if name.lower() not in seen:
            seen.add(name.lower())
            out.append((name, float(p)))
    return out[:MAX_CANDIDATES]


def messages(concepts) -> list[dict]:
    from atomkit.decode.prompts import CAPTION_SYSTEM

    seen = ", ".join(n for n, _ in candidates(concepts))
    user = (f"A classifier looked at the frames of a video clip. Its guesses, most likely first: {seen}. "
            "Say what the clip mainly shows.")
    return [{"role": "system", "content": CAPTION_SYSTEM}, {"role": "user", "content": user}]


def render(subject: str, concepts, max_others: int = MAX_OTHERS) -> str:
    """The sentence for a chosen subject (see the module docstring)."""
    cands = dict(candidates(concepts))
    text = with_article(subject)
    wider = broader(subject)[:1]
    if wider and wider[0].lower() != head(subject):  # "a bow tie" needs no "(a kind of tie)"
        text += f" (a kind of {wider[0]})"
    p0 = cands.get(subject, 0.0)
    others = [n for n, p in cands.items() if n != subject and p >= MIN_SHARE * p0][:max_others]
    seen = detector_labels()
    together = [with_article(n) for n in others if n.lower() in seen]  # the detector's boxes: there at once
    guesses = [with_article(n) for n in others if n.lower() not in seen]  # the classifier's: one of them, perhaps
    people = next((n for n in others if n.lower() in PEOPLE_LABELS), None)
    if people is not None and subject.lower() not in PEOPLE_LABELS:  # "a person with a bow tie", not the reverse
        together = [text] + [t for t in together if t != with_article(people)]
        text = with_article(people)
    if together:
        text += " with " + _listed(together, "and")
    if guesses:
        text += ", or perhaps " + _listed(guesses, "or")
    return text[0].upper() + text[1:] + "."


def _listed(items: list[str], last: str) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {last} " + items[-1]


def _options(decoder, cands) -> list[list[int]]:
    return [decoder._ids(" " + with_article(n))[0].tolist() for n, _ in cands]


@torch.inference_mode()
def _hf_scores(decoder, prompt: torch.Tensor, options: list[list[int]]) -> list[float]:
    """Mean log-probability of each option after ``prompt`` with the LM's own forward pass (right-padded)."""
    n, L = max(len(o) for o in options), len(prompt)
    rows = torch.full((len(options), L + n), int(prompt[-1]), dtype=torch.long)
    for i, o in enumerate(options):
        rows[i, :L] = prompt
        rows[i, L:L + len(o)] = torch.tensor(o)
    logp = decoder.lm(rows.to(decoder.device)).logits.float().log_softmax(-1).cpu()
    return [sum(float(logp[i, L - 1 + j, t]) for j, t in enumerate(o)) / len(o) for i, o in enumerate(options)]


@torch.inference_mode()
def _stepper_scores(stepper, prompts: list[torch.Tensor], options: list[list[list[int]]], pad_id: int) -> list[list[float]]:
    """Mean log-probability of every option after its prompt: all prompts prefilled as one left-padded batch,
    each row then spread over its options (``reorder``), and every option's tokens fed in one pass (``extend``; a
    stepper without it, a program, steps all options together one token at a time)."""
    from atomkit.decode.engine import _as_batch

    ids, pad = _as_batch(prompts, pad_id)
    counts = torch.tensor([len(o) for o in options])
    flat = [o for opts in options for o in opts]
    b, n, L = len(flat), max(len(o) for o in flat), ids.shape[1]
    stepper.reset(b, L + n)
    logits = stepper.prefill(ids, pad=pad)
    spread = torch.repeat_interleave(torch.arange(len(prompts)), counts)
    stepper.reorder(spread)
    logits = logits[spread.to(logits.device)]
    toks = torch.tensor([o + o[-1:] * (n - len(o)) for o in flat])  # (b, n), short options repeat their last token
    live = torch.tensor([[j < len(o) for j in range(n)] for o in flat])
    if n > 1 and hasattr(stepper, "extend"):  # every option's tokens after the first in one pass
        logits = torch.cat([logits[:, None], stepper.extend(toks[:, :-1], L)], dim=1)  # (b, n, V)
        lp = logits.float().log_softmax(-1).cpu().gather(-1, toks[..., None])[..., 0]
    else:  # a stepper of one token at a time (a program)
        lp = torch.zeros(b, n)
        for j in range(n):
            lp[:, j] = logits.float().log_softmax(-1).cpu()[torch.arange(b), toks[:, j]]
            if j + 1 < n:
                logits = stepper.step(toks[:, j], L + j)
    total = torch.where(live, lp, torch.zeros(b, n)).sum(1)
    scores = (total / torch.tensor([len(o) for o in flat])).tolist()
    return [scores[int(a):int(a) + int(c)] for a, c in zip(torch.cumsum(counts, 0) - counts, counts)]


@torch.inference_mode()
def subjects(decoder, concept_lists: Sequence, backend: str = "auto") -> list[str | None]:
    """Per clip, the candidate the decoder (with the classifier's prior) picks as the subject; None for a
    clip without concepts. Clips are scored as one batch where the engine batches."""
    cands = [candidates(c) for c in concept_lists]
    todo = [i for i, c in enumerate(cands) if len(c) > 1]
    lm: dict[int, list[float]] = {}
    if todo:
        prompts = {i: decoder._ids(decoder.render(messages(concept_lists[i])) + ANSWER_PREFIX)[0] for i in todo}
        options = {i: _options(decoder, cands[i]) for i in todo}
        stepper = decoder.stepper(backend)
        with decoder.generation():  # the stepper's cache is the decoder's: one generation at a time
            if stepper is None:
                lm = {i: _hf_scores(decoder, prompts[i], options[i]) for i in todo}
            elif stepper.max_batch_size is None:
                pad_id = decoder._search(1, 1)["pad_token_id"]
                lm = dict(zip(todo, _stepper_scores(stepper, [prompts[i] for i in todo], [options[i] for i in todo],
                                                    pad_id)))
            else:  # a program of a few rows: one prompt at a time, its options in groups of that many rows
                k = stepper.max_batch_size
                lm = {i: [s for j in range(0, len(options[i]), k)
                          for s in _stepper_scores(stepper, [prompts[i]], [options[i][j:j + k]], 0)[0]] for i in todo}
    out: list[str | None] = []
    for i, c in enumerate(cands):
        if not c:
            out.append(None)
        elif i not in lm:
            out.append(c[0][0])
        else:
            scores = [s + math.log(max(p, 1e-6)) for s, (_, p) in zip(lm[i], c)]
            out.append(c[max(range(len(c)), key=scores.__getitem__)][0])
    return out


def captions(decoder, concept_lists: Sequence, backend: str = "auto", max_tokens: int | None = None) -> list[str]:
    """One grounded caption per clip (its concepts [(label, prob), ...]). With ``max_tokens`` (the caption
    budget, ``DecodeConfig.max_new_tokens``), other concepts are left out until the caption fits; the subject
    always stays."""
    out = []
    for s, c in zip(subjects(decoder, concept_lists, backend), concept_lists):
        if s is None:
            out.append("Nothing the classifier recognises.")
            continue
        for others in range(MAX_OTHERS, -1, -1):
            text = render(s, c, others)
            if max_tokens is None or others == 0 or len(decoder._ids(text)[0]) <= max_tokens:
                break
        out.append(text)
    return out
