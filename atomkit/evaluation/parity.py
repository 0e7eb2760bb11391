"""Verify a transformed pipeline (quantized, exported) against fp32 eager, by numbers.

Per module: bytes of Linear/Embedding weights before and after, and output SQNR on real inputs (the
encoder on real frames, the decoder's logits on a real caption prompt, the embedder on real captions).
For the pipeline: captions of the transformed pipeline scored against the fp32 captions (BLEU-4,
CIDEr, share identical) and retrieval rank agreement for a few queries.
"""
from __future__ import annotations

import math

import torch

from atomkit.evaluation.metrics import caption_agreement, rank_agreement
from atomkit.deploy.quant import sqnr_db, weight_bytes
from atomkit.pipeline.tasks import Captions, caption, index, retrieve
from atomkit.media.video import clips as cut_clips, sample_frames

QUERIES = ["a man wearing a tie", "an animal outdoors", "people riding bikes"]


@torch.inference_mode()
def module_outputs(session, frames: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
    """Every module's outputs on the same real inputs."""
    with session.use("encoder") as enc:
        out = enc(enc.preprocess(frames))
        # the last output: class probabilities for EfficientNet (its quantized Linear feeds them; its
        # pooled features come from convolutions, which the paper's scheme leaves in float), else features
        features = (out[-1] if isinstance(out, tuple) else out).float()
    with session.use("decoder") as dec:
        prompt = dec.render([{"role": "user", "content": "Describe a clip: " + captions[0]}])
        logits = dec.lm(input_ids=dec._ids(prompt)).logits.float()
    with session.use("embedder") as emb:
        vectors = emb.embed(captions)
    out = {"encoder": features, "decoder": logits, "embedder": vectors}
    if session.spec.retriever is not None:  # its frame vectors and its caption vectors, side by side
        with session.use("retriever") as ret:
            out["retriever"] = torch.cat([ret.frame_vectors(frames), ret.embed(captions)])
    return out


def compare_modules(ref, test, frames: torch.Tensor, captions: list[str]) -> dict:
    """Bytes and SQNR of each module of ``test`` against ``ref`` (two Sessions of the same model)."""
    a, b = module_outputs(ref, frames, captions), module_outputs(test, frames, captions)
    out = {}
    for m in ref.spec.modules:
        wa, wb = weight_bytes(ref.get(m)), weight_bytes(test.get(m))
        la, lb = wa["linear"] + wa["embedding"], wb["linear"] + wb["embedding"]
        out[m] = {"bytes_fp32": wa["total"], "bytes": wb["total"],
                  "linear_embedding_bytes_fp32": la, "linear_embedding_bytes": lb,
                  "linear_embedding_ratio": round(lb / la, 4) if la else None,
                  "sqnr_db": _finite(sqnr_db(a[m], b[m]))}
    return out


def _finite(x: float) -> float | None:
    """JSON has no infinity: identical outputs (infinite SQNR) are written as null."""
    return round(x, 2) if math.isfinite(x) else None


def compare_pipelines(ref, test, ref_caps: Captions, test_caps: Captions, k: int = 3) -> dict:
    """Captions of ``test`` against those of ``ref``; retrieval rank agreement over QUERIES."""
    refs = {c.id: c.caption for c in ref_caps.clips}
    cands = {c.id: c.caption for c in test_caps.clips}
    shared = sorted(set(refs) & set(cands))
    agreement = caption_agreement({i: refs[i] for i in shared}, {i: cands[i] for i in shared})
    ia, ib = index(ref, ref_caps), index(test, test_caps)
    ranks = {}
    for q in QUERIES:
        ra = [h.clip.id for h in retrieve(ref, ia, q, k=len(shared))]
        rb = [h.clip.id for h in retrieve(test, ib, q, k=len(shared))]
        ranks[q] = rank_agreement(ra, rb, k=min(k, len(shared)))
    return {"captions": agreement, "retrieval": ranks,
            "examples": [{"id": i, "fp32": refs[i], "test": cands[i]} for i in shared[:4]]}


def quant_report(model: str, scheme: str, videos, *, decode=None, device: str = "cpu", progress: bool = False) -> dict:
    """Everything issue-style reviewers ask of a quantization scheme, for one model, in one dict."""
    from atomkit.pipeline.session import Session

    from atomkit.config import exact

    with Session(model, device=device, decode=exact(decode)) as ref, \
            Session(model, device=device, decode=decode, quant=scheme) as test:
        ref_caps = caption(ref, videos, progress=progress)
        test_caps = caption(test, videos, progress=progress)
        frames = sample_frames(cut_clips(ref_caps.clips[0].clip.video, ref.window)[0], ref.window)
        texts = [c.caption for c in ref_caps.clips] or ["a video clip"]
        return {"model": model, "scheme": scheme,
                "modules": compare_modules(ref, test, frames, texts),
                "pipeline": compare_pipelines(ref, test, ref_caps, test_caps),
                "skipped": [s.to_dict() for s in ref_caps.skipped]}
