"""What a clip is ranked on: its caption's embedding fused with embeddings of everything the encoder saw.

A caption names a few things; the encoder's concepts carry more (the top ``top_concepts`` classes and how
sure it is of each). A clip's retrieval vector is the unit sum of three unit vectors:

* the caption's embedding;
* the embedding of its concepts' names as one text ("maze, window screen, racket, ...");
* a concept vector after ConSE (Norouzi et al., ICLR 2014): the probability-weighted sum of the embeddings
  of "a photo of a <class>" over the clip's concepts, so a class the encoder is sure of weighs more.

A query can so match the words of the caption or a class the encoder half-saw. A clip without concepts
(visual-prefix models) is ranked on its caption alone; a clip not captioned yet (``PENDING``, search-first
indexing) on its concepts alone, until its caption lands. Measured on the development set in
``results/quality-default.json`` ("views": each part alone, and the baseline).

Class embeddings are computed once per embedder and kept with it (they are the same for every clip).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

RANKING = "caption+concepts+concept-vector/1"  # stored in the library's settings: vectors of another ranking are recomputed
CONCEPT_TEMPLATE = "a photo of {}"


def _label_vectors(emb, labels: list[str]) -> dict[str, torch.Tensor]:
    from atomkit.models.concepts import with_article

    cache = emb.__dict__.setdefault("_atomkit_label_vectors", {})
    new = sorted({l for l in labels if l not in cache})
    if new:
        for label, v in zip(new, emb.embed([CONCEPT_TEMPLATE.format(with_article(l)) for l in new])):
            cache[label] = v
    return cache


def concept_vectors(emb, concept_lists: Sequence) -> torch.Tensor:
    """(N, D) probability-weighted class embeddings, unit length (zero rows for clips without concepts)."""
    labels = [str(l) for cs in concept_lists for l, _ in cs]
    table = _label_vectors(emb, labels) if labels else {}
    dim = next(iter(table.values())).shape[0] if table else None
    rows = []
    for cs in concept_lists:
        if not cs:
            rows.append(None)
            continue
        rows.append(sum(float(p) * table[str(l)] for l, p in cs))
    if dim is None:
        return torch.zeros(len(rows), 0)
    return torch.stack([F.normalize(r, dim=0) if r is not None else torch.zeros(dim) for r in rows])


def concept_names(concepts) -> str:
    """The concepts' names as one text, most likely first (the first name of each ImageNet class)."""
    return ", ".join(str(label).split(",")[0] for label, _ in concepts)


def clip_vectors(emb, clips) -> torch.Tensor:
    """(N, D) unit retrieval vectors of captioned clips (``CaptionedClip``s): caption + names + concept vector."""
    if not clips:
        return emb.embed([])
    from atomkit.config import PENDING

    captioned = [i for i, c in enumerate(clips) if c.caption != PENDING]  # the others: their concepts alone
    caps = torch.zeros(len(clips), emb.dim)
    if captioned:
        caps[captioned] = F.normalize(emb.embed([clips[i].caption for i in captioned]), dim=-1)
    seen = [i for i, c in enumerate(clips) if c.concepts]
    if not seen:
        return caps
    names = F.normalize(emb.embed([concept_names(clips[i].concepts) for i in seen]), dim=-1)
    vectors = concept_vectors(emb, [clips[i].concepts for i in seen])
    out = caps.clone()
    out[seen] = F.normalize(caps[seen] + names + vectors, dim=-1)
    return out
