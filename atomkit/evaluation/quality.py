"""Result quality, measured: text-to-video retrieval (R@1/5/10, median and mean rank; video- and clip-level)
and caption metrics (BLEU-4, METEOR, ROUGE-L, CIDEr) against an annotation file (``atomkit.evaluation.annotations``).

Retrieval ranks every clip of the index by cosine between the query and the clip's vector (caption fused with
concepts, ``atomkit.retrieval.ranking``: what ``retrieve`` does). Video-level: a video scores its best clip. A query's
rank is that of its best-ranked relevant item, counted pessimistically on ties (a relevant item tied with
irrelevant ones ranks after them), so a model that gives every input the same text scores as badly as it should.

Captions: a video's caption is that of its clip nearest the video's middle (one caption per video, as the
datasets' references describe whole videos).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from atomkit.evaluation.annotations import Annotations
from atomkit.errors import InputError
from atomkit.models.concepts import grounding_table
from atomkit.evaluation.metrics import caption_scores


def rank_of_first_relevant(scores: torch.Tensor, relevant: torch.Tensor) -> int:
    """1 + items scoring above the best relevant item + irrelevant items tied with it (pessimistic ties)."""
    if not bool(relevant.any()):
        raise InputError("no relevant item to rank")
    best = scores[relevant].max()
    return int((scores > best).sum()) + int(((scores == best) & ~relevant).sum()) + 1


def recall_table(ranks: list[int]) -> dict:
    """R@1/5/10 (shares of queries whose first relevant item ranks within k), median and mean rank."""
    n = len(ranks)
    if n == 0:
        return {"n": 0, "r1": None, "r5": None, "r10": None, "median_rank": None, "mean_rank": None}
    return {"n": n, **{f"r{k}": sum(r <= k for r in ranks) / n for k in (1, 5, 10)},
            "median_rank": float(statistics.median(ranks)), "mean_rank": sum(ranks) / n}


def evaluate(session, index, annotations: Annotations, *, captions: bool = True, meteor: bool = True) -> dict:
    """Score ``index`` (an ``Index``: captions + embeddings, from a library or ``tasks.index``) on ``annotations``.

    Queries whose relevant videos are all missing from the index are dropped and counted; the result says
    how many queries and videos were scored."""
    clips = index.captions.clips
    if not clips:
        raise InputError("nothing to evaluate: the index has no clips")
    stems = [Path(c.clip.video).stem for c in clips]
    videos = sorted(set(stems))
    ann = annotations.restricted_to(set(videos))
    dropped = len(annotations.queries) - len(ann.queries)
    if not ann.queries:
        raise InputError(f"none of the {len(annotations.queries)} queries has a relevant video among the "
                         f"{len(videos)} indexed ({', '.join(videos[:5])}{', ...' if len(videos) > 5 else ''}); "
                         "annotation video ids are matched to file stems")
    scores = index.scores(session, [x.text for x in ann.queries])  # (queries, clips)
    position = {v: i for i, v in enumerate(videos)}
    clip_video = torch.tensor([position[s] for s in stems])
    video_scores = torch.full((len(ann.queries), len(videos)), -float("inf")).scatter_reduce(
        1, clip_video.expand(len(ann.queries), -1), scores, reduce="amax")
    per_query, clip_ranks, video_ranks = [], [], []
    for i, query in enumerate(ann.queries):
        rel_videos = torch.tensor([v in query.relevant for v in videos])
        rel_clips = rel_videos[clip_video]
        cr = rank_of_first_relevant(scores[i], rel_clips)
        vr = rank_of_first_relevant(video_scores[i], rel_videos)
        clip_ranks.append(cr)
        video_ranks.append(vr)
        top = int(scores[i].argmax())
        per_query.append({"q": query.text, "relevant": sorted(query.relevant), "video_rank": vr, "clip_rank": cr,
                          "top_clip": clips[top].id, "top_caption": clips[top].caption})
    result = {"queries": len(ann.queries), "dropped_queries": dropped, "videos": len(videos), "clips": len(clips),
              "video": recall_table(video_ranks), "clip": recall_table(clip_ranks), "per_query": per_query,
              "ties": "pessimistic", "captions": None,
              "grounding": grounding_table((c.caption, c.concepts) for c in clips)}
    refs = {v: ann.references[v] for v in videos if ann.references.get(v)}
    if captions and refs:
        chosen = {}
        for c, s in zip(clips, stems):
            if s in refs:
                chosen.setdefault(s, []).append(c)
        cands = {}
        for s, cs in chosen.items():
            end = max(c.clip.end_s for c in cs)
            cands[s] = min(cs, key=lambda c: abs((c.clip.start_s + c.clip.end_s) / 2 - end / 2)).caption
        result["captions"] = caption_scores(refs, cands, meteor=meteor) | {"videos": sorted(refs)}
    return result


def table(result: dict) -> str:
    """The result as a small text table (what ``atomkit eval`` prints)."""
    rows = [f"{'level':6s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'MdR':>6s} {'MnR':>7s}  (n={result['queries']} queries, "
            f"{result['videos']} videos, {result['clips']} clips)"]
    for level in ("video", "clip"):
        m = result[level]
        rows.append(f"{level:6s} {m['r1']:6.3f} {m['r5']:6.3f} {m['r10']:6.3f} {m['median_rank']:6.1f} {m['mean_rank']:7.2f}")
    c = result.get("captions")
    if c:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(f"captions ({c['n']} videos): BLEU-4 {fmt(c['bleu4'])}  METEOR {fmt(c['meteor'])}  "
                    f"ROUGE-L {fmt(c['rouge_l'])}  CIDEr {fmt(c['cider'])}")
    g = result.get("grounding")
    if g and g["object_words"]:
        rows.append(f"grounding: {g['grounded_share']:.3f} of {g['object_words']} object words name a concept or a "
                    f"broader word; {g['captions_with_invented_object']} of {g['captions']} captions name something "
                    f"else, {g['captions_with_number']} contain a number")
    if result["dropped_queries"]:
        rows.append(f"({result['dropped_queries']} queries dropped: none of their videos is indexed)")
    return "\n".join(rows)


# the paper's bound on what quantization may cost (ATOM, Tables 1-2): R@1 in points of percent, CIDEr in points
PAPER_BOUND = {"r1_points": 2.3, "cider_points": 1.5}


def delta(reference: dict, other: dict) -> dict:
    """What ``other`` (e.g. int8) lost against ``reference`` (fp32), in points (x100), and whether that
    stays within the paper's bound (at most 2.3 R@1 and 1.5 CIDEr points lost)."""
    out = {"video_r1_points": 100 * (other["video"]["r1"] - reference["video"]["r1"]),
           "clip_r1_points": 100 * (other["clip"]["r1"] - reference["clip"]["r1"]),
           "video_r5_points": 100 * (other["video"]["r5"] - reference["video"]["r5"]), "cider_points": None}
    rc, oc = reference.get("captions"), other.get("captions")
    if rc and oc and rc["cider"] is not None and oc["cider"] is not None:
        out["cider_points"] = 100 * (oc["cider"] - rc["cider"])
    out["within_paper_bound"] = (out["video_r1_points"] >= -PAPER_BOUND["r1_points"]
                                 and (out["cider_points"] is None or out["cider_points"] >= -PAPER_BOUND["cider_points"]))
    out["paper_bound"] = PAPER_BOUND
    return out


# -- what the ranking reads: an ablation over the text each clip is embedded as ---------------------------
def _concept_text(concepts) -> str:
    from atomkit.retrieval.ranking import concept_names

    return concept_names(concepts) or "nothing recognisable"


VIEWS = {
    "caption": lambda c: c.caption,  # the caption's words alone
    "concepts": lambda c: _concept_text(c.concepts[:5]),  # the encoder's top-5 ImageNet labels alone
    "caption+concepts": lambda c: f"{c.caption} {_concept_text(c.concepts[:5])}",  # one text
}
VECTOR_VIEWS = ("concept vector", "caption + concepts + concept vector")  # atomkit.retrieval.ranking; the second is what
# retrieve ranks (the same as the main result)


def _text_index(session, captions, texts: list[str]):
    """An ``Index`` of ``captions``' clips embedded as ``texts`` (one per clip) instead of their captions."""
    from atomkit.pipeline.tasks import Index

    with session.use("embedder") as emb:
        return Index(captions, emb.embed(texts))


def view_index(session, captions, view: str):
    """An ``Index`` of the same clips ranked on another view (``VIEWS`` texts or ``VECTOR_VIEWS``)."""
    from atomkit.retrieval.ranking import clip_vectors, concept_vectors
    from atomkit.pipeline.tasks import Index

    if view == VECTOR_VIEWS[0]:
        with session.use("embedder") as emb:
            return Index(captions, concept_vectors(emb, [c.concepts for c in captions.clips]))
    if view == VECTOR_VIEWS[1]:
        with session.use("embedder") as emb:
            return Index(captions, clip_vectors(emb, captions.clips))
    if view not in VIEWS:
        raise InputError(f"unknown view {view!r}; one of {', '.join([*VIEWS, *VECTOR_VIEWS])}")
    return _text_index(session, captions, [VIEWS[view](c) for c in captions.clips])


DUAL_VIEWS = ("dual encoder (frames)", "fusion (dual encoder + caption, RRF)")  # specs with a retriever


class FusedIndex:
    """Several indexes of the same clips fused by reciprocal rank (Cormack et al., SIGIR 2009): a clip's score is
    the sum over the indexes of 1 / (k + its rank there), so scores of different spaces need no common scale."""

    def __init__(self, parts: list, k: int = 60):
        self.parts, self.k = parts, k
        self.captions = parts[0].captions

    def scores(self, session, texts) -> torch.Tensor:
        total = 0
        for part in self.parts:
            s = part.scores(session, texts)
            ranks = s.argsort(dim=1, descending=True).argsort(dim=1) + 1  # 1 = best, per query
            total = total + 1.0 / (self.k + ranks.float())
        return total


def dual_index(session, captions):
    """The clips ranked by the retriever: their pooled frame vectors (made when they were captioned)."""
    from atomkit.pipeline.tasks import index

    return index(session, captions)


def ablation(session, captions, annotations: Annotations, views=(*VIEWS, *VECTOR_VIEWS)) -> dict:
    """Retrieval of the same clips ranked on each view: {view: {"video": ..., "clip": ...}}. A spec with a retriever
    also ranks on the dual encoder alone and on its fusion with the captions' ranking (``DUAL_VIEWS``)."""
    out = {}
    indexes = {v: view_index(session, captions, v) for v in views}
    if session.spec.retriever is not None:
        indexes[DUAL_VIEWS[0]] = dual_index(session, captions)
        indexes[DUAL_VIEWS[1]] = FusedIndex([indexes[DUAL_VIEWS[0]], view_index(session, captions, VECTOR_VIEWS[1])])
    for v, idx in indexes.items():
        r = evaluate(session, idx, annotations, captions=False)
        out[v] = {"video": r["video"], "clip": r["clip"]}
    return out


def whole_frame_tags(session, captions) -> dict[str, str]:
    """The baseline of issue 14: each clip's frames resized whole to the encoder's input (no crop), the
    encoder's top-5 ImageNet labels as the clip's text. {clip id: text}."""
    from atomkit.media.video import sample_frames

    out = {}
    for c in captions.clips:
        frames = sample_frames(c.clip, session.window, fit="whole")
        with session.use("encoder") as enc:
            out[c.id] = _concept_text(enc.encode(frames).concepts[:5])
    return out


def baseline(session, captions, annotations: Annotations) -> dict:
    """Retrieval ranked on ``whole_frame_tags`` (the same clips, the same embedder)."""
    tags = whole_frame_tags(session, captions)
    r = evaluate(session, _text_index(session, captions, [tags[c.id] for c in captions.clips]), annotations,
                 captions=False)
    return {"video": r["video"], "clip": r["clip"], "tags": tags}
