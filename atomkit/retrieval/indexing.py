"""Incremental indexing into a ``Library``, and reading it back as an ``Index`` for retrieval.

``update(session, lib, paths)`` captions only what the library does not hold for the session's configuration:
a file whose path, size and mtime match a stored, finished video is skipped without being opened; a file
found under a new path with a known fingerprint keeps its clips (renamed or moved); an unreadable file is
recorded with its reason and retried only when it changes; each video's clips are committed in one
transaction. ``load_index(session, lib)`` builds the retrieval index from the stored embeddings, without the
video decoder, the encoder or the decoder.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from atomkit.config import PENDING
from atomkit.io import count
from atomkit.retrieval.library import Library, LibraryError, config_of, fingerprint
from atomkit.pipeline.tasks import CaptionedClip, Captions, Index, Skipped, caption, index
from atomkit.media.video import Clip, probe
from atomkit.media.scan import scan, unique_ids


@dataclass
class IndexReport:
    """What one ``update`` did."""

    captioned: list[str] = field(default_factory=list)  # videos captioned now
    cached: list[str] = field(default_factory=list)  # videos whose clips were already stored
    moved: list[tuple[str, str]] = field(default_factory=list)  # (old path, new path): found by fingerprint
    skipped: list[Skipped] = field(default_factory=list)  # unreadable inputs, with the reason
    failed: list[Skipped] = field(default_factory=list)  # work that failed (a worker died): not stored, retried next run
    pruned: list[str] = field(default_factory=list)  # stored videos whose files are gone (removed)
    clips_new: int = 0
    pending: int = 0  # clips stored with their concepts, captions to follow (search-first)
    videos: list[Path] = field(default_factory=list)  # every readable-looking video file found under the paths
    not_videos: int = 0  # files under the folders that are not videos (by suffix)
    cancelled: bool = False
    seconds: float = 0.0
    workers: dict | None = None  # the captioner's own account (Ray: actors, deaths, retries, videos per worker)

    def to_dict(self) -> dict:
        return {"captioned": self.captioned, "cached": self.cached, "moved": [list(m) for m in self.moved],
                "skipped": [s.to_dict() for s in self.skipped],
                "failed": [s.to_dict() for s in self.failed], "pruned": self.pruned, "clips_new": self.clips_new,
                "pending": self.pending,
                "not_videos": self.not_videos, "cancelled": self.cancelled, "seconds": round(self.seconds, 3),
                "workers": self.workers}

    def summary(self) -> str:
        verb = "indexed" if self.pending else "captioned"
        parts = [f"{verb} {count(len(self.captioned), 'video')} ({count(self.clips_new, 'clip')}"
                 + (f", {self.pending} captions to follow" if self.pending else "") + ")" if self.captioned
                 else "nothing to caption", f"{count(len(self.cached), 'video')} already in the library"]
        if self.moved:
            parts.append(f"{len(self.moved)} moved or renamed (clips kept)")
        if self.skipped:
            parts.append(f"{len(self.skipped)} unreadable")
        if self.failed:
            parts.append(f"{len(self.failed)} failed (tried again on the next run)")
        if self.pruned:
            parts.append(f"{len(self.pruned)} gone from disk, removed")
        if self.not_videos:
            parts.append(f"{count(self.not_videos, 'other file')} {'was not a video' if self.not_videos == 1 else 'were not videos'}")
        return "; ".join(parts) + f" in {self.seconds:.1f} s" + (" (cancelled)" if self.cancelled else "")


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def update(session, lib: Library, paths: Iterable[str | Path], *, progress: bool = False, prune: bool = True,
           on_progress: Callable[[int, int], None] | None = None, cancel: threading.Event | None = None,
           captioner=None, search_first: bool = False) -> IndexReport:
    """Bring the library up to date with ``paths`` (files and folders) for the session's configuration.

    The videos to caption go to ``captioner`` (default: ``LocalCaptioner(session)``, this process; a
    ``atomkit.retrieval.cluster.RayCaptioner`` spreads them over a Ray cluster); results are stored as they arrive.

    Stored videos under a scanned folder whose files no longer exist are removed when ``prune`` (their
    clips with them); a moved file is found again first. Progress counts videos (done / to do).

    ``search_first``: a first look at each clip (one frame, no decoder) is stored, captions pending
    (``atomkit.retrieval.deferred``: searchable at once; ``caption_pending`` lands the full pass)."""
    if not lib.writable:
        raise LibraryError(f"{lib.path} was opened for reading: open it with Library(path) to index into it")
    if search_first:
        from atomkit.retrieval.deferred import supported

        names_concepts = supported(session)
        if captioner is not None or not names_concepts:
            raise ValueError(f"search-first indexing needs a local run of a model whose encoder names concepts "
                             f"({session.model} {'does, but not on Ray' if names_concepts else 'does not'})")
    t0 = time.perf_counter()
    report = IndexReport()
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    found = scan(paths)
    videos = found.videos
    report.not_videos = found.not_videos
    report.skipped += [Skipped(str(p), r) for p, r in found.problems]
    report.videos = [Path(v).resolve() for v in videos]
    cfg = lib.config_id(config_of(session))
    known = {v.path: v for v in lib.videos()}
    present = {Path(v).resolve() for v in videos}

    todo: list[tuple[Path, int, int, str | None]] = []  # (path, size, mtime_ns, fingerprint or None)
    for v in videos:
        path = Path(v).resolve()
        st = path.stat()
        row = known.get(path)
        if row and (row.size, row.mtime_ns) == (st.st_size, st.st_mtime_ns):
            if row.error is not None:  # unreadable before and unchanged since: not retried
                report.skipped.append(Skipped(str(path), row.error))
                continue
            if lib.is_done(row.id, cfg):
                report.cached.append(str(path))
                continue
            todo.append((path, st.st_size, st.st_mtime_ns, row.fingerprint))
            continue
        fp = fingerprint(path, st.st_size)
        if row is None:  # a new path: maybe a known file that was moved or renamed
            gone = [r for r in lib.by_fingerprint(fp) if r.path not in present and not r.path.exists()]
            if gone and gone[0].error is None and lib.is_done(gone[0].id, cfg):
                lib.move(gone[0].id, path, st.st_size, st.st_mtime_ns)
                report.moved.append((str(gone[0].path), str(path)))
                report.cached.append(str(path))
                continue
        elif row.fingerprint == fp and row.error is None and lib.is_done(row.id, cfg):
            lib.touch(row.id, st.st_size, st.st_mtime_ns)  # touched, same content
            report.cached.append(str(path))
            continue
        todo.append((path, st.st_size, st.st_mtime_ns, fp))

    items = {path: (size, mtime_ns, fp) for path, size, mtime_ns, fp in todo}
    runner = captioner or LocalCaptioner(session, glance=search_first)
    bar = tqdm(total=len(todo), desc=f"indexing ({runner.name})", unit="video", disable=not progress)
    if on_progress:
        on_progress(0, len(todo))
    done = 0
    try:
        for path, result in runner.run(list(items), cancel=cancel):
            size, mtime_ns, fp = items[path]
            _store(lib, cfg, path, size, mtime_ns, fp or fingerprint(path, size), result, report)
            done += 1
            bar.update(1)
            if on_progress:
                on_progress(done, len(todo))
        report.cancelled = done < len(todo)
    finally:
        bar.close()
    report.workers = getattr(runner, "stats", lambda: None)()

    if prune and not report.cancelled:
        roots = [Path(p).resolve() for p in paths if Path(p).is_dir()]
        moved_from = {Path(old) for old, _ in report.moved}
        gone = [r for r in lib.videos() if r.path not in moved_from and _under(r.path, roots) and not r.path.exists()]
        if gone:
            lib.remove([r.id for r in gone])
            report.pruned = [str(r.path) for r in gone]
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class VideoResult:
    """What captioning one video gave, ready to store: its clips as library rows, or why it failed.

    ``error`` means the file cannot be read (recorded, retried when the file changes); ``failed`` means the
    work failed for another reason (a worker died): reported, not recorded, so the next run tries again."""

    rows: list[tuple] = field(default_factory=list)  # (idx, start, end, caption, concepts, float32 vector)
    duration_s: float | None = None
    error: str | None = None
    failed: str | None = None
    skipped: list[Skipped] = field(default_factory=list)  # clips of this video whose frames failed
    worker: str = "local"


def caption_video(session, path: Path, glance: bool = False) -> VideoResult:
    """Caption one video and embed its clips (``atomkit.retrieval.ranking``) with the session's resident modules (a
    worker's unit of work); ``glance``: a first look at each clip, captions pending (``atomkit.retrieval.deferred``)."""
    caps = caption(session, [path], glance=glance)
    if not caps.clips:
        return VideoResult(error="; ".join(s.reason for s in caps.skipped) or "no clip could be captioned")
    vectors = index(session, caps).vectors.numpy().astype(np.float32)  # what retrieval ranks on
    rows = [(c.clip.index, c.clip.start_s, c.clip.end_s, c.caption, [list(x) for x in c.concepts], v)
            for c, v in zip(caps.clips, vectors)]
    return VideoResult(rows, probe(path).duration_s, skipped=caps.skipped)


class LocalCaptioner:
    """Captions the videos one after another in this process, with the session's resident modules."""

    name = "local"

    def __init__(self, session, glance: bool = False):
        self.session, self.glance = session, glance

    def run(self, paths: list[Path], cancel: threading.Event | None = None) -> Iterator[tuple[Path, VideoResult]]:
        for path in paths:
            if cancel is not None and cancel.is_set():
                return
            yield path, caption_video(self.session, path, self.glance)


def _store(lib: Library, cfg: int, path: Path, size: int, mtime_ns: int, fp: str, result: VideoResult,
           report: IndexReport) -> None:
    """Store one video with all its clips in one transaction (or its reason, if unreadable)."""
    if result.failed is not None:
        report.failed.append(Skipped(str(path), result.failed))
        return
    if result.error is not None:
        lib.put_video(path, size=size, mtime_ns=mtime_ns, fp=fp, config_id=cfg, error=result.error)
        report.skipped.append(Skipped(str(path), result.error))
        return
    lib.put_video(path, size=size, mtime_ns=mtime_ns, fp=fp, config_id=cfg, duration_s=result.duration_s,
                  clips=result.rows)
    report.captioned.append(str(path))
    report.clips_new += len(result.rows)
    report.pending += sum(1 for r in result.rows if r[3] == PENDING)
    report.skipped += result.skipped


def load_index(session, lib: Library, videos: Iterable[str | Path] | None = None) -> Index:
    """The stored clips of the session's configuration (only those of ``videos`` when given) as a retrieval
    ``Index``: captions and embeddings come from the library, so no video is decoded and no encoder or
    decoder is loaded. Clip ids are unique in the index (``unique_ids``)."""
    cfg = lib.config_id(config_of(session))
    wanted = None if videos is None else [Path(v).resolve() for v in videos]
    rows = lib.clips(cfg, wanted) if cfg is not None else []
    ids = unique_ids(list(dict.fromkeys(p for p, *_ in rows)))
    clips = [CaptionedClip(Clip(p, i, a, b, uid=f"{ids[p]}#{i:02d}"), cap, [(str(lbl), float(pr)) for lbl, pr in con])
             for p, i, a, b, cap, con, _ in rows]
    vectors = torch.from_numpy(np.stack([r[6] for r in rows])) if rows else torch.zeros(0, 0)
    return Index(Captions(session.model, clips, []), vectors,
                 space="retriever" if session.spec.retriever is not None else "embedder")
