"""A Llama forward pass over preallocated KV tensors: the torch steppers of ``atomkit.decode.engine``.

``LlamaStepper`` reads the weights of a transformers ``LlamaForCausalLM`` (SmolLM2, Llama-3.2) and
runs one prefill, then one token per call, without the per-token work of ``generate`` (cache
objects, mask building, logits processors, module hooks). In fp32 it repeats transformers' own
arithmetic op for op (RMSNorm in fp32, rotary tables computed the same way, SDPA with GQA on the
filled part of the cache), so its greedy tokens equal ``generate``'s. Variants:

* ``weights="bf16"``: bf16 copies of the matrices (half the bytes read per token);
* ``weights="int8"``: int8 weights with one fp32 scale per output channel
  (``torch._weight_int8pack_mm``);
* ``weights="int4"``: 4-bit weights, asymmetric, groups of 32 along the input
  (``aten._weight_int4pack_mm_for_cpu``), the output head in int8. SmolLM2's GGUF stores its
  layers as Q4_1 (the same grid: 4 bits, min and scale per 32), so this nearly restores them
  (SQNR about 50 dB per matrix, bf16 scales and activations being the loss);
* quantized variants prefill (many rows at once, where the packed kernels are slow) with bf16 copies of
  their matrices on CPUs that multiply bf16 natively (AVX512-BF16, AMX): twice as fast as fp32 there, logits
  within ~43 dB of the fp32 prefill (int8 activations per token were 3x faster but lost 15 dB, so they are not
  used). Elsewhere (AVX2 only) bf16 matmuls are emulated and slower than fp32, so a prefill reads the
  fp32 matrices (``prefill="fp32"``; ``default_prefill()`` picks by the CPU);
* ``compile=True``: the one-token step under ``torch.compile`` (attention over the whole static
  cache with a mask, so the graph has one shape per batch size and cache length).

A batch of prompts that begin alike (a caption group, a script's narration lines) prefills the common beginning
once and copies it to every row (every variant but the exact one, ``LlamaStepper.share_prefix``); ``extend``
feeds several known tokens per row in one pass (candidate phrases being scored).

Quantized variants change the numbers: compare them to fp32 by token and caption agreement.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from atomkit.errors import InputError

WEIGHT_KINDS = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 32
PACKED_MAX_ROWS = 16  # more rows than this (a prefill) run on the fp32 weights: the packed kernels are slow there
CACHE_ROUND = 256  # cache lengths are rounded up to this, so a new prompt rarely reallocates
MIN_SHARED = 4  # a batched prefill runs a common prefix of at least this many tokens once (not exact steppers)


def _common_prefix(ids: torch.Tensor, pad: torch.Tensor | None) -> int:
    """How many first tokens (after each row's left padding) all rows of ``ids`` (b, n) share; always leaves the
    shortest row one token of its own (its logits are what a prefill returns)."""
    pad = [0] * ids.shape[0] if pad is None else [int(p) for p in pad]
    rows = [ids[i, p:] for i, p in enumerate(pad)]
    limit = min(len(r) for r in rows) - 1
    if limit <= 0:
        return 0
    first = rows[0][:limit]
    same = torch.ones(limit, dtype=torch.bool, device=ids.device)
    for r in rows[1:]:
        same &= r[:limit] == first
    return int(limit if bool(same.all()) else int(torch.argmin(same.int())))


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles). Without it (AVX2) torch emulates bf16
    matmuls: on a 2-core AVX2 EPYC, int4 with bf16 prefills captioned 3.2x slower than the exact fp32 engine."""
    cpu = torch.cpu
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def default_prefill() -> str:
    """The weights quantized steppers prefill with on this CPU: "bf16" copies where bf16 is native, else "fp32"."""
    return "bf16" if native_bf16() else "fp32"


class Linear:
    """``y = x @ W.T`` with W stored as fp32, bf16, int8 or int4; W is the model's tensor, or several of them
    side by side (a fused q/k/v or gate/up: one matmul for a step).

    ``rows``: the weights that inputs of more than ``PACKED_MAX_ROWS`` rows (a prefill) use in the
    quantized kinds: "bf16" (a bf16 copy) or "fp32" (the model's own tensors, no copy: one matmul each for a fused
    Linear, as fast as one on the concatenation and without holding it; also for a matrix that never sees many
    rows, such as the output head, which a prefill applies to the last position only).
    """

    def __init__(self, ws: list[torch.Tensor], kind: str, rows: str = "bf16"):
        ws = [w.detach() for w in ws]
        self.kind = kind
        self.owned = len(ws) > 1  # fused: the concatenation is this Linear's own tensor, not the model's
        w = torch.cat(ws) if self.owned else ws[0]
        self.out_features = w.shape[0]
        quantized = kind in ("int8", "int4")
        self.rows_w = w.to(torch.bfloat16) if quantized and rows == "bf16" and not w.is_cuda else None
        self.full = ws if quantized and self.rows_w is None else None  # the model's tensors a prefill reads
        if kind == "fp32":
            self.w = w  # the model's own tensor (or the fused concatenation)
        elif kind == "bf16":
            self.w = w.to(torch.bfloat16)
        elif kind == "int8":
            w = w.float()
            scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
            self.w = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            self.scale = scale.to(torch.bfloat16)  # the packed kernels are fast with bf16 activations only
        elif kind == "int4":
            n, k = w.shape
            if k % INT4_GROUP:
                raise ValueError(f"int4 needs in_features divisible by {INT4_GROUP}, got {k}")
            g = w.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
            zero = lo + 8 * scale  # the kernel dequantizes (q - 8) * scale + zero
            self.sz = torch.stack([scale.reshape(n, -1).t(), zero.reshape(n, -1).t()], -1).to(torch.bfloat16).contiguous()
            self.w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        else:
            raise ValueError(f"unknown weight kind {kind!r}; kinds are {WEIGHT_KINDS}")

    def __call__(self, x: torch.Tensor, wide: bool | None = None) -> torch.Tensor:
        """``x @ W.T``; ``wide``: use the prefill weights (True) or the packed ones (False) whatever the number of
        rows (None: by the rows, more than ``PACKED_MAX_ROWS`` is wide)."""
        if self.kind == "fp32":
            return F.linear(x, self.w)
        if self.kind == "bf16":
            return F.linear(x.to(torch.bfloat16), self.w).float()
        shape = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if (x2.shape[0] > PACKED_MAX_ROWS) if wide is None else wide:  # a prefill: the packed kernels suit few rows
            if self.rows_w is not None:
                return F.linear(x.to(torch.bfloat16), self.rows_w).float()
            if len(self.full) == 1:
                return F.linear(x, self.full[0])
            return torch.cat([F.linear(x, w) for w in self.full], dim=-1)
        x2 = x2.to(torch.bfloat16)
        if self.kind == "int8":
            y = torch._weight_int8pack_mm(x2, self.w, self.scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.w, INT4_GROUP, self.sz)
        return y.float().reshape(*shape, self.out_features)

    _STORED = ("w", "scale", "sz", "rows_w")  # what ``state`` holds: everything packing computed

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors packing computed (for the engine store, ``atomkit.decode.store``); empty for a Linear that
        only refers to the model's own fp32 tensor."""
        if self.kind == "fp32" and not self.owned:
            return {}
        return {a: getattr(self, a) for a in self._STORED if getattr(self, a, None) is not None}

    @classmethod
    def restore(cls, ws: list[torch.Tensor], kind: str, state: dict[str, torch.Tensor]) -> "Linear":
        """A Linear from ``state`` (what ``state()`` returned for the same ``ws`` and ``kind``): no packing is redone.
        ``ws`` are the model's fp32 tensors."""
        ws = [w.detach() for w in ws]
        self = cls.__new__(cls)
        self.kind, self.owned = kind, len(ws) > 1
        self.out_features = sum(w.shape[0] for w in ws)
        self.rows_w = state.get("rows_w")
        if kind == "fp32" and not self.owned:
            self.w = ws[0]
        else:
            for a in cls._STORED:
                if a in state:
                    setattr(self, a, state[a])
        quantized = kind in ("int8", "int4")
        self.full = ws if quantized and self.rows_w is None else None
        if self.full is not None and any(w.is_meta for w in ws):
            raise ValueError(f"a stored {kind} Linear of {self.out_features} rows has no prefill weights and the "
                             "model's matrices were released")
        return self

    def reads_model(self) -> bool:
        """Whether this Linear reads the model's own tensors (a step or a prefill), so they must stay in memory."""
        return self.full is not None or (self.kind == "fp32" and not self.owned)

    def nbytes(self) -> int:
        """Bytes of the weights a one-token step reads (values and scales)."""
        extra = [getattr(self, a) for a in ("scale", "sz") if hasattr(self, a)]
        return sum(t.numel() * t.element_size() for t in [self.w, *extra])

    def held_bytes(self) -> int:
        """Bytes this Linear keeps in memory beyond the model's own tensors (packed weights, scales, bf16 prefill
        copies, fused concatenations)."""
        held = 0 if self.kind == "fp32" and not self.owned else self.nbytes()
        if self.rows_w is not None:
            held += self.rows_w.numel() * self.rows_w.element_size()
        return held


class LlamaStepper:
    """The ``Stepper`` of ``atomkit.decode.engine`` for transformers Llama models (see its docstring).

    Args:
        lm: a ``LlamaForCausalLM`` (or any model with the same module names: SmolLM2, Llama-3.2).
        weights: "fp32" (exact, shares the model's tensors), "bf16", "int8" or "int4".
        fuse: one matmul for q/k/v and one for gate/up (fewer calls; the same values only in
            exact arithmetic, so the exact backend keeps them apart).
        compile: run the one-token step under ``torch.compile``.
        prefill: what quantized kinds multiply many rows (a prefill, a wide beam batch) with: "bf16" copies of
            their matrices or the model's "fp32" ones; None: ``default_prefill()`` (by the CPU).
        max_seq_len: the longest prompt + new tokens this stepper accepts.
        packed: what ``packed_state()`` returned for the same LM and settings (``atomkit.decode.store``): the
            matrices are taken from it instead of being converted again.
    """

    def __init__(self, lm, *, weights: str = "fp32", fuse: bool = False, compile: bool = False,
                 max_seq_len: int | None = None, packed: dict[str, torch.Tensor] | None = None,
                 prefill: str | None = None):
        cfg = lm.config
        self.prefill_weights = prefill or default_prefill()
        if self.prefill_weights not in ("bf16", "fp32"):
            raise ValueError(f"prefill weights are 'bf16' or 'fp32', not {prefill!r}")
        self.name = "llama-" + weights + ("-compiled" if compile else "")
        self.kind = weights
        self.max_seq_len = int(max_seq_len or min(cfg.max_position_embeddings, 8192))
        self.max_batch_size = None  # any number of rows
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        self.device = lm.lm_head.weight.device
        model = lm.model
        self.embed = model.embed_tokens.weight.detach()
        rot = model.rotary_emb
        self.inv_freq = rot.inv_freq.detach().float()
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        self.norm = model.norm.weight.detach()
        stored = packed is not None
        groups: dict[str, dict[str, torch.Tensor]] = {}  # stored tensors by Linear name
        for key, t in (packed or {}).items():
            name, attr = key.rsplit(".", 1)
            groups.setdefault(name, {})[attr] = t

        def linear(name: str, ws: list[torch.Tensor], kind: str, rows: str = self.prefill_weights) -> Linear:
            """The Linear of the model tensors ``ws`` (several: fused along the output), packed or restored."""
            return Linear.restore(ws, kind, groups.get(name, {})) if stored else Linear(ws, kind, rows)

        self.layers = []
        for i, layer in enumerate(model.layers):
            a, m, p = layer.self_attn, layer.mlp, f"layers.{i}."
            L = dict(ln1=layer.input_layernorm.weight.detach(), ln2=layer.post_attention_layernorm.weight.detach(),
                     o=linear(p + "o", [a.o_proj.weight], weights), down=linear(p + "down", [m.down_proj.weight], weights))
            if fuse:
                L["qkv"] = linear(p + "qkv", [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], weights)
                L["gate_up"] = linear(p + "gate_up", [m.gate_proj.weight, m.up_proj.weight], weights)
            else:
                L.update({n: linear(p + n, [w], weights) for n, w in (
                    ("q", a.q_proj.weight), ("k", a.k_proj.weight), ("v", a.v_proj.weight),
                    ("gate", m.gate_proj.weight), ("up", m.up_proj.weight))})
            self.layers.append(L)
        # int4 output rows lose too much (the GGUF stores them as Q8_0): int8 for the head of int4
        self.lm_head = linear("lm_head", [lm.lm_head.weight], "int8" if weights == "int4" else weights, rows="fp32")
        self.fuse = fuse
        self.compiled = compile
        self._step_fn = torch.compile(self._step_static, dynamic=False) if compile else None
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.batch_size, self.cache_len, self.filled = 0, 0, 0
        self.pad: torch.Tensor | None = None  # (B,) left padding per row, None when no row is padded
        # the padding of a prefill whose rows share a prefix sits after that prefix: positions gap..gap+pad-1
        self.gap = torch.zeros((), dtype=torch.long, device=self.device)
        self.share_prefix = fuse  # the exact (unfused) stepper keeps generate's arithmetic: no shared prefill
        self.shared_last = 0  # prompt tokens the last prefill computed once for all rows
        self.wide: bool | None = None  # which weights the Linears use regardless of rows (Linear.__call__)

    # -- the Stepper interface ---------------------------------------------------------------------
    def reset(self, batch_size: int, seq_len: int) -> None:
        """Make room for ``batch_size`` rows of up to ``seq_len`` positions (prompt + new tokens)."""
        if seq_len > self.max_seq_len:
            raise InputError(f"{self.name}: prompt + new tokens = {seq_len} positions, more than this stepper's "
                             f"max_seq_len {self.max_seq_len}; shorten the prompt or ask for fewer new tokens")
        need = min(self.max_seq_len, math.ceil(seq_len / CACHE_ROUND) * CACHE_ROUND)
        if batch_size != self.batch_size or need > self.cache_len:
            shape = (batch_size, self.n_kv, need, self.head_dim)
            dt = torch.float32
            self.k_cache = [torch.zeros(shape, dtype=dt, device=self.device) for _ in self.layers]
            self.v_cache = [torch.zeros(shape, dtype=dt, device=self.device) for _ in self.layers]
            self.batch_size, self.cache_len = batch_size, need
        self.pad = None
        self.gap.zero_()
        self.filled = 0  # positions written so far: reorder copies only these

    def prefill(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt (rows 0..b-1 of the cache); fp32 logits of each row's last position (b, V).

        ``pad`` (b,): row i's first ``pad[i]`` positions are left padding (batches of prompts of
        different lengths); None when no row is padded.
        """
        x = self.embed[input_ids.to(self.device)] if inputs_embeds is None else inputs_embeds.to(self.device).float()
        b, n, _ = x.shape
        if n > self.cache_len:
            raise InputError(f"{self.name}: prompt of {n} tokens does not fit the cache of {self.cache_len}")
        pos = torch.arange(n, device=self.device)
        mask = None
        self.shared_last = 0
        if inputs_embeds is None and b > 1 and self.share_prefix:
            shared = _common_prefix(input_ids, pad)
            if shared >= MIN_SHARED:
                return self._prefill_shared(input_ids.to(self.device), pad, shared)
        if pad is not None and bool((pad > 0).any()):
            self.pad = pad.to(self.device)
            rows = (pos[None, :] - self.pad[:, None]).clamp(min=0)  # (b, n) positions as transformers counts them
            keep = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] >= self.pad[:, None, None])
            keep |= torch.eye(n, dtype=torch.bool, device=self.device)[None]  # pad rows see themselves: no NaN
            mask = keep[:, None]  # (b, 1, n, n)
            cos, sin = self._rope(rows)
        else:
            cos, sin = self._rope(pos[None, :])
        self.filled = n
        h = self._layers(x, cos, sin, 0, n, mask, causal=mask is None)
        return self.lm_head(self._rms(h[:, -1], self.norm)).float()

    def _prefill_shared(self, ids: torch.Tensor, pad: torch.Tensor | None, shared: int) -> torch.Tensor:
        """``prefill`` of rows whose first ``shared`` tokens (after their left padding) are the same: those are run
        once, as one row, and their keys and values copied to every row; then the rest of every row. Row i's cache
        is laid out as [shared prefix][its padding][the rest], so every row still ends at position n - 1 and
        a position keeps its rotary angle (index - padding after the prefix); the padding is masked out."""
        b, n = ids.shape
        pad = torch.zeros(b, dtype=torch.long, device=self.device) if pad is None else pad.to(self.device)
        self.wide = b * n > PACKED_MAX_ROWS  # the weights the whole prefill would use, in both passes
        try:
            h = self._shared_passes(ids, pad, shared)
        finally:
            self.wide = None
        if not bool((pad > 0).any()):  # nothing to mask in later steps
            self.pad = None
            self.gap.zero_()
        return self.lm_head(self._rms(h[:, -1], self.norm)).float()

    def _shared_passes(self, ids: torch.Tensor, pad: torch.Tensor, shared: int) -> torch.Tensor:
        b, n = ids.shape
        head = ids[0, int(pad[0]):int(pad[0]) + shared][None]
        pos = torch.arange(shared, device=self.device)
        cos, sin = self._rope(pos[None, :])
        self._layers(self.embed[head], cos, sin, 0, shared, None, causal=True)
        for t in (*self.k_cache, *self.v_cache):
            t[1:b, :, :shared] = t[:1, :, :shared]
        cols = torch.arange(n, device=self.device)
        rest = (cols[None, :] < pad[:, None]) | (cols[None, :] >= pad[:, None] + shared)  # padding, then the rest
        self.pad = pad
        self.gap.fill_(shared)
        self.shared_last = shared
        return self._chunk(self.embed[ids[rest].reshape(b, n - shared)], shared)

    def _unpadded(self, keys: torch.Tensor, b: int) -> torch.Tensor:
        """(b, K): which cache positions ``keys`` hold tokens (not padding) for the first ``b`` rows."""
        pad = self.pad[:b, None]
        return (keys[None, :] < self.gap) | (keys[None, :] >= self.gap + pad)

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Feed one token per row at cache position ``pos``; fp32 next-token logits (B, V)."""
        if pos >= self.cache_len:
            raise InputError(f"{self.name}: position {pos} is past the cache ({self.cache_len})")
        self.filled = max(self.filled, pos + 1)
        if self._step_fn is not None:
            return self._step_fn(tokens.to(self.device), torch.tensor(pos, device=self.device))
        x = self.embed[tokens.to(self.device)][:, None]
        if self.pad is None:
            cos, sin = self._rope(torch.full((1, 1), pos, device=self.device))
            mask = None
        else:
            cos, sin = self._rope((pos - self.pad)[:, None])
            keys = torch.arange(pos + 1, device=self.device)
            mask = self._unpadded(keys, x.shape[0])[:, None, None]  # (B, 1, 1, pos + 1)
        h = self._layers(x, cos, sin, pos, pos + 1, mask, causal=False)
        return self.lm_head(self._rms(h[:, -1], self.norm)).float()

    def extend(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Feed ``m`` tokens per row (B, m) at cache positions ``start..start+m-1`` in one pass (after a prefill;
        a chunk of teacher-forced tokens, such as candidate phrases being scored); fp32 logits of every position
        (B, m, V). The same cache, masks and positions as ``m`` calls of ``step``, in one forward pass."""
        end = start + tokens.shape[1]
        if end > self.cache_len:
            raise InputError(f"{self.name}: positions up to {end} are past the cache ({self.cache_len})")
        h = self._chunk(self.embed[tokens.to(self.device)], start)
        return self.lm_head(self._rms(h, self.norm)).float()

    def _chunk(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Hidden states of ``x`` (B, m, hidden) run at cache positions ``start..start+m-1``, each attending to
        everything before it in the cache but padding (``pad``, ``gap``)."""
        b, m, _ = x.shape
        end = start + m
        pos = torch.arange(start, end, device=self.device)
        keys = torch.arange(end, device=self.device)
        keep = keys[None, :] <= pos[:, None]  # (m, end): causal over the whole cache
        if self.pad is None:
            cos, sin = self._rope(pos[None, :])
            mask = keep[None, None]
        else:
            cos, sin = self._rope(pos[None, :] - self.pad[:b, None])
            mask = (keep[None] & self._unpadded(keys, b)[:, None, :])[:, None]  # (B, 1, m, end)
        self.filled = max(self.filled, end)
        return self._layers(x, cos, sin, start, end, mask, causal=False)

    def reorder(self, index: torch.Tensor, keep: int = 0) -> None:
        """Row i of the cache becomes old row ``index[i]`` (beam search; spreading a prefill). Positions before
        ``keep`` (the prompt the beams share) are equal in those rows already, and only ``keep:filled`` is copied."""
        index = index.to(self.device)
        a, f = min(keep, self.filled), self.filled
        for t in (*self.k_cache, *self.v_cache):
            t[:, :, a:f].copy_(t[:, :, a:f].index_select(0, index))  # in place: a compiled step keeps its inputs
        if self.pad is not None:
            self.pad = self.pad.index_select(0, index)

    # -- the forward pass --------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.fuse:  # one fused kernel; transformers' op-by-op version below is the exact one
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.eps))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale)[:, None], (emb.sin() * self.rope_scale)[:, None]  # (B, 1, n, D)

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _qkv(self, L: dict, hn: torch.Tensor, cos, sin):
        b, n, _ = hn.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        if self.fuse:  # rotate q and k heads in one go
            qkv = L["qkv"](hn, self.wide)
            qk = self._rotate(qkv[..., :(H + KV) * D].view(b, n, H + KV, D).transpose(1, 2), cos, sin)
            return qk[:, :H], qk[:, H:], qkv[..., (H + KV) * D:].view(b, n, KV, D).transpose(1, 2)
        q, k, v = L["q"](hn, self.wide), L["k"](hn, self.wide), L["v"](hn, self.wide)
        return (self._rotate(q.view(b, n, H, D).transpose(1, 2), cos, sin),
                self._rotate(k.view(b, n, KV, D).transpose(1, 2), cos, sin), v.view(b, n, KV, D).transpose(1, 2))

    def _mlp(self, L: dict, x: torch.Tensor) -> torch.Tensor:
        hn = self._rms(x, L["ln2"])
        if self.fuse:
            g, u = L["gate_up"](hn, self.wide).chunk(2, dim=-1)
        else:
            g, u = L["gate"](hn, self.wide), L["up"](hn, self.wide)
        return x + L["down"](F.silu(g) * u, self.wide)

    def _layers(self, x, cos, sin, start: int, end: int, mask, *, causal: bool):
        b, n, _ = x.shape
        for L, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            q, k, v = self._qkv(L, self._rms(x, L["ln1"]), cos, sin)
            kc[:b, :, start:end] = k
            vc[:b, :, start:end] = v
            a = F.scaled_dot_product_attention(q, kc[:b, :, :end], vc[:b, :, :end], attn_mask=mask,
                                               is_causal=causal and n > 1, scale=self.scaling, enable_gqa=True)
            x = self._mlp(L, x + L["o"](a.transpose(1, 2).reshape(b, n, -1), self.wide))
        return x

    def _step_static(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The compiled step: attention over the whole cache with a mask, so shapes never change."""
        b = tokens.shape[0]
        x = self.embed[tokens][:, None]
        keys = torch.arange(self.cache_len, device=tokens.device)
        if self.pad is None:
            cos, sin = self._rope(pos.view(1, 1))
            mask = (keys <= pos).view(1, 1, 1, -1)
        else:
            cos, sin = self._rope((pos - self.pad)[:, None])
            mask = ((keys[None, :] <= pos) & self._unpadded(keys, b))[:, None, None]
        for L, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            q, k, v = self._qkv(L, self._rms(x, L["ln1"]), cos, sin)
            kc.index_copy_(2, pos.view(1), k)
            vc.index_copy_(2, pos.view(1), v)
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=self.scaling, enable_gqa=True)
            x = self._mlp(L, x + L["o"](a.transpose(1, 2).reshape(b, 1, -1)))
        return self.lm_head(self._rms(x[:, -1], self.norm)).float()

    def _named_linears(self) -> dict[str, Linear]:
        named = {f"layers.{i}.{k}": v for i, L in enumerate(self.layers) for k, v in L.items() if isinstance(v, Linear)}
        return {**named, "lm_head": self.lm_head}

    def _linears(self) -> list[Linear]:
        return list(self._named_linears().values())

    def packed_state(self) -> dict[str, torch.Tensor]:
        """Everything this stepper computed from the LM's weights (packed and quantized matrices, scales, bf16
        prefill copies, fused matrices), by name: ``LlamaStepper(lm, ..., packed=...)`` rebuilds it without
        converting anything."""
        return {f"{name}.{k}": t for name, lin in self._named_linears().items() for k, t in lin.state().items()}

    def weight_bytes(self) -> int:
        """Bytes of the matrices this stepper reads per token (embedding table excluded)."""
        return sum(lin.nbytes() for lin in self._linears())

    def needs_model_matrices(self) -> bool:
        """Whether a step or a prefill reads the LM's own layer matrices (else only its embedding table, norms and
        rotary tables: the layer matrices may be released, ``TextDecoder.keep_only_engine``)."""
        return any(lin.reads_model() for L in self.layers for lin in L.values() if isinstance(lin, Linear))

    def held_bytes(self) -> int:
        """Bytes of weights this stepper holds beyond the model's own tensors (the KV cache not counted: it is
        sized per generation)."""
        return sum(lin.held_bytes() for lin in self._linears())
