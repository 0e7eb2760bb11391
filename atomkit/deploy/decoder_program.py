"""A compact Llama decode program for ExecuTorch: the LM written out in plain PyTorch over ExecuTorch's LLM ops.

``atomkit.deploy.export`` used to export transformers' own Llama over its ``StaticCache``: its masks, cache
bookkeeping and index writes split every layer into about eleven XNNPACK pieces (SmolLM2-135M: 333 pieces,
1373 ops on portable kernels, a 10 minute export) and it held one sequence. ``LlamaDecodeProgram`` reads the
same weights (the LM's own ``nn.Linear`` / ``nn.Embedding`` modules, so ``atomkit.deploy.quant`` quantizes it like
the LM) and writes the forward pass so that everything between two attention calls is one XNNPACK piece:

* RMSNorm as transformers computes it, the mean taken over a (rows, 1, hidden) view (XNNPACK's mean
  lowers over the two innermost dims of a 4-D tensor), its epsilon a tensor; SiLU as ``x * sigmoid(x)``; rotary
  embedding by halves (slice, negate, concatenate), its cos and sin looked up by position in tables of every
  position (no Python float and no int-to-float copy in any method: ExecuTorch re-traces a whole method to
  legalise either, and ``atomkit.deploy.export`` runs those passes only on a method that needs them);
* the KV cache: one (B, max_seq_len, kv_heads, head_dim) buffer per layer for keys and one for values,
  written by ``llama.update_cache`` and read by ``llama.custom_sdpa`` (causal from the start position, GQA),
  the two LLM custom ops of the executorch wheel (``atomkit.deploy.program.load_llm_custom_ops``);
* B rows (beam search's beams as the batch) decoded together.
* q, k and v as one Linear, gate and up as one (weights concatenated by rows at build time): a layer is 4 matmuls
  and 4 dynamic quantizations of its input, not 7, and its graph 28 nodes smaller to lower.

Five methods share the cache (``to_executorch`` with ``share_mutable_buffers``):

* ``forward(tokens (B, 1), cache_position (1,)) -> logits (B, V)``: one decode step of every row at the
  same position;
* ``step(tokens (1, 1), cache_position (1,)) -> logits (1, V)``: one greedy decode step, row 0 alone (attention reads
  row 0 through a one-row view of each cache buffer; the keys and values go to every row, as a prompt's do):
  greedy decoding does not pay for the B - 1 rows of ``forward`` it does not need;
* ``prefill(tokens (1, P), cache_position (P,), last (1,)) -> logits (1, V)``: a chunk of P prompt tokens (the
  host pads the last chunk), its keys and values written to every row, the logits of position ``last`` of the
  chunk. P is static (``prefill_chunk``): XNNPACK takes a layer whole only where every shape is static (with a
  dynamic length each reshape and slice falls outside and a layer splits into about ten pieces, each costing
  seconds of lowering). Padding positions hold keys nobody reads: a decode step writes its position before
  attending up to it;
* ``reorder(index (B,), cache_position (L,)) -> (1,)``: row i of the cache becomes old row ``index[i]`` at
  the positions given (beam search moves beams after each step; positions before them hold the shared
  prompt and need no copy);
* with ``embeds=True`` (a video-language model's LM: its prompt holds image-token embeddings), two more:
  ``token_embeddings(tokens (1, P)) -> (1, P, H)`` (the token embeddings the host merges the encoder's output
  into, as in ExecuTorch's multimodal runner) and ``prefill_embeds(embeds (1, P, H), cache_position (P,), last
  (1,)) -> logits (1, V)`` (a prefill chunk of embeddings: the runner's ``text_model``);
* ``clear() -> (1,)``: zeros in the whole cache, run once after loading. The program stores no initial cache
  (as initial data it would be stored once per method: 3 x 141 MB for SmolLM2 with B=4 and 768 positions),
  and attention reads a few positions past the causal limit with zero weight, which must not be NaN.
"""
from __future__ import annotations

import torch
from torch import nn

METHODS = ("forward", "step", "prefill", "reorder", "clear")
EMBED_METHODS = ("token_embeddings", "prefill_embeds")  # with embeds=True
PREFILL_CHUNK = 32  # prompt tokens per prefill call (static: see the module docstring)


def unsupported(lm) -> str | None:
    """Why ``LlamaDecodeProgram`` cannot be built from ``lm`` (None when it can)."""
    cfg = getattr(lm, "config", None)
    if getattr(cfg, "model_type", None) != "llama":
        return f"the decode program is written for Llama models; this LM is {getattr(cfg, 'model_type', type(lm).__name__)!r}"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "the decode program handles Llama with SiLU and no biases"
    return None


def _fused(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the outputs of ``linears`` (same input, no biases) side by side: one matmul and one
    dynamic quantization of the input instead of several (int8 quantizes each output row alone, so the fused
    weight quantizes to the same values)."""
    w = torch.cat([lin.weight.detach() for lin in linears])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    return fused


class _Layer(nn.Module):
    """One decoder layer's weights: q, k and v as one Linear, gate and up as one (fewer graph nodes to lower, fewer
    kernel calls per step)."""

    def __init__(self, layer):
        super().__init__()
        a, m = layer.self_attn, layer.mlp
        self.qkv = _fused(a.q_proj, a.k_proj, a.v_proj)
        self.qkv_split = (a.q_proj.out_features, a.q_proj.out_features + a.k_proj.out_features)
        self.o = a.o_proj
        self.gate_up = _fused(m.gate_proj, m.up_proj)
        self.ffn = m.gate_proj.out_features
        self.down = m.down_proj
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm


class _Cache(nn.Module):
    """The KV cache: ``k{i}`` and ``v{i}`` of layer i, (B, max_seq_len, kv_heads, head_dim) each."""

    def __init__(self, layers: int, shape: tuple[int, ...]):
        super().__init__()
        for i in range(layers):
            self.register_buffer(f"k{i}", torch.zeros(shape))
            self.register_buffer(f"v{i}", torch.zeros(shape))
        self.n_layers = layers

    def pairs(self):
        return [(getattr(self, f"k{i}"), getattr(self, f"v{i}")) for i in range(self.n_layers)]

    def clear(self) -> torch.Tensor:
        """Zeros in every position of every row."""
        done = torch.zeros(1)
        for kc, vc in self.pairs():
            for c in (kc, vc):
                done = torch.ops.llama.update_cache(torch.zeros_like(c), c, 0)
        return done

    def reorder(self, index: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """Row i becomes old row ``index[i]`` (B,) at the consecutive positions ``cache_position`` (L,)."""
        k0 = getattr(self, "k0")
        start = _start(cache_position, cache_position.shape[0], k0.shape[1])
        done = index
        for kc, vc in self.pairs():
            for c in (kc, vc):
                moved = c.index_select(1, cache_position).index_select(0, index)
                done = torch.ops.llama.update_cache(moved, c, start)
        return done


def _start(positions: torch.Tensor, n, max_seq_len: int):
    """The first position as a size the custom ops take, with the bounds export needs to know."""
    # what .item() decomposes to; with .item() in a method, ExecuTorch re-traces the whole method once more to
    # decompose that one node (tested: the same program)
    start = torch.ops.aten._local_scalar_dense.default(positions[0])
    torch._check(start >= 0)
    torch._check(start + n <= max_seq_len)
    return start


class LlamaDecodeProgram(nn.Module):
    """A transformers Llama (``LlamaForCausalLM``) as five exportable methods over a static KV cache.

    Args:
        lm: the LM; its modules are shared, not copied (quantize a deep copy, as ``atomkit.deploy.export`` does).
        batch: rows of the cache (B): the beams of one prompt.
        max_seq_len: positions per row (prompt + new tokens).

    Eager calls run the same custom ops on ATen tensors, so the module is its own reference.
    """

    def __init__(self, lm, *, batch: int = 4, max_seq_len: int = 512, prefill_chunk: int = PREFILL_CHUNK,
                 embeds: bool = False):
        super().__init__()
        reason = unsupported(lm)
        if reason:
            raise ValueError(reason)
        from atomkit.deploy.program import load_llm_custom_ops

        load_llm_custom_ops(export=True)
        cfg = lm.config
        self.batch, self.max_seq_len = int(batch), int(max_seq_len)
        self.methods = METHODS + (EMBED_METHODS if embeds else ())
        self.prefill_chunk = min(int(prefill_chunk), self.max_seq_len)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.scaling = float(self.head_dim ** -0.5)
        model = lm.model
        self.embed = model.embed_tokens
        self.layers = nn.ModuleList(_Layer(layer) for layer in model.layers)
        self.norm = model.norm
        self.lm_head = lm.lm_head
        rot = model.rotary_emb
        inv = rot.inv_freq.detach().float()
        emb = torch.arange(self.max_seq_len).float().view(-1, 1) * torch.cat((inv, inv))  # both halves of a head
        scale = float(getattr(rot, "attention_scaling", 1.0))
        # the rotary tables of every position, looked up by position (computed in the program, they would be an int
        # to float copy and a multiply by a Python float, each a pass of ExecuTorch's over every method to legalise)
        self.register_buffer("cos_table", emb.cos() * scale, persistent=False)
        self.register_buffer("sin_table", emb.sin() * scale, persistent=False)
        # RMSNorm's epsilon as a tensor (as a Python float, ExecuTorch re-traces every method to make it one)
        self.register_buffer("eps", torch.tensor(float(model.norm.variance_epsilon)), persistent=False)
        self.cache = _Cache(len(self.layers), (self.batch, self.max_seq_len, self.n_kv, self.head_dim))
        # a prompt row times this is the row in every cache row (a multiply XNNPACK takes; an expand it does not)
        self.register_buffer("rows", torch.ones(self.batch, 1, 1, 1), persistent=False)

    # -- pieces ------------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        b, n, h = x.shape
        var = x.view(b, n, 1, h).pow(2).mean(dim=(2, 3), keepdim=True).view(b, n, 1)
        return norm.weight * (x * torch.rsqrt(var + self.eps))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (1, L, 1, D) of the positions, as transformers computes them (its two equal halves of
        frequencies side by side, times its attention scaling)."""
        n = positions.shape[0]
        return (self.cos_table.index_select(0, positions).view(1, n, 1, -1),
                self.sin_table.index_select(0, positions).view(1, n, 1, -1))

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _layers(self, x: torch.Tensor, cos, sin, start) -> torch.Tensor:
        """The decoder layers over x (b, n, hidden). b == B: each row attends its own cache row. b == 1 (a prompt
        chunk or a greedy step): its keys and values go to every row, and attention reads row 0 alone through a
        (1, B * max_seq_len, ...) view of each cache buffer, whose first max_seq_len positions are row 0 (a view
        ``atomkit.deploy.export`` keeps out of XNNPACK, so it stays a view and not a copy)."""
        b, n, _ = x.shape
        H, KV, D, B, S = self.n_heads, self.n_kv, self.head_dim, self.batch, self.max_seq_len
        for layer, (kc, vc) in zip(self.layers, self.cache.pairs()):
            h = self._rms(x, layer.ln1)
            qkv = layer.qkv(h)
            j = layer.qkv_split[1]
            qk = self._rotate(qkv[..., :j].view(b, n, H + KV, D), cos, sin)  # q's and k's heads rotated at once
            q, k = qk[:, :, :H], qk[:, :, H:]
            v = qkv[..., j:].view(b, n, KV, D)
            if b < B:  # one row (a prompt, or a greedy step): its keys and values go to every row
                torch.ops.llama.update_cache(k * self.rows, kc, start)
                torch.ops.llama.update_cache(v * self.rows, vc, start)
                k0, v0 = kc.view(1, B * S, KV, D), vc.view(1, B * S, KV, D)  # positions 0..S-1: row 0
                a = torch.ops.llama.custom_sdpa(q, k0, v0, start, None, 0.0, True, self.scaling)
            else:
                torch.ops.llama.update_cache(k, kc, start)
                torch.ops.llama.update_cache(v, vc, start)
                a = torch.ops.llama.custom_sdpa(q, kc, vc, start, None, 0.0, True, self.scaling)
            x = x + layer.o(a.view(b, n, H * D))
            h = self._rms(x, layer.ln2)
            gu = layer.gate_up(h)
            g = gu[..., : layer.ffn]
            x = x + layer.down(g * torch.sigmoid(g) * gu[..., layer.ffn:])
        return x

    # -- the methods -------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """One decode step: tokens (B, 1) at position ``cache_position[0]`` -> next-token logits (B, V)."""
        start = _start(cache_position, 1, self.max_seq_len)
        cos, sin = self._rope(cache_position)
        x = self._layers(self.embed(tokens), cos, sin, start)
        return self.lm_head(self._rms(x, self.norm).view(tokens.shape[0], self.hidden))

    def step(self, tokens: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """One greedy decode step of row 0 alone: token (1, 1) at position ``cache_position[0]`` -> logits (1, V).
        Its keys and values go to every row (like a prompt's); attention reads row 0 only."""
        start = _start(cache_position, 1, self.max_seq_len)
        cos, sin = self._rope(cache_position)
        x = self._layers(self.embed(tokens), cos, sin, start)
        return self.lm_head(self._rms(x, self.norm).view(1, self.hidden))

    def prefill(self, tokens: torch.Tensor, cache_position: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """A prompt chunk (1, P) at positions ``cache_position`` (P,), written to every row -> the logits (1, V) of
        its position ``last[0]`` (the chunk's last real token)."""
        start = _start(cache_position, tokens.shape[1], self.max_seq_len)
        cos, sin = self._rope(cache_position)
        x = self._layers(self.embed(tokens), cos, sin, start).index_select(1, last)
        return self.lm_head(self._rms(x, self.norm).view(1, self.hidden))

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (1, P, H) of a prompt chunk (1, P): what the host puts image-token embeddings into."""
        return self.embed(tokens)

    def prefill_embeds(self, embeds: torch.Tensor, cache_position: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """``prefill`` of a chunk given as embeddings (1, P, H) (text and image tokens merged by the host)."""
        start = _start(cache_position, embeds.shape[1], self.max_seq_len)
        cos, sin = self._rope(cache_position)
        x = self._layers(embeds, cos, sin, start).index_select(1, last)
        return self.lm_head(self._rms(x, self.norm).view(1, self.hidden))

    def reorder(self, index: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """Row i of the cache becomes old row ``index[i]`` (B,) at positions ``cache_position`` (L,), consecutive."""
        return self.cache.reorder(index, cache_position)

    def clear(self) -> torch.Tensor:
        """Zeros in the whole cache."""
        return self.cache.clear()

    # -- export ------------------------------------------------------------------------------------
    def example_args(self) -> dict[str, tuple[torch.Tensor, ...]]:
        B, P = self.batch, self.prefill_chunk
        return {"token_embeddings": (torch.zeros(1, P, dtype=torch.long),),
                "prefill_embeds": (torch.zeros(1, P, self.hidden), torch.arange(P), torch.tensor([P - 1])),
                "forward": (torch.zeros(B, 1, dtype=torch.long), torch.tensor([P])),
                "step": (torch.zeros(1, 1, dtype=torch.long), torch.tensor([P])),
                "prefill": (torch.zeros(1, P, dtype=torch.long), torch.arange(P), torch.tensor([P - 1])),
                "reorder": (torch.arange(B).flip(0), torch.arange(min(8, self.max_seq_len - 1))), "clear": ()}

    def export_methods(self) -> dict:
        """``torch.export`` of each method: ``{name: ExportedProgram}`` for ``to_edge_transform_and_lower``.

        The wrappers keep the cache under the same names in every method (``core.cache.k0`` ...), which is
        how ``share_mutable_buffers`` makes the methods read and write one cache; ``reorder`` holds only the
        cache, and its length is dynamic (1..max_seq_len - 1)."""
        from torch.export import Dim, export

        seq = Dim("seq", min=1, max=self.max_seq_len - 1)
        args = self.example_args()
        dynamic = {m: None for m in self.methods}
        dynamic["reorder"] = ((None, {0: seq}),)  # forward(*args): the cache positions' length
        out = {}
        for name in self.methods:
            out[name] = export(_Method(self, name), args[name], dynamic_shapes=dynamic[name], strict=False)
        return out


class _Method(nn.Module):
    """One method of a ``LlamaDecodeProgram`` as the ``forward`` of a module (what ``torch.export`` takes)."""

    def __init__(self, program: LlamaDecodeProgram, name: str):
        super().__init__()
        if name in ("reorder", "clear"):  # the cache alone (no weights), under the same names as in the others
            self.core = nn.Module()
            self.core.cache = program.cache
        else:
            self.core = program
        self.name = name

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.name in ("reorder", "clear"):
            return getattr(self.core.cache, self.name)(*args)
        return getattr(self.core, self.name)(*args)
