"""The video library: one SQLite file that remembers every clip it has captioned, so nothing is captioned twice.

Tables (schema version in ``PRAGMA user_version``):

* ``videos``: one row per file: path (text; the file system's bytes, as a BLOB, for a name that is not
  UTF-8), size, mtime, a content fingerprint, duration, and the reason when it could not be read (retried
  only once the file changes);
* ``configs``: the settings that produce captions (model, quantization, decoding, windows, atomkit version),
  stored as JSON under their hash: clips made under another configuration are never mixed in;
* ``clips``: the windows of a video under one configuration: bounds, caption, concepts and the caption's
  embedding (float32 BLOB, unit length).

Every change goes through ``with lib.transaction():`` (``BEGIN IMMEDIATE``), and a video's clips are written in
one transaction, so a killed indexer leaves whole videos or none. WAL mode lets readers query while an indexer
writes. Vector search is numpy over the stored embeddings (a matrix product over the clips of one configuration).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import AtomkitError

SCHEMA_VERSION = 1
_FINGERPRINT_BLOCK = 1 << 20  # bytes hashed from the start and from the end of a file

_SCHEMA = """
CREATE TABLE configs (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,          -- sha256 of the canonical JSON
    json TEXT NOT NULL
);
CREATE TABLE videos (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    duration_s REAL,
    error TEXT                          -- why it could not be read (NULL: readable)
);
CREATE INDEX videos_fingerprint ON videos(fingerprint);
CREATE TABLE clips (
    id INTEGER PRIMARY KEY,
    video_id INTEGER NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    config_id INTEGER NOT NULL REFERENCES configs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    start_s REAL NOT NULL,
    end_s REAL NOT NULL,
    caption TEXT NOT NULL,
    concepts TEXT NOT NULL,            -- JSON [[label, p], ...]
    embedding BLOB NOT NULL,           -- float32, unit length
    UNIQUE (video_id, config_id, idx)
);
CREATE TABLE done (                     -- (video, config) pairs whose clips are all stored (possibly none)
    video_id INTEGER NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    config_id INTEGER NOT NULL REFERENCES configs(id) ON DELETE CASCADE,
    PRIMARY KEY (video_id, config_id)
);
"""


class LibraryError(AtomkitError):
    """A library file that cannot be used as it is (another schema version, not a library, unwritable)."""


def default_path() -> Path:
    """$ATOMKIT_LIBRARY, else ~/.local/share/atomkit/library.db."""
    env = os.environ.get("ATOMKIT_LIBRARY")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "atomkit" / "library.db"


def fingerprint(path: Path, size: int | None = None) -> str:
    """sha256 over the size, the first and the last MiB of a file: finds a renamed or moved file again
    without reading all of it."""
    size = path.stat().st_size if size is None else size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BLOCK))
        if size > 2 * _FINGERPRINT_BLOCK:
            f.seek(-_FINGERPRINT_BLOCK, os.SEEK_END)
            h.update(f.read(_FINGERPRINT_BLOCK))
    return h.hexdigest()


def config_of(session) -> dict:
    """The settings that determine a session's captions and embeddings."""
    from . import __version__
    from .ranking import RANKING

    return {"model": session.model, "quant": session.quant, "random_weights": session.random_weights,
            "programs": sorted(session.programs) if session.programs else None,
            "decode": asdict(session.decode), "window": asdict(session.window), "atomkit": __version__,
            "ranking": RANKING}


def _stored(path: str | Path) -> str | bytes:
    """A path as the ``videos.path`` column holds it: text, or the file system's bytes (a BLOB) for a name
    that is not valid UTF-8, which SQLite text cannot hold; :func:`_path` reads either back unchanged."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text)
    return text


def _path(stored: str | bytes) -> Path:
    return Path(os.fsdecode(stored))


@dataclass(frozen=True)
class VideoRow:
    id: int
    path: Path
    size: int
    mtime_ns: int
    fingerprint: str
    duration_s: float | None
    error: str | None


class Library:
    """One SQLite library file (created on first use).

    Args:
        path: The database file (default: ``default_path()``).

    Raises:
        LibraryError: The file is not an atomkit library, or was written with another schema version.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except (sqlite3.DatabaseError, OSError) as e:
            raise LibraryError(f"{self.path}: cannot open as an atomkit library ({e}); pass another --db") from e
        if version == 0 and not tables:
            with self.transaction():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            self._db.close()
            which = "a newer" if version > SCHEMA_VERSION else "an older"
            raise LibraryError(f"{self.path}: library schema version {version} was written by {which} atomkit; this "
                               f"atomkit reads version {SCHEMA_VERSION}. Use a matching atomkit, or index into a new "
                               f"file with --db")

    # -- plumbing --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: ``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` if the body raises)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- configurations and videos ---------------------------------------------------------------------
    def config_id(self, config: dict) -> int:
        text = json.dumps(config, sort_keys=True)
        key = hashlib.sha256(text.encode()).hexdigest()
        row = self._db.execute("SELECT id FROM configs WHERE key=?", (key,)).fetchone()
        if row:
            return row[0]
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO configs(key, json) VALUES (?, ?)", (key, text))
            return db.execute("SELECT id FROM configs WHERE key=?", (key,)).fetchone()[0]

    def video(self, path: Path) -> VideoRow | None:
        row = self._db.execute("SELECT id, path, size, mtime_ns, fingerprint, duration_s, error FROM videos "
                               "WHERE path=?", (_stored(path),)).fetchone()
        return VideoRow(row[0], _path(row[1]), *row[2:]) if row else None

    def videos(self) -> list[VideoRow]:
        rows = self._db.execute("SELECT id, path, size, mtime_ns, fingerprint, duration_s, error FROM videos "
                                "ORDER BY path").fetchall()
        return [VideoRow(r[0], _path(r[1]), *r[2:]) for r in rows]

    def by_fingerprint(self, fp: str) -> list[VideoRow]:
        rows = self._db.execute("SELECT id, path, size, mtime_ns, fingerprint, duration_s, error FROM videos "
                                "WHERE fingerprint=?", (fp,)).fetchall()
        return [VideoRow(r[0], _path(r[1]), *r[2:]) for r in rows]

    def is_done(self, video_id: int, config_id: int) -> bool:
        return self._db.execute("SELECT 1 FROM done WHERE video_id=? AND config_id=?",
                                (video_id, config_id)).fetchone() is not None

    def move(self, video_id: int, path: Path, size: int, mtime_ns: int) -> None:
        """A file found again under another path (same fingerprint): its clips move with it."""
        with self.transaction() as db:
            db.execute("UPDATE videos SET path=?, size=?, mtime_ns=? WHERE id=?", (_stored(path), size, mtime_ns, video_id))

    def touch(self, video_id: int, size: int, mtime_ns: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE videos SET size=?, mtime_ns=? WHERE id=?", (size, mtime_ns, video_id))

    def put_video(self, path: Path, *, size: int, mtime_ns: int, fp: str, config_id: int,
                  duration_s: float | None = None, error: str | None = None,
                  clips: list[tuple[int, float, float, str, list, np.ndarray]] = ()) -> int:
        """Store a video and all its clips under one configuration, in one transaction (replacing what
        was stored for that video and configuration). ``error`` records why it could not be read."""
        with self.transaction() as db:
            db.execute("INSERT INTO videos(path, size, mtime_ns, fingerprint, duration_s, error) "
                       "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET size=excluded.size, "
                       "mtime_ns=excluded.mtime_ns, fingerprint=excluded.fingerprint, "
                       "duration_s=excluded.duration_s, error=excluded.error",
                       (_stored(path), size, mtime_ns, fp, duration_s, error))
            vid = db.execute("SELECT id FROM videos WHERE path=?", (_stored(path),)).fetchone()[0]
            db.execute("DELETE FROM clips WHERE video_id=? AND config_id=?", (vid, config_id))
            db.execute("DELETE FROM done WHERE video_id=? AND config_id=?", (vid, config_id))
            db.executemany("INSERT INTO clips(video_id, config_id, idx, start_s, end_s, caption, concepts, embedding) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           [(vid, config_id, i, a, b, cap, json.dumps(concepts),
                             np.asarray(vec, dtype=np.float32).tobytes()) for i, a, b, cap, concepts, vec in clips])
            if error is None:
                db.execute("INSERT INTO done(video_id, config_id) VALUES (?, ?)", (vid, config_id))
        return vid

    def remove(self, video_ids: list[int]) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM videos WHERE id=?", [(i,) for i in video_ids])

    # -- reading clips ---------------------------------------------------------------------------------
    def clips(self, config_id: int, videos: list[Path] | None = None) -> list[tuple]:
        """(video path, idx, start, end, caption, concepts, embedding) of every stored clip of a configuration,
        ordered by path and window (only those of ``videos`` when given)."""
        rows = self._db.execute(
            "SELECT v.path, c.idx, c.start_s, c.end_s, c.caption, c.concepts, c.embedding FROM clips c "
            "JOIN videos v ON v.id = c.video_id WHERE c.config_id=? ORDER BY v.path, c.idx", (config_id,)).fetchall()
        if videos is not None:
            wanted = {_stored(p) for p in videos}
            rows = [r for r in rows if r[0] in wanted]
        return [(_path(p), i, a, b, cap, [tuple(x) for x in json.loads(con)], np.frombuffer(vec, dtype=np.float32))
                for p, i, a, b, cap, con, vec in rows]

    def counts(self) -> dict[str, int]:
        one = lambda q: self._db.execute(q).fetchone()[0]  # noqa: E731
        return {"videos": one("SELECT COUNT(*) FROM videos"), "unreadable": one("SELECT COUNT(*) FROM videos WHERE error IS NOT NULL"),
                "clips": one("SELECT COUNT(*) FROM clips"), "configs": one("SELECT COUNT(*) FROM configs")}
