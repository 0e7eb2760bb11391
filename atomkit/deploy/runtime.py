"""Run exported ``.pte`` programs on the host as drop-in replacements of the eager modules.

``open_program(path)`` builds the right wrapper from the program's sidecar JSON and the tokenizer
saved beside it, without loading eager weights; ``Session(programs=DIR)`` uses it. The ``like=``
argument of each wrapper takes those host-side pieces from an eager module instead.

* ``PteEncoder(path, like=encoder)``: same ``encode(frames_uint8) -> Encoded`` as the eager encoder
  (its ``preprocess``, labels and concept logic are reused); clips of any length are padded / chunked
  to the program's fixed frame count (frames are independent, so results do not change).
* ``PteEmbedder(path, tokenizer, seq_len)``: ``embed(texts) -> (N, D)`` unit vectors; tokenisation
  runs on the host: truncate to seq_len, pad to seq_len (static program) or to the longest text of
  the call (``dynamic_seq`` program). Texts longer than seq_len tokens are truncated.
* ``PteDecoder(path, like=decoder)``: a ``TextDecoder`` whose ``generate_ids`` runs the decode engine's greedy
  or beam search over the program, so ``caption`` / ``chat`` / ``render`` work unchanged. The compact Llama
  program (``atomkit.deploy.decoder_program``) holds a KV cache of ``batch`` rows (default 4): the beams are its rows
  and its ``reorder`` method moves them, so ``--programs`` captions with beam 4 like the eager path. An older
  static-cache program holds one sequence: ``num_beams > 1`` falls back to greedy (a warning the first time,
  counted in ``greedy_fallbacks``), or raises ``AtomkitError`` with ``strict_beams=True``.
  Visual-prefix decoders (``inputs_embeds``) are not supported by the id-only program.

One loaded ExecuTorch method is not safe to call from two threads at once; the encoder and embedder
serialise their calls with a lock. The decoder program's KV cache lives for a whole generation, so the
decoder serialises whole generations (``TextDecoder.generation()``: prefill to last step), not single
steps. (ExecuTorch kernels and XNNPACK share one thread pool in a process anyway.)
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from atomkit.errors import AtomkitError, InputError
from atomkit.models.decoder import TextDecoder
from atomkit.models.embedder import SentenceEmbedder
from atomkit.models.encoder import VideoEncoder, imagenet_labels
from atomkit.deploy.program import (load_method, load_methods, prefill_chunks, read_sidecar, saved_processor,
                                    saved_tokenizer, tokenize_fixed)
from atomkit.models.smolvlm import VideoPrompts


def _program(path) -> tuple:
    path = Path(path)
    if not path.exists():
        raise AtomkitError(f"{path}: no such .pte program; export it with atomkit.deploy.export first")
    return load_method(path), read_sidecar(path)


def in_chunks(method, x: torch.Tensor, frames: int, lock: threading.Lock) -> tuple[torch.Tensor, ...]:
    """A program of a fixed frame count over any number of frames: ``frames`` at a time, the last chunk padded with
    copies of its last frame whose outputs are dropped (frames are independent), one call at a time (``lock``);
    each output concatenated over the chunks."""
    outs = []
    for start in range(0, x.shape[0], frames):
        chunk = x[start:start + frames]
        real = chunk.shape[0]
        if real < frames:
            chunk = torch.cat([chunk, chunk[-1:].expand(frames - real, *chunk.shape[1:])])
        with lock:
            res = method.execute([chunk.contiguous()])
        outs.append([r[:real] for r in res])
    return tuple(torch.cat([o[i] for o in outs]) for i in range(len(outs[0])))


MODULE_CLASSES = {}  # filled below: module name -> wrapper class


def open_program(path, module: str | None = None):
    """The runtime wrapper of one exported program, built from its sidecar and saved tokenizer alone
    (no eager weights are loaded): ``PteEncoder``, ``PteDecoder`` or ``PteEmbedder``."""
    path = Path(path)
    if not path.exists():
        raise AtomkitError(f"{path}: no such .pte program; export it with `atomkit export --out {path.parent}`")
    module = module or read_sidecar(path).get("module")
    if module not in MODULE_CLASSES:
        raise AtomkitError(f"{path}: unknown module {module!r} (sidecar {path.with_suffix('.json').name} missing "
                           f"or foreign); expected one of {sorted(MODULE_CLASSES)}")
    return MODULE_CLASSES[module](path)


class PteEncoder(VideoEncoder):
    """A ``VideoEncoder`` whose forward is the ``.pte`` program's ``forward`` method."""

    def __init__(self, path, like: VideoEncoder | None = None):
        super().__init__()
        self.path = Path(path)
        self._method, self.meta = _program(self.path)
        self._lock = threading.Lock()
        if like is not None:
            self.mean, self.std = like.mean, like.std
            self.feature_dim, self.labels, self.top_concepts = like.feature_dim, like.labels, like.top_concepts
            self.detector = like.detector
        else:  # everything the host side needs is in the sidecar
            meta = self.meta
            missing = [k for k in ("mean", "std", "feature_dim") if k not in meta]
            if missing:
                raise AtomkitError(f"{self.path.with_suffix('.json')}: sidecar lacks {missing}; re-export the "
                                   "encoder with `atomkit export` or pass like=<eager encoder>")
            self.mean, self.std, self.feature_dim = tuple(meta["mean"]), tuple(meta["std"]), int(meta["feature_dim"])
            self.labels = imagenet_labels() if meta.get("labels") == "imagenet" else None
            self.top_concepts = int(meta.get("top_concepts", 5))
            if meta.get("detector"):  # the host-side detector the eager encoder had (OpenCV, from its package)
                from atomkit.models import detector

                self.detector = detector.load()
        self.frames = int(self.meta.get("frames", 6))
        self.size = self.meta.get("size")
        # encode() asks the parameters for their device: one empty CPU parameter answers it.
        self._device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor):
        x = x.float().contiguous().cpu()
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            raise InputError(f"{self.path.name} was exported for {self.size}x{self.size} frames, got {tuple(x.shape)}")
        cat = in_chunks(self._method, x, self.frames, self._lock)
        return cat if len(cat) > 1 else cat[0]


class PteEmbedder(SentenceEmbedder):
    """``embed(texts) -> (N, D)`` L2-normalised float32 vectors from the embedder program."""

    def __init__(self, path, tokenizer=None, seq_len: int | None = None):
        nn.Module.__init__(self)
        self.path = Path(path)
        self._method, self.meta = _program(self.path)
        self._lock = threading.Lock()
        self.tokenizer = tokenizer if tokenizer is not None else saved_tokenizer(self.path)
        self.seq_len = int(seq_len or self.meta.get("seq_len", 128))
        if self.meta.get("seq_len") not in (None, self.seq_len):
            raise AtomkitError(f"{self.path.name} was exported for seq_len {self.meta['seq_len']}, not {self.seq_len}")
        self.batch = int(self.meta.get("batch", 1))
        self.dynamic_seq = bool(self.meta.get("dynamic_seq", False))
        self._dim = self.meta.get("dim")
        self.model = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.embed(["x"]).shape[1])
        return int(self._dim)

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        out = []
        for start in range(0, len(texts), self.batch):
            ids, mask = tokenize_fixed(self.tokenizer, texts[start:start + self.batch], self.seq_len,
                                       dynamic=self.dynamic_seq)
            real = ids.shape[0]
            if real < self.batch:  # static batch: pad with copies of the last row, drop their outputs
                pad = self.batch - real
                ids = torch.cat([ids, ids[-1:].expand(pad, -1)])
                mask = torch.cat([mask, mask[-1:].expand(pad, -1)])
            with self._lock:
                vec = self._method.execute([ids.contiguous(), mask.contiguous()])[0]
            out.append(vec[:real].float())
        return torch.cat(out)


class PteDecoder(TextDecoder):
    """A ``TextDecoder`` generating with a decoder ``.pte`` program: greedy and beam search.

    A compact program (``program_kind`` "llama-custom-ops", from ``atomkit.deploy.decoder_program``) holds a KV cache of
    ``batch`` rows with ``forward`` / ``prefill`` / ``reorder`` methods: beam search runs with up to ``batch`` beams
    (the beams are the rows). An older static-cache program holds one sequence: ``num_beams > 1`` then falls back
    to greedy (a warning the first time, counted in ``greedy_fallbacks``), or raises ``AtomkitError`` with
    ``strict_beams=True``."""

    def __init__(self, path, like: TextDecoder | None = None, *, strict_beams: bool = False):
        nn.Module.__init__(self)
        self.path = Path(path)
        if not self.path.exists():
            raise AtomkitError(f"{self.path}: no such .pte program; export it with atomkit.deploy.export first")
        self.meta = read_sidecar(self.path)
        self.kind = self.meta.get("program_kind", "static-cache")
        names = tuple(self.meta.get("methods") or ("forward",))
        self._methods = load_methods(self.path, names)  # all at once: they share the program's KV cache
        if "clear" in self._methods:
            self._methods["clear"].execute([])  # the cache starts as zeros (the program stores no initial cache)
        self._method = self._methods["forward"]
        self.batch = int(self.meta.get("batch", 1)) if self.kind == "llama-custom-ops" else 1
        self.lm = None  # the eager weights are not kept: the program holds its own
        self.projector = None
        if like is not None and like.projector is not None:
            warnings.warn(f"{self.path.name}: the .pte decoder takes token ids only; visual-prefix "
                          "captioning (inputs_embeds) is not available through it")
        self.tokenizer = like.tokenizer if like is not None else saved_tokenizer(self.path)
        self.stop_at_eos = like.stop_at_eos if like is not None else bool(self.meta.get("stop_at_eos", True))
        self.strict_beams = strict_beams
        self.greedy_fallbacks = 0
        self.max_seq_len = int(self.meta.get("max_seq_len", 512))
        self.max_prefill = int(self.meta.get("max_prefill", 1))
        eos = self.meta.get("eos_token_id", None)
        if eos is None and like is not None and like.lm is not None:
            eos = like.lm.generation_config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    # -- the program's methods (callers hold ``generation()``: the cache lives for a whole generation) ------
    def _prefill(self, ids: list[int]) -> torch.Tensor:
        """Feed a prompt from position 0 (in chunks of the program's prefill length); logits of its last token (V,)."""
        if self.kind == "llama-custom-ops":
            for args in prefill_chunks(ids, self.max_prefill, self.max_seq_len):
                out = self._methods["prefill"].execute(list(args))
            return out[0].reshape(-1)
        for start in range(0, len(ids), self.max_prefill):  # a static-cache program: any length up to max_prefill
            chunk = ids[start:start + self.max_prefill]
            out = self._method.execute([torch.tensor([chunk], dtype=torch.long),
                                        torch.arange(start, start + len(chunk), dtype=torch.long)])
        return out[0].reshape(-1, out[0].shape[-1])[-1]

    def _prefill_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """Feed a prompt given as embeddings (L, H) from position 0, in the program's chunks (the last padded with
        its last row); logits of its last position (V,)."""
        n, chunk = embeds.shape[0], self.max_prefill
        for tokens, positions, last in prefill_chunks(list(range(n)), chunk, self.max_seq_len):
            rows = embeds.index_select(0, tokens[0]).reshape(1, chunk, -1).float().contiguous()
            out = self._methods["prefill_embeds"].execute([rows, positions, last])
        return out[0].reshape(-1)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """The program's token embeddings (L, H) of ``ids`` (its ``token_embeddings`` method, chunk by chunk, the last
        chunk padded with its last id)."""
        ids, chunk, parts = ids.reshape(-1).long().tolist(), self.max_prefill, []
        for start in range(0, len(ids), chunk):
            real = ids[start:start + chunk]
            tokens = torch.tensor([real + [real[-1]] * (chunk - len(real))], dtype=torch.long)
            parts.append(self._methods["token_embeddings"].execute([tokens])[0][0, : len(real)])
        return torch.cat(parts)

    def _forward(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """One token per row (up to ``batch`` rows) at position ``pos``; logits (rows, V). One row runs the program's
        ``step`` where it has one (row 0 alone, its keys and values written to every row); fewer rows otherwise are
        padded with copies of the last row, whose logits are dropped."""
        tokens = tokens.reshape(-1).long()
        b = tokens.shape[0]
        where = torch.tensor([pos], dtype=torch.long)
        if b == 1 and "step" in self._methods:
            return self._methods["step"].execute([tokens.reshape(1, 1).contiguous(), where])[0].reshape(1, -1)
        if b < self.batch:
            tokens = torch.cat([tokens, tokens[-1:].expand(self.batch - b)])
        out = self._method.execute([tokens.reshape(self.batch, 1).contiguous(), where])
        return out[0].reshape(self.batch, -1)[:b]

    def _reorder(self, index: torch.Tensor, start: int, end: int) -> None:
        """Row i of the cache becomes old row ``index[i]`` at positions start..end-1."""
        self._methods["reorder"].execute([index.long().contiguous(), torch.arange(start, end, dtype=torch.long)])

    def stop_ids(self) -> list[int]:
        return sorted(self.eos_ids) if self.stop_at_eos else []

    def stepper(self, backend: str = "auto") -> "PteStepper":
        """The program as an engine ``Stepper`` (``batch`` rows)."""
        self._check_backend(backend)
        return PteStepper(self)

    def _check_backend(self, backend: str) -> None:
        if backend not in ("auto", "pte"):
            raise AtomkitError(f"{self.path.name}: a .pte decoder decodes with its program; backend {backend!r} "
                               "needs the eager decoder (a Session without programs=)")

    @torch.inference_mode()
    def generate_ids(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                     max_new_tokens: int, num_beams: int, backend: str = "auto",
                     stop: Sequence[int] = ()) -> torch.Tensor:
        """New token ids (1-D) after the prompt: greedy, or beam search with up to ``batch`` beams (the engine's
        search, ``generate``'s semantics). The program is the backend: ``backend`` is accepted for the
        ``TextDecoder`` signature and must be auto or pte. ``stop``: more ids that end the sequence besides EOS."""
        self._check_backend(backend)
        if inputs_embeds is not None and "prefill_embeds" not in self._methods:
            raise AtomkitError(f"{self.path.name}: the .pte decoder takes token ids, not inputs_embeds "
                               "(visual-prefix models run eager)")
        if num_beams > self.batch:
            what = (f"holds {self.batch} rows: num_beams={num_beams} needs a program exported with "
                    f"--decoder-batch {num_beams}" if self.batch > 1 else "is batch 1 and does greedy decoding only")
            if self.strict_beams:
                raise AtomkitError(f"{self.path.name} {what} (or the eager decoder, or fewer beams)")
            if self.greedy_fallbacks == 0:
                warnings.warn(f"{self.path.name} {what}; falling back to greedy decoding")
            self.greedy_fallbacks += 1
            num_beams = 1
        prompt = inputs_embeds if inputs_embeds is not None else input_ids
        if prompt is None or prompt.numel() == 0:
            raise InputError("empty prompt")
        from atomkit.decode.engine import Engine

        eos = self.stops(stop) or None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        search = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, eos_token_id=eos, pad_token_id=pad)
        with self.generation():  # the program's cache holds this sequence from prefill to the last step
            engine = Engine(PteStepper(self), "pte")
            if inputs_embeds is not None:
                new = engine.generate(inputs_embeds=inputs_embeds.reshape(1, *inputs_embeds.shape[-2:]).cpu(), **search)
            else:
                new = engine.generate(input_ids.reshape(1, -1).cpu(), **search)
        return new[0]

    def generate_batch(self, prompts=None, *, embeds=None, max_new_tokens: int, num_beams: int,
                       backend: str = "auto", stop: Sequence[int] = ()) -> list[torch.Tensor]:
        """One prompt after the other: the program's rows are one prompt's beams. ``stop``: more ids that end a
        prompt's sequence besides EOS (``TextDecoder.generate_batch``)."""
        from atomkit.models.decoder import until_stop

        opts = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, backend=backend, stop=stop)
        if embeds is not None:
            return [until_stop(self.generate_ids(inputs_embeds=e[None], **opts), self.stops(stop)) for e in embeds]
        return [until_stop(self.generate_ids(p, **opts), self.stops(stop)) for p in prompts]


class PteStepper:
    """The decode engine's stepper (``atomkit.decode.engine``) over a decoder program: its rows are the batch.

    One prompt at a time (``prefill`` takes one row of ids, no padding): the compact program writes the prompt to
    all its rows, so beam search's first ``reorder`` (the prompt to every beam) has nothing to move. Fewer rows
    than the program holds go through ``PteDecoder._forward``: one row (greedy) runs the program's ``step`` where it
    has one (programs exported before it pad like the others). The KV cache lives inside the program; a new
    generation simply starts writing at position 0 again."""

    def __init__(self, decoder: "PteDecoder"):
        self.decoder = decoder
        self.name = f"pte:{decoder.path.name}"
        self.max_seq_len = decoder.max_seq_len
        self.max_batch_size = decoder.batch
        self.rows, self.filled, self.same_rows = 1, 0, True

    def reset(self, batch_size: int, seq_len: int) -> None:
        if batch_size > self.max_batch_size:
            raise InputError(f"{self.decoder.path.name} holds {self.max_batch_size} row(s); got {batch_size}")
        if seq_len > self.max_seq_len:
            raise InputError(f"prompt + new tokens = {seq_len} positions exceed the static cache of "
                             f"{self.decoder.path.name} ({self.max_seq_len}); export with a larger --max-seq-len")
        self.rows, self.filled, self.same_rows = batch_size, 0, True

    def prefill(self, input_ids=None, inputs_embeds=None, pad=None) -> torch.Tensor:
        if inputs_embeds is not None:
            emb = inputs_embeds if inputs_embeds.dim() == 3 else inputs_embeds[None]
            if "prefill_embeds" not in self.decoder._methods:
                raise InputError(f"{self.decoder.path.name} takes token ids, not inputs_embeds (visual-prefix models "
                                 "caption with an eager backend)")
            if emb.shape[0] != 1 or (pad is not None and bool((pad > 0).any())):
                raise InputError(f"{self.decoder.path.name} prefills one prompt at a time; got {emb.shape[0]} rows")
            logits = self.decoder._prefill_embeds(emb[0])
            self.filled, self.same_rows = emb.shape[1], True
            return logits.float().reshape(1, -1)
        ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
        if ids.shape[0] != 1 or (pad is not None and bool((pad > 0).any())):
            raise InputError(f"{self.decoder.path.name} prefills one prompt at a time; got {ids.shape[0]} rows")
        ids = ids.reshape(-1).tolist()
        logits = self.decoder._prefill(ids)
        self.filled, self.same_rows = len(ids), True
        return logits.float().reshape(1, -1)

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        tokens = tokens.reshape(-1).cpu().long()
        b = tokens.shape[0]
        if b > self.max_batch_size:
            raise InputError(f"{self.decoder.path.name} holds {self.max_batch_size} row(s); got {b} tokens")
        logits = self.decoder._forward(tokens, pos)
        self.filled = max(self.filled, pos + 1)
        self.same_rows = self.same_rows and bool((tokens == tokens[0]).all())
        return logits.float()

    def reorder(self, index: torch.Tensor, keep: int = 0) -> None:
        index = index.reshape(-1).cpu().long()
        if self.same_rows:  # every row holds the same keys and values (always so with one row): nothing moves
            return
        start = min(keep, self.filled)
        if start >= self.filled:
            return
        B = self.max_batch_size
        if index.shape[0] < B:  # the padding rows stay where they are
            index = torch.cat([index, torch.arange(index.shape[0], B)])
        self.decoder._reorder(index, start, self.filled)


class PteVideoDecoder(VideoPrompts, PteDecoder):
    """A video-language model's LM program (SmolVLM2: exported with ``token_embeddings`` and ``prefill_embeds``):
    each clip's prompt is built on the host with the processor saved beside the program, its token embeddings come
    from the program and the encoder's image-token embeddings go where the image tokens are; text-only prompts (the
    script) go in as tokens."""

    def __init__(self, path, like: TextDecoder | None = None, *, strict_beams: bool = False):
        super().__init__(path, like=like, strict_beams=strict_beams)
        self.processor = getattr(like, "processor", None) or saved_processor(self.path)
        self.tokenizer = self.processor.tokenizer if like is None else like.tokenizer
        self.image_token_id = int(self.meta["image_token_id"])


def _decoder_program(path, like: TextDecoder | None = None, **kwargs) -> PteDecoder:
    """The wrapper a decoder program's sidecar asks for: embeddings in (a video-language model) or tokens only."""
    cls = PteVideoDecoder if read_sidecar(Path(path)).get("embeds") else PteDecoder
    return cls(path, like=like, **kwargs)


class PteRetriever(nn.Module):
    """A dual encoder's two programs (``atomkit.deploy.export.export_retriever``) as the session's retriever: the same
    ``embed_clip(frames)`` and ``embed(texts)`` as ``atomkit.models.dual.DualEncoder``, preprocessing and pooling on
    the host."""

    def __init__(self, path):
        super().__init__()
        import open_clip

        from atomkit.models.dual import DualEncoder

        self.path = Path(path)
        self._image, self.meta = _program(self.path)
        text = self.path.with_name(self.meta.get("text_program", f"{self.path.stem}-text.pte"))
        self._text, self.text_meta = _program(text)
        tok = self.path.with_suffix(".tokenizer")
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{tok}") if tok.is_dir() else open_clip.get_tokenizer("ViT-B-32")
        self.image_size, self.frames = int(self.meta["size"]), int(self.meta["frames"])
        self.mean, self.std = tuple(self.meta["mean"]), tuple(self.meta["std"])
        self.preprocess = DualEncoder.preprocess.__get__(self)  # the same resize and normalisation
        self._lock = threading.Lock()
        self._device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    @torch.inference_mode()
    def embed_clip(self, frames: torch.Tensor) -> torch.Tensor:
        from atomkit.models.dual import pool

        return pool(self.frame_vectors(frames))

    @torch.inference_mode()
    def frame_vectors(self, frames: torch.Tensor) -> torch.Tensor:
        """Unit vectors (T, D) of a clip's frames, from the image program."""
        return in_chunks(self._image, self.preprocess(frames).contiguous(), self.frames, self._lock)[0].float()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts) or [""])
        with self._lock:
            out = torch.cat([self._text.execute([tokens[i:i + 1].contiguous()])[0] for i in range(tokens.shape[0])])
        return out[: len(texts)].float()


MODULE_CLASSES.update(encoder=PteEncoder, decoder=_decoder_program, embedder=PteEmbedder, retriever=PteRetriever)
