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

from dataclasses import replace
from pathlib import Path

import torch

from atomkit.evaluation.annotations import Annotations
from atomkit.errors import InputError
from atomkit.models.concepts import grounding_table
from atomkit.models.encoder import Encoded
from atomkit.evaluation.metrics import caption_scores, rank_of_first_relevant, recall_table  # noqa: F401 (API)


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
                    f"broader word; of {g['captions']} captions {g['captions_with_invented_object']} name something "
                    f"else, {g['captions_with_unsupported_word']} add a word nothing seen supports, "
                    f"{g['captions_with_number']} contain a number; {g['captions_grounded']} pass every check")
    if result["dropped_queries"]:
        rows.append(f"({result['dropped_queries']} queries dropped: none of their videos is indexed)")
    rows += _extra_rows(result)
    for part, r in (result.get("parts") or {}).items():
        rows.append(f"-- {part} part: {r['queries']} queries, {r['videos']} videos: video R@1 {r['video']['r1']:.3f} "
                    f"R@5 {r['video']['r5']:.3f} MnR {r['video']['mean_rank']:.2f}")
        rows += ["  " + line for line in _extra_rows(r)]
    return "\n".join(rows)


def _extra_rows(result: dict) -> list[str]:
    rows = [f"ranked on {v:37s} R@1 {r['video']['r1']:.3f} R@5 {r['video']['r5']:.3f} MdR {r['video']['median_rank']:.1f}"
            for v, r in (result.get("views") or {}).items()]
    m = result.get("moments")
    if m:
        rows.append(f"moments ({m['queries']} queries): clip R@1 {m['clip']['r1']:.3f} R@5 {m['clip']['r5']:.3f} "
                    f"(right clip: tIoU >= {m['right_iou']}), top clip in the right video {m['top_clip_in_right_video']:.3f}, "
                    f"mean tIoU of the video's best clip {m['mean_tiou_best_clip']:.3f}")
    return rows


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


def whole_frame_tags(session, captions) -> tuple[dict[str, list], dict[str, list] | None]:
    """Each clip's frames resized whole to the encoder's input (no crop): the classifier's concepts alone, and, for
    an encoder with a detector, both sources' ({clip id: concepts}, {clip id: concepts} or None)."""
    from atomkit.media.video import sample_frames
    from atomkit.models.detector import merge

    alone, both = {}, {}
    for c in captions.clips:
        frames = sample_frames(c.clip, session.window, fit="whole")
        with session.use("encoder") as enc:
            concepts = enc.encode(frames, detect=False).concepts
            alone[c.id] = concepts
            if enc.detector is not None:
                both[c.id] = merge(enc.detector.concepts(frames), concepts, enc.top_concepts)
    return alone, both or None


BASELINE = "whole-frame tags (baseline)"  # the classifier's top-5 ImageNet labels as plain text
BASELINE_DETECTOR = "whole-frame tags + detector"  # the top 5 of the classifier's and the detector's concepts
NO_DETECTOR = "caption + concepts + concept vector, no detector"  # what retrieve ranks, made without the detector


def baseline(session, captions, annotations: Annotations) -> dict:
    """Retrieval of the same clips ranked on plain tags (``BASELINE``; ``BASELINE_DETECTOR``) and, for an encoder
    with a detector, on what ``retrieve`` ranks when the captions and concepts are made without it (``NO_DETECTOR``):
    the detector's contribution. {view: result}."""
    from atomkit.pipeline.tasks import CaptionedClip, Index
    from atomkit.retrieval.ranking import clip_vectors

    alone, both = whole_frame_tags(session, captions)
    out = {}
    for name, concepts in ((BASELINE, alone), (BASELINE_DETECTOR, both)):
        if concepts is not None:
            tags = {k: _concept_text(v[:5]) for k, v in concepts.items()}
            r = evaluate(session, _text_index(session, captions, [tags[c.id] for c in captions.clips]), annotations,
                         captions=False)
            out[name] = {"video": r["video"], "clip": r["clip"], "tags": tags}
    if both is not None:
        encs = [Encoded(torch.zeros(0), alone[c.id]) for c in captions.clips]
        with session.use("decoder") as dec:
            texts = dec.captions(encs, session.decode)
        clips = [CaptionedClip(c.clip, t, alone[c.id]) for c, t in zip(captions.clips, texts)]
        with session.use("embedder") as emb:
            idx = Index(replace(captions, clips=clips), clip_vectors(emb, clips))
        r = evaluate(session, idx, annotations, captions=False)
        out[NO_DETECTOR] = {"video": r["video"], "clip": r["clip"], "grounding": r["grounding"]}
    return out


def subset(index, stems: set[str]):
    """The same index with only the clips of the videos ``stems``."""
    from atomkit.pipeline.tasks import Index

    keep = [i for i, c in enumerate(index.captions.clips) if Path(c.clip.video).stem in stems]
    return Index(replace(index.captions, clips=[index.captions.clips[i] for i in keep]), index.vectors[keep], index.space)


def report(session, index, annotations: Annotations, *, views: bool = False, meteor: bool = True,
           by_part: bool = True) -> dict:
    """Everything ``atomkit eval`` reports on one index: retrieval of the whole-video queries (``evaluate``), the
    views and baselines (``views=True``), the moment queries (``atomkit.evaluation.moments``) over the clips of
    their long videos, and the same for each part of a set that has parts (``tuning``, ``test``), each over the
    videos of its own queries."""
    from atomkit.evaluation.moments import evaluate_moments

    moments = annotations.only(moments=True)
    whole = annotations.only(moments=False)
    if not whole.queries:  # every query has a moment (DiDeMo): the video level scores them all as well
        whole = annotations
    result = evaluate(session, index, whole, meteor=meteor)
    if views:
        result["views"] = ablation(session, index.captions, whole) | baseline(session, index.captions, whole)
    long = subset(index, {v for q in moments.queries for v in q.relevant})
    if long.captions.clips:
        result["moments"] = evaluate_moments(session, long, moments)
    if by_part and annotations.parts():
        result["parts"] = {}
        for part in annotations.parts():
            mine = annotations.only(part=part)
            videos = subset(index, {v for q in mine.queries for v in q.relevant})
            if videos.captions.clips:  # a part none of whose videos was indexed is left out
                result["parts"][part] = report(session, videos, mine, views=views, meteor=meteor, by_part=False)
    return result
