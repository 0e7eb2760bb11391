"""Export the three modules to ExecuTorch ``.pte`` programs lowered to XNNPACK (the on-device path).

Each ``export_*`` runs ``torch.export.export`` -> ``executorch.exir.to_edge_transform_and_lower(ep,
partitioner=[XnnpackPartitioner()])`` -> ``.to_executorch()``, writes ``<name>.pte`` and a sidecar
``<name>.json`` (shapes, versions, delegation, parity) atomically, and checks the program against
the eager module on the example input:

* encoder: ``forward(x float (frames, 3, size, size)) -> (features, probs)`` (or features alone);
* embedder: ``forward(input_ids, attention_mask (B, seq_len) int64) -> (B, D)`` unit vectors, the
  transformer plus mean pooling and L2 norm; tokenisation (pad/truncate to seq_len) stays on the host;
* decoder (a Llama LM): ``atomkit.deploy.decoder_program.LlamaDecodeProgram``, one program with five methods over
  a KV cache of ``batch`` rows (default 4, the beams) held inside it and shared by them:
  ``forward(tokens (B, 1), cache_position (1,)) -> logits (B, vocab)`` (a decode step),
  ``step(tokens (1, 1), cache_position (1,)) -> logits (1, vocab)`` (a greedy step of row 0 alone),
  ``prefill(tokens (1, P), cache_position (P,), last (1,)) -> logits (1, vocab)`` (a chunk of P prompt tokens),
  ``reorder(index (B,), cache_position (L,))`` (beam search moves its beams) and ``clear()``; cache writes and
  attention are ExecuTorch's LLM custom ops, so each layer of a step lowers to one or two XNNPACK pieces;
* decoder (any other LM): ``forward(input_ids (1, L), cache_position (L,)) -> logits (1, 1, vocab)`` over
  transformers' static cache (``TorchExportableModuleWithStaticCache``), batch 1 (greedy).

Parity: the program against the eager module it was exported from (the same quantization), SQNR
>= 40 dB for fp32 programs and >= 20 dB for quantized ones (XNNPACK quantizes activations with its
own rounding); the decoder's parity is teacher-forced over its prefill and ``PARITY_STEPS`` decode steps
(for the compact program: of all its rows, with a ``reorder`` halfway).
The quantization error itself (quantized vs fp32 eager) is reported beside it as
``vs_fp32`` and judged by ``atomkit.evaluation.parity``, not here. Lowering itself is ``atomkit.deploy.lowering``;
load times of eager / TorchScript / ``.pte`` are ``atomkit.deploy.loads``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from atomkit.io import atomic_path, write_json_atomic
from atomkit.deploy.program import load_method, save_processor, save_tokenizer, tokenize_fixed
from atomkit.deploy.lowering import _lower, _lower_methods, _quantized, gc_paused
from atomkit.deploy.quant import finite_sqnr_db

SQNR_MIN_DB = {"fp32": 40.0, "quantized": 20.0}
PARITY_STEPS = 16  # teacher-forced decode steps in the decoder's parity check


@dataclass
class ExportResult:
    path: Path  # the .pte program
    sidecar: Path  # <name>.json next to it
    delegation: dict
    parity: dict
    seconds: float  # export + lowering + serialisation (parity run excluded)


def parity(refs: dict[str, torch.Tensor], outs: dict[str, torch.Tensor], quantized: bool,
           fp32: dict[str, torch.Tensor] | None = None) -> dict:
    """Program outputs ``outs`` vs the eager module's ``refs`` (same quantization); ``fp32``: the fp32
    module's outputs, reported as the quantization error."""
    tol = SQNR_MIN_DB["quantized" if quantized else "fp32"]
    per = {k: {"max_abs_diff": float((refs[k].float() - outs[k].float()).abs().max()),
               "sqnr_db": round(finite_sqnr_db(refs[k], outs[k]), 2),  # and the share of rows with the same argmax:
               "top1_agreement": float((refs[k].argmax(-1) == outs[k].argmax(-1)).float().mean())} for k in refs}
    out = {"tolerance": f"SQNR >= {tol} dB vs the eager module with the same quantization", "sqnr_min_db": tol,
           "outputs": per, "passed": all(v["sqnr_db"] >= tol for v in per.values())}
    if fp32 is not None and quantized:  # how far the program is from fp32: the quantization error
        out["vs_fp32"] = {k: {"sqnr_db": round(finite_sqnr_db(fp32[k], outs[k]), 2),
                              "top1_agreement": float((fp32[k].argmax(-1) == outs[k].argmax(-1)).float().mean())}
                          for k in fp32}
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None
    return {pkg: v(pkg) for pkg in ("torch", "torchao", "executorch", "transformers")}


def _spec(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


# -- the common pipeline -----------------------------------------------------------------------------
def _write(et, out_dir: Path, name: str) -> Path:
    path = Path(out_dir) / f"{name}.pte"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        et.write_to_file(f)
    return path


def _sidecar(path: Path, report: dict, **fields) -> Path:
    meta = dict(fields, delegation={k: v for k, v in report.items() if k != "inside_ops"}, versions=_versions(),
                file_bytes=path.stat().st_size, program=path.name,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return write_json_atomic(path.with_suffix(".json"), meta)


def _finish(et, report, out_dir, name, *, t0, model, module, quant, inputs, run_eager, run_fp32=None,
            extra=None) -> ExportResult:
    path = _write(et, out_dir, name)
    seconds = time.perf_counter() - t0
    method = load_method(path)
    refs = run_eager()
    outs = dict(zip(refs, method.execute(list(inputs.values()))))
    par = parity(refs, outs, quant != "none", fp32=run_fp32() if run_fp32 and quant != "none" else None)
    side = _sidecar(path, report, name=name, model=model, module=module, quant=quant,
                    inputs={k: _spec(v) for k, v in inputs.items()},
                    outputs={k: _spec(v) for k, v in outs.items()},
                    parity=par, export_seconds=round(seconds, 2), **(extra or {}))
    return ExportResult(path, side, report, par, seconds)


# -- encoder -----------------------------------------------------------------------------------------
def export_encoder(encoder, out_dir, *, name: str, quant: str = "none", frames: int = 6, size: int = 224,
                   model: str | None = None) -> ExportResult:
    """The encoder's forward on float (frames, 3, size, size); frames are independent, so the runtime
    pads/chunks any clip length to ``frames``."""
    t0 = time.perf_counter()
    encoder = encoder.eval().cpu()
    x = torch.randn(frames, 3, size, size, generator=torch.Generator().manual_seed(0))
    qenc = _quantized(encoder, quant)
    et, report = _lower(qenc, (x,), quantized=quant != "none")

    def outputs(module):
        def run():
            with torch.inference_mode():
                out = module(x)
            return dict(zip(("features", "probs"), out if isinstance(out, tuple) else (out,)))
        return run

    return _finish(et, report, out_dir, name, t0=t0, model=model or type(encoder).__name__, module="encoder",
                   quant=quant, inputs={"x": x}, run_eager=outputs(qenc), run_fp32=outputs(encoder),
                   extra={"frames": frames, "size": size, "mean": list(encoder.mean), "std": list(encoder.std),
                          "feature_dim": int(encoder.feature_dim), "top_concepts": int(encoder.top_concepts),
                          "labels": "imagenet" if encoder.labels is not None else None,
                          "detector": getattr(encoder.detector, "name", None)})


# -- embedder ----------------------------------------------------------------------------------------
def export_embedder(embedder, out_dir, *, name: str, quant: str = "none", seq_len: int = 128,
                    batch: int = 1, dynamic_seq: bool = True, model: str | None = None) -> ExportResult:
    """The transformer + pooling at a static batch; the runtime pads the last batch.

    Batch stays static: a dynamic batch left every reshape outside XNNPACK (MiniLM: 65 delegate pieces,
    not 29). ``dynamic_seq`` (default): length 2..seq_len, the host pads only to the longest text (59
    pieces, but a short caption costs a fraction of a 128-token pass: the fixed-length program measured
    10-18x slower than eager on captions); ``dynamic_seq=False``: exactly seq_len tokens (29 pieces)."""
    t0 = time.perf_counter()
    wrapper = embedder.net.eval()  # BERT, mean pooling and normalisation, tensors in and out (MeanPooledBert)
    texts = (["a person rides a bike down a street", "a cartoon rabbit in a forest"] * batch)[:batch]
    ids, mask = tokenize_fixed(embedder.tokenizer, texts, seq_len, dynamic=dynamic_seq)
    seq = {1: torch.export.Dim("seq", min=2, max=seq_len)} if dynamic_seq else None
    qwrapper = _quantized(wrapper, quant)
    et, report = _lower(qwrapper, (ids, mask), dynamic_shapes=seq and (seq, seq), quantized=quant != "none")

    def outputs(module):
        def run():
            with torch.inference_mode():
                return {"embedding": module(ids, mask).float()}
        return run

    save_tokenizer(embedder.tokenizer, Path(out_dir) / f"{name}.pte")
    return _finish(et, report, out_dir, name, t0=t0, model=model or "sentence-transformers", module="embedder",
                   quant=quant, inputs={"input_ids": ids, "attention_mask": mask}, run_eager=outputs(qwrapper),
                   run_fp32=outputs(wrapper),
                   extra={"seq_len": seq_len, "batch": batch, "dynamic_seq": dynamic_seq, "dim": int(embedder.dim)})


# -- retriever (a dual encoder) ----------------------------------------------------------------------
class _TextTower(nn.Module):
    """A dual encoder's text tower as a module of its own: token ids (N, context) -> unit vectors (N, D)."""

    def __init__(self, retriever):
        super().__init__()
        self.retriever = retriever

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.retriever.text_forward(tokens)


def export_retriever(retriever, out_dir, *, name: str = "retriever", quant: str = "none", frames: int = 6,
                     model: str | None = None) -> ExportResult:
    """A dual encoder's two towers as two programs: ``<name>.pte`` (image tower: normalised frames (frames, 3, S, S)
    -> unit frame vectors (frames, D); the runtime pads or chunks a clip to ``frames`` and pools on the host) and
    ``<name>-text.pte`` (text tower: one query's token ids (1, context) -> its unit vector (1, D)); the open_clip
    config beside them gives the host its tokenizer. Parity of both is checked; the text tower's is reported under
    the image program's ``parity["text"]``."""
    import shutil

    t0 = time.perf_counter()
    retriever = retriever.eval().cpu()
    size = retriever.image_size
    x = torch.rand(frames, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = (x - torch.tensor(retriever.mean).view(1, 3, 1, 1)) / torch.tensor(retriever.std).view(1, 3, 1, 1)
    qret = _quantized(retriever, quant)
    tokens = retriever.tokenizer(["a person rides a bike down a street"])
    text, qtext = _TextTower(retriever), _TextTower(qret)
    et_text, rep_text = _lower(qtext, (tokens,), quantized=quant != "none")

    def run(module, inp, key):
        def go():
            with torch.inference_mode():
                return {key: module(inp).float()}
        return go

    text_res = _finish(et_text, rep_text, out_dir, f"{name}-text", t0=t0, model=model or "open_clip",
                       module="retriever-text", quant=quant, inputs={"tokens": tokens},
                       run_eager=run(qtext, tokens, "vectors"), run_fp32=run(text, tokens, "vectors"),
                       extra={"context_length": int(tokens.shape[1])})
    folder = getattr(retriever, "folder", None)
    if folder is not None and (Path(folder) / "open_clip_config.json").is_file():  # the host's tokenizer
        tok = Path(out_dir) / f"{name}.tokenizer"
        tok.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(folder) / "open_clip_config.json", tok / "open_clip_config.json")
    t1 = time.perf_counter()
    et, report = _lower(qret, (x,), quantized=quant != "none")
    res = _finish(et, report, out_dir, name, t0=t1, model=model or "open_clip", module="retriever", quant=quant,
                  inputs={"x": x}, run_eager=run(qret, x, "frame_vectors"), run_fp32=run(retriever, x, "frame_vectors"),
                  extra={"frames": frames, "size": size, "mean": list(retriever.mean), "std": list(retriever.std),
                         "text_program": f"{name}-text.pte", "text_parity": text_res.parity})
    res.parity = {**res.parity, "text": text_res.parity,
                  "passed": res.parity["passed"] and text_res.parity["passed"]}
    res.seconds += text_res.seconds
    return res


# -- decoder -----------------------------------------------------------------------------------------
def _static_cache_module(lm, max_seq_len: int, batch_size: int = 1) -> nn.Module:
    """TorchExportableModuleWithStaticCache returning only the last position's logits."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    class LastLogits(TorchExportableModuleWithStaticCache):
        def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
            for layer in self.static_cache.layers:  # the cache length is where this call starts
                layer.cumulative_length.copy_(cache_position[0])
            out = self.model(input_ids=input_ids, attention_mask=None, past_key_values=self.static_cache,
                             use_cache=True, logits_to_keep=1)
            return out.logits

    saved = lm.generation_config
    gc = copy.deepcopy(saved)
    gc.use_cache, gc.cache_implementation = True, "static"
    lm.generation_config = gc  # the wrapper reads it once; the eager model's config is restored below
    try:
        return LastLogits(lm, batch_size=batch_size, max_cache_len=max_seq_len, device=torch.device("cpu")).eval()
    finally:
        lm.generation_config = saved


def export_decoder(decoder, out_dir, *, name: str, quant: str = "none", max_seq_len: int = 512, batch: int = 4,
                   model: str | None = None) -> ExportResult:
    """The decoder program: for a Llama LM the compact ``LlamaDecodeProgram`` (``atomkit.deploy.decoder_program``:
    ``forward`` / ``prefill`` / ``reorder`` over one KV cache of ``batch`` rows, so the runtime beam-searches with
    ``batch`` beams); any other LM goes through ``export_static_cache_decoder`` (batch 1, greedy)."""
    from atomkit.deploy.decoder_program import unsupported

    if unsupported(decoder.lm) is not None:
        return export_static_cache_decoder(decoder, out_dir, name=name, quant=quant, max_seq_len=max_seq_len,
                                           model=model)
    return export_llama_program(decoder, out_dir, name=name, quant=quant, max_seq_len=max_seq_len, batch=batch,
                                model=model)


def _program_run(method_fn, prompt: torch.Tensor, cont: list[int], batch: int, vocab: int, chunk: int,
                 max_seq_len: int, greedy: bool = True, embeds: bool = False) -> dict[str, torch.Tensor]:
    """Prefill ``prompt`` (1, n) in chunks, then decode teacher-forced: row 0 gets ``cont``, row r the token r places
    further in the vocabulary (rows differ), with one reversal of the rows (``reorder``) halfway; ``greedy``: then
    ``cont`` once more through the one-row ``step`` method. ``embeds``: the prompt goes in as embeddings
    (``token_embeddings`` then ``prefill_embeds``), as a video-language model's prompt does.
    ``method_fn(name, args)`` runs a method (eager or program); returns the logits of the prefill and of every step."""
    from atomkit.deploy.program import prefill_chunks

    def prefill(args):
        if not embeds:
            return method_fn("prefill", args)
        tokens, positions, last = args
        return method_fn("prefill_embeds", (method_fn("token_embeddings", (tokens,)), positions, last))

    n = prompt.shape[1]
    for args in prefill_chunks(prompt[0].tolist(), chunk, max_seq_len):
        first = prefill(args)
    rows = []
    for j, tok in enumerate(cont):
        pos = n + j
        if j == len(cont) // 2 and j > 0:  # beams move: row i becomes old row B-1-i at the generated positions
            method_fn("reorder", (torch.arange(batch).flip(0), torch.arange(n, pos)))
        toks = (torch.tensor([tok]) + torch.arange(batch)) % vocab
        rows.append(method_fn("forward", (toks[:, None], torch.tensor([pos]))))
    out = {"prefill_logits": first.reshape(1, -1), "decode_logits": torch.cat(rows) if rows else first[:0]}
    if greedy:  # the prompt again, then row 0 alone through ``step`` (every position it reads, it wrote anew)
        for args in prefill_chunks(prompt[0].tolist(), chunk, max_seq_len):
            prefill(args)
        steps = [method_fn("step", (torch.tensor([[tok]]), torch.tensor([n + j]))) for j, tok in enumerate(cont)]
        out["step_logits"] = torch.cat(steps) if steps else first[:0]
    return out


# what ExecuTorch's LLM ops print on every eager call: their ATen wrappers give the kernels no scratch allocator
EAGER_OP_NOISE = b"No temp allocator provided"


@contextlib.contextmanager
def _native_stderr_without(noise: bytes):
    """Native code's writes to stderr (file descriptor 2) within the block, less the lines containing ``noise``
    (written out after the block). Python's own ``sys.stderr`` is flushed first and unaffected otherwise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = b"".join(line for line in tmp if noise not in line)
            if kept:
                os.write(2, kept)


def export_llama_program(decoder, out_dir, *, name: str, quant: str = "none", max_seq_len: int = 512,
                         batch: int = 4, model: str | None = None) -> ExportResult:
    """``LlamaDecodeProgram`` of a Llama decoder -> one ``.pte`` with methods forward, step, prefill, reorder, clear.

    Parity (teacher-forced, against the eager program of the same quantization, and fp32 for the record):
    the prompt's last logits, then ``PARITY_STEPS`` steps of all ``batch`` rows with a reorder halfway, and the same
    steps of row 0 alone (``step``)."""
    from atomkit.deploy.decoder_program import LlamaDecodeProgram

    t0 = time.perf_counter()
    lm = decoder.lm.eval().cpu()
    embeds = getattr(decoder, "processor", None) is not None  # a video-language model: its prompts are embeddings
    fp32 = LlamaDecodeProgram(lm, batch=batch, max_seq_len=max_seq_len, embeds=embeds).eval()
    prog = _quantized(fp32, quant)
    prompt = decoder._ids(decoder.render([{"role": "user", "content": "Describe a video of a dog on a beach."}]))
    prompt = prompt[:, : max_seq_len // 2].cpu()
    chunk = prog.prefill_chunk
    with gc_paused():
        with torch.no_grad(), warnings.catch_warnings():
            # in executorch's meta kernels
            warnings.filterwarnings("ignore", message="_check_is_size", category=FutureWarning)
            methods = prog.export_methods()
        et, reports = _lower_methods(methods, quantized=quant != "none")
    path = _write(et, out_dir, name)
    save_tokenizer(decoder.tokenizer, path)
    if embeds:
        save_processor(decoder.processor, path)
    seconds = time.perf_counter() - t0

    from atomkit.deploy.program import load_methods

    loaded = load_methods(path, prog.methods)
    loaded["clear"].execute([])
    vocab = int(lm.config.vocab_size)
    steps = min(PARITY_STEPS, max_seq_len - prompt.shape[1] - 1)
    run = dict(batch=batch, vocab=vocab, chunk=chunk, max_seq_len=max_seq_len)

    def eager(module):
        def call(m, a):
            if m == "step":  # its reference: forward's row 0 with the token in every row (eager int8 rounds one row
                # alone differently from the same row among four: 30-35 dB apart for SmolLM2; XNNPACK's are equal)
                return module.forward(a[0].expand(batch, 1), a[1])[:1]
            return getattr(module, m)(*a)
        return call

    with torch.inference_mode(), _native_stderr_without(EAGER_OP_NOISE):
        prog.clear()
        cont = [int(_program_run(eager(prog), prompt, [], greedy=False, **run)["prefill_logits"].argmax())]
        for j in range(steps - 1):  # the eager program's own greedy continuation (row 0)
            toks = torch.full((batch, 1), cont[-1])
            cont.append(int(prog(toks, torch.tensor([prompt.shape[1] + j]))[0].argmax()))
        prog.clear()
        ref = _program_run(eager(prog), prompt, cont, **run)
        ref_fp32 = None
        if quant != "none":
            fp32.clear()
            ref_fp32 = _program_run(eager(fp32), prompt, cont, **run)
    got = _program_run(lambda m, a: loaded[m].execute(list(a))[0], prompt, cont, **run)
    par = parity(ref, got, quant != "none", fp32=ref_fp32)
    par["decode_steps"] = len(cont)
    if embeds:  # the same prompt as embeddings, program against eager: what a clip's caption goes through
        with torch.inference_mode(), _native_stderr_without(EAGER_OP_NOISE):
            prog.clear()
            ref_e = _program_run(eager(prog), prompt, cont, greedy=False, embeds=True, **run)
        loaded["clear"].execute([])
        got_e = _program_run(lambda m, a: loaded[m].execute(list(a))[0], prompt, cont, greedy=False, embeds=True, **run)
        par["embeds"] = parity(ref_e, got_e, quant != "none")
        par["passed"] = par["passed"] and par["embeds"]["passed"]
    layers = len(prog.layers)
    step = reports["forward"]
    delegation = dict(step, methods={m: {k: v for k, v in r.items() if k != "inside_ops"} for m, r in reports.items()},
                      pieces_per_layer=round(step["delegate_subgraphs"] / layers, 2), layers=layers)
    eos = lm.generation_config.eos_token_id
    side = _sidecar(path, delegation, name=name, model=model or type(lm).__name__, module="decoder", quant=quant,
                    program_kind="llama-custom-ops", methods=list(prog.methods), embeds=embeds,
                    image_token_id=getattr(decoder, "image_token_id", None),
                    inputs={"tokens": {"shape": [batch, 1], "dtype": "int64"},
                            "cache_position": {"shape": [1], "dtype": "int64"}},
                    outputs={"logits": {"shape": [batch, vocab], "dtype": "float32"}},
                    method_inputs={"forward": {"tokens": [batch, 1], "cache_position": [1]},
                                   "step": {"tokens": [1, 1], "cache_position": [1]},
                                   "prefill": {"tokens": [1, chunk], "cache_position": [chunk], "last": [1]},
                                   "reorder": {"index": [batch], "cache_position": ["L"]},
                                   **({"token_embeddings": {"tokens": [1, chunk]},
                                       "prefill_embeds": {"embeds": [1, chunk, int(lm.config.hidden_size)],
                                                          "cache_position": [chunk], "last": [1]}} if embeds else {})},
                    example_prompt_tokens=int(prompt.shape[1]), prefill="chunk", max_seq_len=max_seq_len,
                    max_prefill=chunk, batch=batch, beams=f"up to {batch}",
                    eos_token_id=eos, pad_token_id=decoder.tokenizer.pad_token_id, stop_at_eos=decoder.stop_at_eos,
                    parity=par, export_seconds=round(seconds, 2))
    return ExportResult(path, side, delegation, par, seconds)


def export_static_cache_decoder(decoder, out_dir, *, name: str, quant: str = "none", max_seq_len: int = 512,
                                model: str | None = None) -> ExportResult:
    """transformers' LM over its static KV cache, batch 1 (greedy only); prefill length dynamic (else token by
    token). The path for LMs ``LlamaDecodeProgram`` does not handle."""
    t0 = time.perf_counter()
    lm = decoder.lm.eval()
    qlm = _quantized(lm, quant).cpu()
    wrapper = _static_cache_module(qlm, max_seq_len)
    prompt = decoder._ids(decoder.render([{"role": "user", "content": "Describe a video of a dog on a beach."}]))
    prompt = prompt[:, : max_seq_len // 2].cpu()
    ids, pos = prompt, torch.arange(prompt.shape[1])
    try:
        seq = torch.export.Dim("seq", min=1, max=max_seq_len - 1)
        et, report = _lower(wrapper, (ids, pos), dynamic_shapes=({1: seq}, {0: seq}), strict=True,
                             init_buffers=["static_cache"], quantized=quant != "none")
        prefill = "dynamic"
    except Exception as e:  # noqa: BLE001 - fall back to one token per call
        warnings.warn(f"decoder: dynamic prefill did not export ({type(e).__name__}: {e}); token-by-token")
        wrapper = _static_cache_module(qlm, max_seq_len)
        et, report = _lower(wrapper, (ids[:, :1], pos[:1]), strict=True, init_buffers=["static_cache"],
                             quantized=quant != "none")
        prefill = "token"
    path = _write(et, out_dir, name)
    save_tokenizer(decoder.tokenizer, path)
    seconds = time.perf_counter() - t0

    # parity, teacher-forced: the prompt's last logits, then PARITY_STEPS decode steps fed with the eager
    # model's own greedy continuation, against the eager LM of the same quantization (and fp32 for the record).
    # One step alone is a noisy measure for a quantized LM (per position 12-31 dB for int8 SmolLM2).
    method = load_method(path)
    with torch.inference_mode():
        steps = min(PARITY_STEPS, max_seq_len - ids.shape[1] - 1)
        pad = decoder.tokenizer.pad_token_id if decoder.tokenizer.pad_token_id is not None else 0
        cont = qlm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                            do_sample=False, num_beams=1, pad_token_id=pad)[:, ids.shape[1]:]
        full = torch.cat([ids, cont], 1)
        n = ids.shape[1]
        ref = qlm(input_ids=full).logits[0, n - 1:]
        fp32 = None
        if quant != "none":
            f = lm(input_ids=full).logits[0, n - 1:]
            fp32 = {"prefill_logits": f[:1], "decode_logits": f[1:]}
    step_len = n if prefill == "dynamic" else 1
    for i in range(0, n, step_len):
        first = method.execute([ids[:, i:i + step_len], pos[i:i + step_len]])[0]
    rows = [first.reshape(1, -1)]
    for j, tok in enumerate(cont[0].tolist()):
        rows.append(method.execute([torch.tensor([[tok]]), torch.tensor([n + j])])[0].reshape(1, -1))
    got = torch.cat(rows)
    par = parity({"prefill_logits": ref[:1], "decode_logits": ref[1:]},
                 {"prefill_logits": got[:1], "decode_logits": got[1:]}, quant != "none", fp32=fp32)
    par["decode_steps"] = int(cont.shape[1])
    eos = lm.generation_config.eos_token_id
    side = _sidecar(path, report, name=name, model=model or type(lm).__name__, module="decoder", quant=quant,
                    inputs={"input_ids": {"shape": [1, "L"], "dtype": "int64"},
                            "cache_position": {"shape": ["L"], "dtype": "int64"}},
                    outputs={"logits": {"shape": [1, 1, int(got.shape[-1])], "dtype": "float32"}},
                    example_prompt_tokens=n, prefill=prefill, max_seq_len=max_seq_len,
                    max_prefill=max_seq_len - 1 if prefill == "dynamic" else 1, batch=1, beams="greedy only",
                    eos_token_id=eos, pad_token_id=decoder.tokenizer.pad_token_id, stop_at_eos=decoder.stop_at_eos,
                    parity=par, program_kind="static-cache", export_seconds=round(seconds, 2))
    return ExportResult(path, side, report, par, seconds)
