"""Moments inside long videos: a query describes a stretch of one video (``Query.moment``: start and end seconds,
as DiDeMo annotates them), and a person wants the clip that shows it.

Each moment query ranks the clips of the long videos (what ``retrieve`` would show) and is scored at clip level:
a clip is *right* when it belongs to the query's video and its temporal IoU with the moment is at least
``RIGHT_IOU`` (where no clip of the video reaches it, the clips that overlap the moment most are right). Reported:
clip R@1/5/10 and ranks (ties counted against the right clip, as in ``atomkit.evaluation.quality``), the share of
queries whose top clip is in the right video at all, and the mean temporal IoU between the moment and the
best-scoring clip of its video (how well the ranking places the moment inside the video).
"""
from __future__ import annotations

from pathlib import Path

import torch

from atomkit.errors import InputError
from atomkit.evaluation.metrics import rank_of_first_relevant, recall_table

RIGHT_IOU = 0.5


def tiou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal intersection over union of two (start, end) ranges in seconds."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def evaluate_moments(session, index, annotations) -> dict:
    """Clip-level scores of the moment queries of ``annotations`` over ``index`` (see the module docstring)."""
    queries = [q for q in annotations.queries if q.moment is not None]
    clips = index.captions.clips
    stems = [Path(c.clip.video).stem for c in clips]
    queries = [q for q in queries if next(iter(q.relevant)) in stems]
    if not queries:
        raise InputError("no moment query has its video among the indexed clips")
    scores = index.scores(session, [q.text for q in queries])
    ranks, ious, in_video, per_query = [], [], 0, []
    for i, q in enumerate(queries):
        video = next(iter(q.relevant))
        mine = torch.tensor([s == video for s in stems])
        overlap = torch.tensor([tiou((c.clip.start_s, c.clip.end_s), q.moment) if s == video else 0.0
                                for c, s in zip(clips, stems)])
        right = overlap >= RIGHT_IOU
        if not bool(right.any()):  # a moment shorter than half a clip: the clips that overlap it most
            right = mine & (overlap == overlap.max()) & (overlap > 0)
        rank = rank_of_first_relevant(scores[i], right)
        best = int(torch.where(mine, scores[i], torch.full_like(scores[i], -float("inf"))).argmax())
        top = int(scores[i].argmax())
        ranks.append(rank)
        ious.append(float(overlap[best]))
        in_video += stems[top] == video
        per_query.append({"q": q.text, "video": video, "moment": list(q.moment), "clip_rank": rank,
                          "best_clip_in_video": clips[best].id, "best_clip_tiou": round(float(overlap[best]), 3),
                          "top_clip": clips[top].id})
    return {"queries": len(queries), "right_iou": RIGHT_IOU, "clip": recall_table(ranks),
            "mean_tiou_best_clip": sum(ious) / len(ious), "top_clip_in_right_video": in_video / len(queries),
            "per_query": per_query}
