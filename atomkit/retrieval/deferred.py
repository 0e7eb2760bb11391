"""Captions that follow the index: a first look makes a library searchable at once, the full pass follows.

``update(session, lib, paths, search_first=True)`` gives each new clip a **glance**: one frame (the keyframe nearest
before the middle, ``atomkit.media.video.glance_frame``)
through the encoder's classifier and, where the spec has one, its retriever, no detector and no decoder. The clips
are stored with those concepts, the caption ``PENDING`` and the embedding of the concepts alone (a dual-encoder
spec: the retriever's vector of that frame), so the library answers queries after about a tenth of the work.
``caption_pending`` then gives the waiting clips the **full pass** (six frames, classifier and detector, decoder,
embedding: exactly what a one-pass index does) and lands each clip, caption, concepts and embedding, in a
transaction of its own: a process killed in between loses only the group in flight, and the next run carries
on with what is still pending.

Groups are a video's clips in caption batches (windows 0-3, 4-7, ...), the grouping the one-pass index uses, so
what lands is what a one-pass index writes (the tests compare them). Order: a group holding a clip that a recent
query ranked high goes first (``prefer``), then the library's order. Specs whose encoder names no concepts
(visual-prefix models) have nothing to search on after a glance; they index in one pass.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from atomkit.retrieval.library import Library, config_of


def supported(session) -> bool:
    """Whether a glance gives the session something to search on (its encoder names concepts)."""
    return bool(session.spec.concept_captions)


def pending_count(session, lib: Library) -> int:
    """How many of the library's clips of the session's configuration still wait for their caption."""
    cfg = lib.config_id(config_of(session))
    return len(lib.pending(cfg)) if cfg is not None else 0


def groups(lib: Library, config_id: int, batch: int) -> list[list[tuple]]:
    """The pending clips as caption groups: (clip id, video path, idx, start, end) rows, a video's windows in
    batches of ``batch`` by window number."""
    out: dict[tuple, list] = {}
    for row in lib.pending(config_id):
        out.setdefault((str(row[1]), row[2] // batch), []).append(row)
    return list(out.values())


def caption_pending(session, lib: Library, *, prefer: Callable[[], set] | None = None,
                    cancel: threading.Event | None = None, limit: int | None = None,
                    on_group: Callable[[int, int], None] | None = None) -> int:
    """Give the library's pending clips of the session's configuration their full pass; the number landed.

    ``prefer()`` gives (video path, window) pairs to do first (asked before every group, so new queries count
    at once); ``cancel`` stops after the group in flight; ``limit`` stops after that many clips;
    ``on_group(landed so far, still pending)`` follows each group. A clip whose frames cannot be read now stays
    pending (reported by the caller's next run)."""
    from atomkit.media.video import Clip
    from atomkit.pipeline.tasks import caption_clips, index

    cfg = lib.config_id(config_of(session))
    if cfg is None:
        return 0
    done, failed = 0, set()
    while not (cancel is not None and cancel.is_set()) and (limit is None or done < limit):
        todo = [g for g in groups(lib, cfg, session.decode.caption_batch) if not failed.issuperset(r[0] for r in g)]
        if not todo:
            break
        wanted = prefer() if prefer else set()
        group = next((g for g in todo if any((str(r[1]), r[2]) in wanted for r in g)), todo[0])
        by_clip = {(str(p), i): cid for cid, p, i, _, _ in group}
        caps = caption_clips(session, [Clip(Path(p), i, a, b) for _, p, i, a, b in group])
        vectors = index(session, caps).vectors.numpy().astype(np.float32) if caps.clips else []
        landed = set()
        for c, vec in zip(caps.clips, vectors):
            cid = by_clip[(str(c.clip.video), c.clip.index)]
            done += lib.set_clip(cid, c.caption, [list(x) for x in c.concepts], vec)  # one transaction per clip
            landed.add(cid)
        failed |= {cid for cid, *_ in group} - landed
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
                self.pending = pending_count(self.session, lib)
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
