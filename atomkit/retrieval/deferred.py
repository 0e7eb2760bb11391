"""Captions that follow the index: search-first indexing, then the decoder where the queries point.

``update(session, lib, paths, search_first=True)`` runs only the frames and the encoder over new videos and stores
each clip with its concepts, the caption ``PENDING`` and the embedding of its concepts alone (a dual-encoder
spec: its retriever's vector, which is final), so the library answers queries once the encoder has passed.
``caption_pending`` then captions the waiting clips from their stored concepts (no video is read again) and lands
each clip's caption, with its fused embedding, in a transaction of its own: a process killed in between loses
only the group in flight, and the next run carries on with what is still pending.

Only specs whose decoder captions from the concepts alone (``ModelSpec.concept_captions``: the concept bridge)
index search-first; the others caption in one pass. Groups are a video's clips in caption batches (windows
0-3, 4-7, ...), the grouping the one-pass index uses, so a caption that lands later is the caption a one-pass
index writes (tests/test_serve.py compares them). Order: a group holding a clip that a recent query ranked
high goes first (``prefer``), then the library's order.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from atomkit.retrieval.library import Library, config_of


def supported(session) -> bool:
    """Whether the session's captions can follow its index (its decoder reads concepts, not frames)."""
    return bool(session.spec.concept_captions)


def groups(lib: Library, config_id: int, batch: int) -> list[list[tuple]]:
    """The pending clips as caption groups: (clip id, video path, idx, concepts) rows, a video's windows in
    batches of ``batch`` by window number."""
    out: dict[tuple, list] = {}
    for row in lib.pending(config_id):
        out.setdefault((str(row[1]), row[2] // batch), []).append(row)
    return list(out.values())


def caption_pending(session, lib: Library, *, prefer: Callable[[], set] | None = None,
                    cancel: threading.Event | None = None, limit: int | None = None,
                    on_group: Callable[[int, int], None] | None = None) -> int:
    """Caption the library's pending clips of the session's configuration; the number captioned.

    ``prefer()`` gives (video path, window) pairs to caption first (asked before every group, so new queries
    count at once); ``cancel`` stops after the group in flight; ``limit`` stops after that many clips;
    ``on_group(captioned so far, still pending)`` follows each group."""
    from atomkit.models.encoder import Encoded
    from atomkit.media.video import Clip
    from atomkit.pipeline.tasks import CaptionedClip
    from atomkit.retrieval.ranking import clip_vectors

    cfg = lib.config_id(config_of(session))
    if cfg is None:
        return 0
    done = 0
    while not (cancel is not None and cancel.is_set()) and (limit is None or done < limit):
        todo = groups(lib, cfg, session.decode.caption_batch)
        if not todo:
            break
        wanted = prefer() if prefer else set()
        group = next((g for g in todo if any((str(p), i) in wanted for _, p, i, _ in g)), todo[0])
        encs = [Encoded(torch.zeros(0), list(concepts)) for *_, concepts in group]
        with session.use("decoder") as dec:
            texts = dec.captions(encs, session.decode)
        if session.spec.retriever is not None:  # it ranks on the retriever's vectors, stored with the concepts
            vectors = [None] * len(group)
        else:
            clips = [CaptionedClip(Clip(Path(p), i, 0.0, 0.0), t, list(c)) for (_, p, i, c), t in zip(group, texts)]
            with session.use("embedder") as emb:
                vectors = list(clip_vectors(emb, clips).numpy().astype(np.float32))
        for (clip_id, *_), text, vec in zip(group, texts, vectors):
            done += lib.set_caption(clip_id, text, vec)  # one transaction per clip
        if on_group:
            on_group(done, sum(map(len, todo)) - len(group))
    return done


class Follower:
    """Captions that follow, on a thread: ``caption_pending`` over a library until nothing is pending.

    ``atomkit serve`` keeps one per (library, session) it indexed or queried with pending clips; ``prefer`` is
    where the recent queries pointed. ``stop()`` ends it after the group in flight."""

    def __init__(self, session, db: str | Path, prefer: Callable[[], set] | None = None, log=None,
                 on_done: Callable[[], None] | None = None):
        self.session, self.db, self.prefer, self.log, self.on_done = session, Path(db), prefer, log, on_done
        self.cancel = threading.Event()
        self.captioned, self.pending, self.error = 0, None, None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, name=f"atomkit-captions-{self.db.name}", daemon=True)

    def start(self) -> "Follower":
        self.thread.start()
        return self

    def _run(self) -> None:
        def note(done, left):
            self.captioned, self.pending = done, left

        try:
            with Library(self.db) as lib:
                self.captioned = caption_pending(self.session, lib, prefer=self.prefer, cancel=self.cancel,
                                                 on_group=note)
                cfg = lib.config_id(config_of(self.session))
                self.pending = len(lib.pending(cfg)) if cfg is not None else 0
        except Exception as e:  # reported in the status; the clips stay pending for the next run
            self.error = f"{type(e).__name__}: {e}"
            if self.log:
                print(f"atomkit serve: captions for {self.db} stopped: {self.error}", file=self.log, flush=True)
        finally:
            if self.on_done:
                self.on_done()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        self.cancel.set()
        self.thread.join(timeout)

    def status(self) -> dict:
        return {"library": str(self.db), "running": self.running, "captioned": self.captioned,
                "pending": self.pending, "seconds": round(time.monotonic() - self.started, 1), "error": self.error}
