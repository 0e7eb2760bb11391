"""The language decoder: a causal LM that writes captions (from visual input) and scripts (text only).

One ``TextDecoder`` serves both subtasks, which is the point of ATOM's module reuse. Two ways of
giving it the clip:

* concept bridge (``default``): the encoder's top ImageNet concepts are written into the prompt;
  no training is needed to connect a classifier to a chat LM;
* visual prefix (``atom-paper``): per-frame features go through a learned projector into the LM's
  embedding space and are spliced into the prompt where ``<video>`` stands.
"""
from __future__ import annotations

import threading
import weakref
from pathlib import Path

from typing import Sequence

import torch
from torch import nn

from atomkit.config import DecodeConfig
from atomkit.decode.prompts import CAPTION_SYSTEM, concept_prompt  # noqa: F401 (re-exported)
from atomkit.models.encoder import Encoded

VIDEO_PLACEHOLDER = "<video>"

_GENERATION_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_MAKING_LOCKS = threading.Lock()


class TextDecoder(nn.Module):
    """A causal LM with its tokenizer and, for visual-prefix models, a projector.

    Args:
        lm: a transformers causal LM (decoded by ``atomkit.decode.engine``; ``generate`` is the reference).
        tokenizer: its tokenizer. A random-weight model may run with a stand-in tokenizer whose
            vocabulary is smaller than the LM's; ids outside it are folded into it for display.
        projector: maps (T, D_vision) features to (T, D_lm) prefix embeddings; None = concept bridge.
        stop_at_eos: stop at the end-of-sequence token. Random-weight models set False so that every
            run generates exactly ``max_new_tokens`` (what latency work needs).
    """

    def __init__(self, lm: nn.Module, tokenizer, *, projector: nn.Module | None = None,
                 stop_at_eos: bool = True):
        super().__init__()
        self.lm = lm
        self.projector = projector
        self.tokenizer = tokenizer
        self.stop_at_eos = stop_at_eos
        self.store: Path | None = None  # the engine store folder (atomkit.decode.store); None: pack in memory

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def generation(self) -> threading.RLock:
        """The lock a whole generation holds: the KV cache of a decoder's stepper (or program) lives from a
        prefill to the last step, so two generations must not interleave on it. ``generate_ids``,
        ``generate_batch`` and the stepper users (``atomkit.decode.grounded``, the structured script of
        ``atomkit.pipeline.tasks.write_script``) hold it; code that drives ``engine()`` or ``stepper()`` itself from
        several threads holds it too.
        Re-entrant; kept outside the module's state (a deep copy gets its own)."""
        with _MAKING_LOCKS:
            lock = _GENERATION_LOCKS.get(self)
            if lock is None:
                lock = _GENERATION_LOCKS[self] = threading.RLock()
            return lock

    # -- prompts ---------------------------------------------------------------------------------
    def render(self, messages: list[dict]) -> str:
        """Chat messages -> prompt text, with the model's chat template when it has one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def caption_messages(self, enc: Encoded) -> list[dict]:
        if self.projector is not None:
            user = f"{VIDEO_PLACEHOLDER}\nDescribe this video clip in one short sentence."
        else:
            user = concept_prompt(enc.concepts)
        return [{"role": "system", "content": CAPTION_SYSTEM}, {"role": "user", "content": user}]

    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    # -- generation ------------------------------------------------------------------------------
    def engine(self, backend: str = "auto"):
        """The decode engine of ``backend`` (see ``atomkit.decode.engine``), built once and kept.

        ``auto`` is the exact fp32 engine (``torch``) when the LM is a Llama it can run, else
        transformers ``generate`` (``hf``).
        """
        from atomkit.decode.engine import get_engine, resolve_backend

        name = resolve_backend(backend, self)
        engines = self.__dict__.setdefault("_engines", {})
        if name not in engines:
            kept = self.__dict__.get("_kept_for")
            if kept is not None:
                from atomkit.errors import AtomkitError

                raise AtomkitError(f"this decoder keeps only what decode backend {kept!r} needs (its float matrices "
                                   f"were released when it loaded); open a Session with backend {name!r} to decode "
                                   f"with it (--backend {name})")
            engines[name] = get_engine(name, self)
        return engines[name]

    def keep_only_engine(self, backend: str) -> int:
        """Release the LM's layer matrices when ``backend``'s engine holds its own copy of all of them (int8, int4,
        bf16: packed or converted weights), keeping the embedding table, norms and rotary tables it reads; returns
        the bytes released (0 when the engine reads the model's matrices). Afterwards only that engine decodes:
        the LM's own forward pass and other backends raise a clear error."""
        stepper = self.stepper(backend)
        if stepper is None or getattr(stepper, "needs_model_matrices", lambda: True)():
            return 0
        from atomkit.decode.engine import resolve_backend

        freed = 0
        for layer in self.lm.model.layers:
            for mod in layer.modules():
                if isinstance(mod, nn.Linear) and not getattr(mod.weight, "atomkit_released", False):
                    w = mod.weight
                    freed += w.numel() * w.element_size()
                    mod.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)
                    mod.weight.atomkit_released = True
        self.__dict__["_kept_for"] = resolve_backend(backend, self)
        return freed

    def engine_bytes(self) -> int:
        """Bytes the built decode engines hold beyond the LM's own weights (packed weights, bf16 prefill copies,
        fused matrices); part of what a resident decoder costs."""
        engines = self.__dict__.get("_engines", {})
        return sum(getattr(getattr(e, "stepper", None), "held_bytes", lambda: 0)() for e in engines.values())

    def stop_ids(self) -> list[int]:
        """The token ids decoding stops at: the LM's EOS ids, none when ``stop_at_eos`` is False."""
        from atomkit.decode.engine import _eos_list

        return _eos_list(self.lm.generation_config.eos_token_id) if self.stop_at_eos else []

    def stops(self, extra: Sequence[int] = ()) -> list[int]:
        """The ids a generation stops at: ``stop_ids()`` and the caller's ``extra`` ones (a narration's sentence ends)."""
        return [*self.stop_ids(), *extra]

    def stepper(self, backend: str = "auto"):
        """The engine's ``Stepper`` for token-by-token decoding (structured output), or None for ``hf``."""
        return getattr(self.engine(backend), "stepper", None)

    @torch.inference_mode()
    def generate_ids(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                     max_new_tokens: int, num_beams: int, backend: str = "auto") -> torch.Tensor:
        """New token ids (1-D) after the prompt, given as ids or as embeddings.

        Greedy or beam search with ``generate``'s semantics (beam: early stopping, length penalty 1);
        ``backend`` picks the engine (``atomkit.decode.engine.BACKENDS``; ``hf`` is ``generate`` itself).
        """
        with self.generation():
            out = self.engine(backend).generate(input_ids, inputs_embeds=inputs_embeds,
                                                **self._search(max_new_tokens, num_beams))
        return out[0]

    def _search(self, max_new_tokens: int, num_beams: int, stop: Sequence[int] = ()) -> dict:
        """The engine's search options: length, beams, this decoder's stop ids (and ``stop``) and padding id."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        return dict(max_new_tokens=max_new_tokens, num_beams=num_beams, eos_token_id=self.stops(stop) or None,
                    pad_token_id=pad)

    def decode_ids(self, ids: torch.Tensor) -> str:
        vocab = len(self.tokenizer)
        ids = ids.cpu()
        if ids.numel() and int(ids.max()) >= vocab:
            ids = ids.remainder(vocab)  # random-weight LM with a stand-in tokenizer
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()

    def chat(self, messages: list[dict], *, max_new_tokens: int, num_beams: int = 1, answer_prefix: str = "",
             backend: str = "auto") -> str:
        """Text-only generation (the assembly script).

        ``answer_prefix`` is written as the start of the assistant's answer (e.g. the opening of a
        JSON array) and returned in front of what the model continues with.
        """
        ids = self._ids(self.render(messages) + answer_prefix)
        new = self.generate_ids(ids, max_new_tokens=max_new_tokens, num_beams=num_beams, backend=backend)
        return answer_prefix + self.decode_ids(new)

    def caption(self, enc: Encoded, cfg: DecodeConfig = DecodeConfig()) -> str:
        """One caption for one encoded clip."""
        return self.captions([enc], cfg)[0]

    def captions(self, encs: Sequence[Encoded], cfg: DecodeConfig = DecodeConfig()) -> list[str]:
        """One caption per encoded clip, all decoded as one batch (every clip's beams in one search).

        A clip's caption can depend on which clips share its batch (padding and batch shape change the
        arithmetic in the last bits, and beam search may follow them), never on the executor or on
        which path asks: ``atomkit.pipeline.tasks.caption`` always groups clips the same way.
        """
        if not encs:
            return []
        if self.projector is None and cfg.captions == "grounded":
            from atomkit.decode.grounded import captions as grounded_captions

            return grounded_captions(self, [e.concepts for e in encs], cfg.backend, cfg.max_new_tokens)
        texts = [self.render(self.caption_messages(e)) for e in encs]
        if self.projector is None:
            prompt = dict(prompts=[self._ids(t)[0] for t in texts])
        else:
            prompt = dict(embeds=[self.prefix_embeds(t, e.features)[0] for t, e in zip(texts, encs)])
        rows = self.generate_batch(**prompt, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                                   backend=cfg.backend)
        out = [first_sentence_line(self.decode_ids(r)) for r in rows]
        if self.projector is None and cfg.captions == "free":  # one that claims more than was seen: the grounded form
            from atomkit.decode.grounded import captions as grounded_captions
            from atomkit.models.concepts import grounding

            bad = [i for i, (t, e) in enumerate(zip(out, encs)) if e.concepts and not grounding(t, e.concepts)["grounded"]]
            self.caption_fallbacks = getattr(self, "caption_fallbacks", 0) + len(bad)
            if bad:
                fixed = grounded_captions(self, [encs[i].concepts for i in bad], cfg.backend, cfg.max_new_tokens)
                for i, text in zip(bad, fixed):
                    out[i] = text
        return out

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[torch.Tensor] | None = None, *,
                       embeds: Sequence[torch.Tensor] | None = None, max_new_tokens: int, num_beams: int,
                       backend: str = "auto", stop: Sequence[int] = ()) -> list[torch.Tensor]:
        """New token ids (1-D, up to and including the first stop id) for each prompt, decoded as one batch.

        ``prompts``: 1-D id tensors of any lengths (left-padded into one batch); or ``embeds``: (L, H)
        prompt embeddings, batched when their lengths agree, else decoded one by one. ``stop``: more ids that
        end a row (besides EOS); the batch ends when every row has ended.
        """
        engine = self.engine(backend)
        opts = self._search(max_new_tokens, num_beams, stop)
        stops = opts["eos_token_id"] or []
        with self.generation():
            if embeds is not None:
                if len({e.shape for e in embeds}) == 1:
                    out = list(engine.generate(inputs_embeds=torch.stack(list(embeds)), **opts))
                else:
                    out = [engine.generate(inputs_embeds=e[None], **opts)[0] for e in embeds]
            else:
                out = list(engine.generate(list(prompts), **opts))
        return [until_stop(r, stops) for r in out]

    @torch.inference_mode()
    def prefix_embeds(self, text: str, features: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings with projected visual features in place of ``<video>`` (1, L, H)."""
        before, _, after = text.partition(VIDEO_PLACEHOLDER)
        embed = self.lm.get_input_embeddings()
        dev = self.device
        parts = [embed(self._ids(before).to(dev))[0],
                 self.projector(features.to(dev, embed.weight.dtype)),
                 embed(self._ids(after).to(dev))[0]]
        return torch.cat(parts, dim=0).unsqueeze(0)


def until_stop(ids: torch.Tensor, stop: Sequence[int]) -> torch.Tensor:
    """``ids`` up to and including the first stop id: a row of a batch without the filling after it."""
    if not stop:
        return ids
    hits = torch.isin(ids, torch.tensor(list(stop), dtype=ids.dtype)).nonzero()
    return ids[:int(hits[0]) + 1] if len(hits) else ids


def first_sentence_line(text: str) -> str:
    """Captions are one line: keep the first non-empty line of the model's answer."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


class Projector(nn.Module):
    """Vision features -> LM embedding space (LLaVA-style two-layer MLP)."""

    def __init__(self, vision_dim: int, lm_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
