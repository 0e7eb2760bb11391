"""The decode engine: greedy and beam search over a small *stepper* interface, backends by name.

transformers ``generate`` spends most of its time per token on Python work around a 135M model
(cache objects, masks, logits processors, stopping criteria). The engine does one prefill, then one
``step`` per new token on a static KV cache, with the decode algorithms written out here with
``generate``'s semantics (greedy: argmax; beam: ``early_stopping=True``, ``length_penalty=1.0``, one
returned sequence, the same top-2k candidate bookkeeping), so fp32 steppers give generate's tokens.

The stepper interface (what a backend implements; ``atomkit.decode.llama.LlamaStepper`` is the reference)::

    name: str                  # shown in errors and benchmark results
    max_seq_len: int           # longest prompt + new tokens the stepper accepts
    max_batch_size: int | None # rows it can hold (None = any); the engine decodes row by row above it
    reset(batch_size, seq_len) # start a new generation: room for batch_size rows of seq_len positions;
                               # raise atomkit.errors.InputError when seq_len > max_seq_len
    prefill(input_ids=None, inputs_embeds=None, pad=None) -> logits (b, V) float32
                               # the prompt for rows 0..b-1 (b <= batch_size): ids (b, L) or embeddings
                               # (b, L, H); pad (b,) = left padding per row (prompts of different
                               # lengths), None when no row is padded; logits of each row's last position
    step(tokens, pos) -> logits (B, V) float32
                               # one token per row (B,) written at cache position pos (= L, L+1, ...)
    reorder(index, keep=0)     # row i of the cache becomes old row index[i] (B,); beam search uses it
                               # after every step and to copy one prefilled row to all beams of a prompt;
                               # positions < keep are equal in the rows index maps between (the prompt
                               # its beams share), so a stepper need not copy them

A stepper without batching sets ``max_batch_size = 1`` (beam search then needs ``num_beams == 1``;
the engine says so). A stepper without embeddings prefill raises ``InputError`` naming the reason.

Backends (``get_engine(name, decoder)``, ``BACKENDS``): ``hf`` is transformers ``generate`` (the
reference), ``torch`` the exact fp32 stepper (``auto`` on CUDA), the others trade exactness for
speed (bf16, int8, int4 weights; ``torch.compile``: ``compiled``, ``int4-compiled``; ``auto`` on a CPU is
``CPU_DEFAULT``, int4) and are compared to fp32 by token agreement in ``atomkit bench-decode``. A new
backend (e.g. an ExecuTorch program) is a stepper plus one entry in ``BACKENDS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from atomkit.config import BACKEND_NAMES, available_backends, check_backend  # noqa: F401 (re-exported)
from atomkit.errors import InputError


class Stepper(Protocol):
    name: str
    max_seq_len: int
    max_batch_size: int | None

    def reset(self, batch_size: int, seq_len: int) -> None: ...

    def prefill(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                pad: torch.Tensor | None = None) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor: ...

    def reorder(self, index: torch.Tensor, keep: int = 0) -> None: ...


Prompt = torch.Tensor | Sequence[torch.Tensor] | None


def _as_batch(input_ids: Prompt, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L) ids, left-padded when the prompts differ in length, and the padding per row (or None)."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        return ids.long(), None
    rows = [torch.as_tensor(r).long().flatten() for r in input_ids]
    if not rows or min(len(r) for r in rows) == 0:
        raise InputError("every prompt needs at least one token")
    n = max(len(r) for r in rows)
    pad = torch.tensor([n - len(r) for r in rows])
    ids = torch.full((len(rows), n), pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = r
    return ids, (pad if bool((pad > 0).any()) else None)


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(e) for e in eos_token_id] if isinstance(eos_token_id, (list, tuple)) else [int(eos_token_id)]


@dataclass
class Engine:
    """Greedy and beam search over a ``Stepper`` (see the module docstring)."""

    stepper: Stepper
    name: str

    @torch.inference_mode()
    def generate(self, input_ids: Prompt = None, *, inputs_embeds: torch.Tensor | None = None,
                 max_new_tokens: int, num_beams: int = 1, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int = 0) -> torch.Tensor:
        """New tokens (B, T) for B prompts, as ``generate`` returns them after the prompt.

        ``input_ids``: (B, L) or (L,) ids, or a list of 1-D prompts of any lengths (left-padded);
        or ``inputs_embeds`` (B, L, H). ``eos_token_id=None`` never stops early (exactly
        ``max_new_tokens``). Rows that stopped early are filled with ``pad_token_id``.
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_beams < 1:
            raise InputError(f"num_beams must be >= 1, got {num_beams}")
        if inputs_embeds is not None:
            emb = inputs_embeds if inputs_embeds.dim() == 3 else inputs_embeds[None]
            x, pad, (b, n) = dict(inputs_embeds=emb), None, emb.shape[:2]
        else:
            ids, pad = _as_batch(input_ids, pad_token_id)
            x, (b, n) = dict(input_ids=ids), ids.shape
        limit = getattr(self.stepper, "max_batch_size", None)
        if limit is not None and b * num_beams > limit:
            if num_beams > limit:
                raise InputError(f"backend {self.name!r} holds {limit} row(s): beam search with {num_beams} beams "
                                 "needs a batching backend (e.g. 'torch'); use num_beams=1 or another backend")
            rows = [self.generate(**_one_row(x, pad, i), max_new_tokens=max_new_tokens, num_beams=num_beams,
                                  eos_token_id=eos_token_id, pad_token_id=pad_token_id)[0] for i in range(b)]
            return _stack(rows, pad_token_id)
        eos = _eos_list(eos_token_id)
        self.stepper.reset(b * num_beams, n + max_new_tokens)
        logits = self.stepper.prefill(pad=pad, **x)
        if num_beams == 1:
            return greedy(self.stepper, logits, n, max_new_tokens, eos, pad_token_id)
        return beam_search(self.stepper, logits, n, max_new_tokens, num_beams, eos, pad_token_id)


def _one_row(x: dict, pad: torch.Tensor | None, i: int) -> dict:
    """Row i of a batch as its own prompt (padding removed)."""
    if "inputs_embeds" in x:
        return dict(inputs_embeds=x["inputs_embeds"][i:i + 1])
    ids = x["input_ids"][i]
    return dict(input_ids=ids[int(pad[i]):] if pad is not None else ids)


def _stack(rows: list[torch.Tensor], fill: int) -> torch.Tensor:
    n = max(len(r) for r in rows)
    out = torch.full((len(rows), n), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def greedy(stepper: Stepper, logits: torch.Tensor, prompt_len: int, max_new_tokens: int, eos: list[int],
           pad_token_id: int) -> torch.Tensor:
    """Argmax decoding from the prefill logits (B, V); rows that hit EOS continue as padding."""
    b = logits.shape[0]
    out = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long)
    eos_t = torch.tensor(eos, dtype=torch.long)
    unfinished = torch.ones(b, dtype=torch.bool)
    for t in range(max_new_tokens):
        nxt = logits.float().argmax(-1).cpu()
        if eos:
            nxt = torch.where(unfinished, nxt, pad_token_id)
            unfinished &= ~torch.isin(nxt, eos_t)
        out[:, t] = nxt
        if eos and not bool(unfinished.any()):
            return out[:, :t + 1]
        if t + 1 < max_new_tokens:
            logits = stepper.step(nxt, prompt_len + t)
    return out


def beam_search(stepper: Stepper, logits: torch.Tensor, prompt_len: int, max_new_tokens: int, num_beams: int,
                eos: list[int], pad_token_id: int, *, length_penalty: float = 1.0,
                early_stopping: bool = True) -> torch.Tensor:
    """Beam search as transformers 5 ``_beam_search`` does it (one returned sequence per prompt).

    Per step: log-softmax plus running scores, the top 2k (k = beams; more with several EOS ids)
    candidates over all beams, the best k not finished keep running, candidates among the top k that
    end (EOS or last step) compete for the k finished slots by score / length ** length_penalty, and
    the search stops when every slot is full (early stopping) or no running beam can beat them.
    """
    b, n, T = logits.shape[0], num_beams, max_new_tokens
    V = logits.shape[-1]
    stepper.reorder(torch.arange(b).repeat_interleave(n))  # the prompt's row to all its beams
    logits = logits.float().cpu().repeat_interleave(n, 0)
    K = max(2, 1 + len(eos)) * n
    top_n = torch.arange(K) < n
    eos_t = torch.tensor(eos, dtype=torch.long)
    fill = (pad_token_id or eos[0]) if eos else -1  # what generate fills short rows with
    running = torch.full((b, n, T), fill, dtype=torch.long)
    seqs = running.clone()
    run_scores = torch.zeros(b, n)
    run_scores[:, 1:] = -1e9
    scores = torch.full((b, n), -1e9)
    finished = torch.zeros(b, n, dtype=torch.bool)
    improvable = torch.ones(b, 1, dtype=torch.bool)
    lens = torch.zeros(b, n, dtype=torch.long)  # generated length of each finished slot
    offset = torch.arange(b)[:, None] * n
    for t in range(T):
        if t > 0:
            logits = stepper.step(running[:, :, t - 1].reshape(-1), prompt_len + t - 1).float().cpu()
        lp = F.log_softmax(logits, dim=-1).view(b, n, V) + run_scores[:, :, None]
        top_lp, top_idx = torch.topk(lp.reshape(b, n * V), K)
        beam, tok = top_idx // V, top_idx % V
        cand = torch.take_along_dim(running, beam[:, :, None], dim=1)
        cand[:, :, t] = tok
        hits = torch.isin(tok, eos_t) if eos else torch.zeros_like(tok, dtype=torch.bool)
        if t + 1 >= T:
            hits = torch.ones_like(hits)
        # the best n candidates that did not finish keep running
        alive = top_lp + hits.float() * -1e9
        keep = torch.topk(alive, n)[1]
        running = torch.take_along_dim(cand, keep[:, :, None], dim=1)
        run_scores = torch.take_along_dim(alive, keep, dim=1)
        src = torch.take_along_dim(beam, keep, dim=1)
        # candidates among the top n that finished compete for the finished slots
        just = hits & top_n[None]
        fin = top_lp / ((t + 1) ** length_penalty)
        fin = fin + (finished.all(-1, keepdim=True) & early_stopping).float() * -1e9
        fin = fin + (~improvable).float() * -1e9
        fin = fin + (~just) * -1e9
        m_scores = torch.cat((scores, fin), 1)
        best = torch.topk(m_scores, n)[1]
        seqs = torch.take_along_dim(torch.cat((seqs, cand), 1), best[:, :, None], dim=1)
        scores = torch.take_along_dim(m_scores, best, dim=1)
        lens = torch.take_along_dim(torch.cat((lens, torch.full((b, K), t + 1)), 1), best, dim=1)
        finished = torch.take_along_dim(torch.cat((finished, just), 1), best, dim=1)
        worst = torch.where(finished, scores.min(1, keepdim=True)[0], torch.tensor(-1e9))
        improvable = improvable & (run_scores[:, :1] / ((t + 1) ** length_penalty) > worst).any(-1, keepdim=True)
        done = (not bool(improvable.any())) or (bool(finished.all()) and early_stopping) or bool(hits.all())
        if done:
            break
        stepper.reorder((src + offset).reshape(-1), keep=prompt_len)  # beams move within their prompt
    length = int(lens[:, 0].max())
    return seqs[:, 0, :length]


@dataclass
class HFEngine:
    """The reference: transformers ``generate`` with the engine's call signature."""

    lm: torch.nn.Module
    name: str = "hf"

    @torch.inference_mode()
    def generate(self, input_ids: Prompt = None, *, inputs_embeds: torch.Tensor | None = None,
                 max_new_tokens: int, num_beams: int = 1, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int = 0) -> torch.Tensor:
        kwargs = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                      pad_token_id=pad_token_id, num_return_sequences=1, eos_token_id=eos_token_id)
        if eos_token_id is None:
            kwargs.update(min_new_tokens=max_new_tokens)
        if num_beams > 1:
            kwargs.update(early_stopping=True, length_penalty=1.0)
        dev = next(self.lm.parameters()).device
        if inputs_embeds is not None:
            e = inputs_embeds if inputs_embeds.dim() == 3 else inputs_embeds[None]
            mask = torch.ones(e.shape[:2], dtype=torch.long, device=dev)
            return self.lm.generate(inputs_embeds=e.to(dev), attention_mask=mask, **kwargs).cpu()
        ids, pad = _as_batch(input_ids, pad_token_id)
        mask = torch.ones_like(ids)
        if pad is not None:
            mask = (torch.arange(ids.shape[1])[None, :] >= pad[:, None]).long()
        out = self.lm.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kwargs)
        return out[:, ids.shape[1]:].cpu()


def _llama(**opts) -> Callable:
    def make(decoder, max_seq_len: int | None = None):
        from atomkit.decode.store import stepper  # packed once, then read from the decoder's engine store

        return stepper(decoder, max_seq_len=max_seq_len, **opts)
    return make


# name -> (what it is, stepper factory(decoder, max_seq_len) or None for generate itself)
BACKENDS: dict[str, tuple[str, Callable | None]] = {
    "hf": ("transformers generate, eager (the reference)", None),
    "torch": ("static KV cache, fp32, eager: generate's arithmetic, exact", _llama()),
    "fused": ("fp32, q/k/v and gate/up fused into one matmul each (fewer calls, not bit-exact)", _llama(fuse=True)),
    "compiled": ("fp32, the one-token step under torch.compile (inductor)", _llama(fuse=True, compile=True)),
    "bf16": ("bf16 weights (half the bytes per token), fp32 activations", _llama(weights="bf16", fuse=True)),
    "int8": ("int8 weights, per-channel scales (torch._weight_int8pack_mm)", _llama(weights="int8", fuse=True)),
    "int4": ("int4 weights, groups of 32 (aten._weight_int4pack_mm_for_cpu), int8 head", _llama(weights="int4", fuse=True)),
    "int4-compiled": ("int4 weights, int8 head, the one-token step under torch.compile (fewer small ops)",
                      _llama(weights="int4", fuse=True, compile=True)),
}
assert tuple(BACKENDS) == BACKEND_NAMES, "atomkit.config.BACKEND_NAMES lists the engine's backends, in order"


# What ``auto`` runs on a CPU: the fastest backend whose captions and retrieval stay within the paper's bound of the
# exact fp32 engine on the development set (docs/decode-engine.md). On a CPU that multiplies bf16 natively
# (AVX512-BF16, AMX): results/decode-native-bf16.json for speed, results/quality-native-bf16.json for quality. On an
# AVX2-only CPU, where the quantized engines prefill with the model's fp32 matrices: results/decode-avx2.json (int4
# 2.4x the exact engine's tok/s, a script 1.7x faster) and results/reuse-avx2-int4.json against
# results/reuse-avx2-exact.json for speed, results/quality-avx2.json for quality. ``int4-compiled`` is faster still per
# token but compiles for about 37 s on first use, so it stays a flag. On CUDA ``auto`` is the exact engine (the int4
# kernels are CPU kernels).
CPU_DEFAULT = "int4"


def unsupported(decoder) -> str | None:
    """Why the torch steppers cannot run this decoder's LM (None when they can)."""
    lm = decoder.lm
    if getattr(lm.config, "model_type", None) != "llama":
        return f"the torch steppers run Llama models; this LM is {getattr(lm.config, 'model_type', type(lm).__name__)!r}"
    plain = (torch.Tensor, torch.nn.Parameter)
    if any(type(p) not in plain for p in lm.parameters()):
        return "the LM's weights are quantized tensor subclasses (Session(quant=...)); use backend 'hf'"
    return None


def resolve_backend(name: str, decoder) -> str:
    """``auto`` -> ``CPU_DEFAULT`` on a CPU (``torch`` where its int4 groups do not divide the LM's widths), ``torch``
    on CUDA, ``hf`` for an LM the steppers cannot run; other names are checked."""
    check_backend(name)
    if name != "auto":
        return name
    if unsupported(decoder):
        return "hf"
    lm = decoder.lm
    from atomkit.decode.llama import INT4_GROUP

    if lm.lm_head.weight.device.type in ("cpu", "meta"):
        widths = (lm.config.hidden_size, lm.config.intermediate_size)
        if CPU_DEFAULT != "int4" or all(w % INT4_GROUP == 0 for w in widths):
            return CPU_DEFAULT
    return "torch"


def get_engine(name: str, decoder, *, max_seq_len: int | None = None) -> Engine | HFEngine:
    """The engine of backend ``name`` for a ``TextDecoder``.

    An unknown name raises ``UnknownBackend`` (listing the valid ones); a stepper backend on an LM it
    cannot run raises ``InputError`` with the reason.
    """
    name = resolve_backend(name, decoder)
    factory = BACKENDS[name][1]
    if factory is None:
        return HFEngine(decoder.lm)
    reason = unsupported(decoder)
    if reason:
        raise InputError(f"decode backend {name!r}: {reason}")
    return Engine(factory(decoder, max_seq_len=max_seq_len), name)
