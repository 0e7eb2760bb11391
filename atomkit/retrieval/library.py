"""The video library: one SQLite file that remembers every clip it has captioned, so nothing is captioned twice.

Tables (schema version in ``PRAGMA user_version``):

* ``videos``: one row per file: path (text; the file system's bytes, as a BLOB, for a name that is not
  UTF-8), size, mtime, a content fingerprint, duration, and the reason when it could not be read (retried
  only once the file changes);
* ``configs``: the settings that produce captions (model, quantization, decoding, windows, atomkit version),
  stored as JSON under their hash: clips made under another configuration are never mixed in;
* ``clips``: the windows of a video under one configuration: bounds, caption, concepts and the caption's
  embedding (float32 BLOB, unit length). A clip indexed search-first has the caption ``PENDING`` (empty) and
  the concepts and embedding of a first look until ``set_clip`` lands the full pass (``atomkit.retrieval.deferred``).

Every change goes through ``with lib.transaction():`` (``BEGIN IMMEDIATE``), and a video's clips are written in
one transaction, so a killed indexer leaves whole videos or none. WAL mode lets readers query while an indexer
writes. Vector search is numpy over the stored embeddings (a matrix product over the clips of one configuration).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from atomkit.config import PENDING
from atomkit.errors import AtomkitError

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
    """A library file that cannot be used as it is (another schema version, not a library, unwritable,
    damaged, or its disk full)."""


APPLICATION_ID = 0x61746B31  # "atk1" in PRAGMA application_id: this SQLite file is an atomkit library
_TABLES = {"configs", "videos", "clips", "done"}


def default_path(environ: dict | None = None) -> Path:
    """$ATOMKIT_LIBRARY (of ``environ``, default this process's), else ~/.local/share/atomkit/library.db."""
    env = (os.environ if environ is None else environ).get("ATOMKIT_LIBRARY")
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
    from atomkit.version import __version__
    from atomkit.retrieval.ranking import RANKING

    from atomkit.models.detector import CONCEPTS

    return {"model": session.model, "quant": session.quant, "random_weights": session.random_weights,
            "programs": sorted(session.programs) if session.programs else None,
            "decode": asdict(session.decode), "window": asdict(session.window), "atomkit": __version__,
            "ranking": RANKING, "concepts": CONCEPTS}


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


class _Rows(list):
    """A statement's rows, read at once (so a damaged page fails inside the guard, not in a caller's loop)."""

    def fetchone(self):
        return self[0] if self else None

    def fetchall(self):
        return self


class _Connection:
    """The library's SQLite connection: each SQLite error becomes a one-line :class:`LibraryError` that names
    the library file and what to do (:func:`_explain`)."""

    def __init__(self, db: sqlite3.Connection, path: Path):
        self._db, self.path = db, path

    def execute(self, sql: str, params=()) -> _Rows:
        try:
            return _Rows(self._db.execute(sql, params).fetchall())
        except sqlite3.Error as e:
            raise _explain(self.path, e) from e

    def executemany(self, sql: str, rows) -> None:
        try:
            self._db.executemany(sql, rows)
        except sqlite3.Error as e:
            raise _explain(self.path, e) from e

    def close(self) -> None:
        self._db.close()


def _explain(path: Path, e: sqlite3.Error) -> LibraryError:
    """What an SQLite error means for the person who passed ``--db path``, and the way out."""
    name = getattr(e, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return LibraryError(f"{path} is damaged ({e}): `sqlite3 {path} 'PRAGMA integrity_check'` shows where; to "
                            f"rebuild it, move it aside and index your folders again into a new --db")
    if name.startswith("SQLITE_FULL") or (name.startswith("SQLITE_IOERR") and _little_space(path)):
        return LibraryError(f"the disk holding {path} is full: free some space and run again (what the library "
                            f"held before is kept)")
    if name.startswith("SQLITE_READONLY"):
        return LibraryError(f"{path} is read-only: indexing needs write access to it and to its folder; "
                            f"queries (retrieve, assemble --db) still read it")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return LibraryError(f"{path} stayed locked by another program for over a minute ({e}); run again when "
                            f"it is done")
    return LibraryError(f"{path}: {e}; pass another --db")


def _little_space(path: Path) -> bool:
    """Whether the disk holding ``path`` is (nearly) full: SQLite reports a full disk while it writes its
    shared-memory or journal file as an I/O error."""
    try:
        return shutil.disk_usage(path.parent).free < 256 * 1024
    except OSError:
        return False


def _judge(path: Path, app_id: int, version: int, tables: set[str]) -> bool:
    """True for an atomkit library, False for an empty database (a new library); raises for anything else."""
    if app_id == 0 and version == 0 and not tables:
        return False
    if app_id == APPLICATION_ID or (app_id == 0 and version >= 1 and tables >= _TABLES):  # v1 had no application_id
        if version != SCHEMA_VERSION:
            which = "a newer" if version > SCHEMA_VERSION else "an older"
            raise LibraryError(f"{path}: library schema version {version} was written by {which} atomkit; this "
                               f"atomkit reads version {SCHEMA_VERSION}. Use a matching atomkit, or index into a "
                               f"new file with --db")
        return True
    owner = f"application_id {app_id:#x}" if app_id else f"tables {', '.join(sorted(tables)) or 'none'}"
    raise LibraryError(f"{path} is an SQLite file of another program ({owner}), not an atomkit library; atomkit "
                       f"leaves it untouched: pass another --db")


def _header(db) -> tuple[int, int, set[str]]:
    one = lambda q: db.execute(q).fetchone()[0]  # noqa: E731
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()}
    return one("PRAGMA application_id"), one("PRAGMA user_version"), tables


class Library:
    """One SQLite library file.

    A file is opened only once it is known to be an atomkit library, or empty: another program's SQLite file
    is never written to (not even a pragma). Creating a new library is one step that a concurrent creator
    waits for. A library on a read-only disk or folder opens for reading.

    Args:
        path: The database file (default: ``default_path()``).
        writable: Open it for indexing (created when missing; refused up front when the file or its folder
            is read-only). False: for queries only; it must exist, and nothing is ever written.

    Raises:
        LibraryError: Missing (for reading), not an atomkit library, another schema version, read-only (for
            writing), or damaged. Later SQLite errors (a damaged page, a full disk) are LibraryErrors too.
    """

    def __init__(self, path: str | Path | None = None, *, writable: bool = True):
        self.path = Path(path).expanduser() if path else default_path()
        self.writable = writable
        if self.path.is_dir():
            raise LibraryError(f"--db {self.path} is a folder; give a library file (e.g. {self.path / 'library.db'})")
        if not self.path.exists():
            if not writable:
                raise LibraryError(f"no library at {self.path}: make one with `atomkit index --db {self.path} "
                                   f"FOLDER` (queries never create one)")
            self._create_file()
        ours = self._inspect()
        if writable:
            self._check_writable()
        elif not ours:
            raise LibraryError(f"{self.path} holds no library yet: `atomkit index --db {self.path} FOLDER` fills it")
        self._db = self._connect()
        try:
            if writable:
                if not ours:
                    self._create_schema()
                self._use_wal()
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            self._db.close()
            raise

    # -- opening ---------------------------------------------------------------------------------------
    def _create_file(self) -> None:
        """An empty file at ``path`` (exclusive create: a concurrent creator finds it and waits in
        :meth:`_create_schema`)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            pass
        except OSError as e:
            raise LibraryError(f"cannot create the library {self.path}: {e.strerror or e}; indexing needs a folder "
                               f"you can write to: pass another --db") from e

    def _inspect(self) -> bool:
        """Read the file's identity without changing it: True for a library, False for an empty database."""
        try:
            db = self._open_readonly()
            try:
                db.execute("BEGIN")  # one snapshot: a concurrent creator's schema is all there or not at all
                header = _header(db)
                db.execute("COMMIT")
            finally:
                db.close()
            return _judge(self.path, *header)
        except sqlite3.Error as e:
            name = getattr(e, "sqlite_errorname", "")
            if name == "SQLITE_NOTADB":
                raise LibraryError(f"{self.path} is not an SQLite file, so not an atomkit library; atomkit leaves "
                                   f"it untouched: pass another --db") from e
            if name.startswith(("SQLITE_CORRUPT", "SQLITE_IOERR", "SQLITE_FULL")):
                raise _explain(self.path, e) from e
            raise LibraryError(f"{self.path}: cannot open it ({e}); atomkit leaves it untouched: pass another "
                               f"--db") from e

    def _open_readonly(self) -> sqlite3.Connection:
        """A connection that cannot write. On a read-only folder SQLite cannot make a WAL library's shared-memory
        file, so the file is opened as immutable there (nothing can change it while it is read)."""
        uri = f"file:{quote(str(self.path.absolute()))}"
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return db
        except sqlite3.OperationalError as e:
            db.close()
            if getattr(e, "sqlite_errorname", "") != "SQLITE_CANTOPEN" or os.access(self.path.parent, os.W_OK):
                raise
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None, check_same_thread=False)

    def _check_writable(self) -> None:
        """Indexing needs to write the file and, for WAL, files beside it: say so before any captioning."""
        for what, where in (("the file", self.path), ("its folder", self.path.parent)):
            if not os.access(where, os.W_OK):
                raise LibraryError(f"{self.path} is read-only ({what} cannot be written): indexing needs write "
                                   f"access; queries (retrieve, assemble --db) still read it, or index into "
                                   f"another --db")

    def _connect(self) -> _Connection:
        try:
            db = (sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
                  if self.writable else self._open_readonly())
        except sqlite3.Error as e:
            raise _explain(self.path, e) from e
        return _Connection(db, self.path)

    def _create_schema(self) -> None:
        """Make an empty database a library, in one transaction; a concurrent creator that got there first
        is found inside it (and then its library is used)."""
        with self.transaction() as db:
            if _judge(self.path, *_header(db)):
                return
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")

    def _use_wal(self) -> None:
        """WAL mode (readers go on while an indexer writes), set once the file is known to be ours. Switching
        needs the file to itself and SQLite does not wait for that: a concurrent creator's switch is waited
        for here."""
        raw, deadline = self._db._db, time.monotonic() + 60
        while True:
            try:
                if raw.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    raw.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if getattr(e, "sqlite_errorname", "") != "SQLITE_BUSY" or time.monotonic() > deadline:
                    raise _explain(self.path, e) from e
                time.sleep(0.05)

    # -- plumbing --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Connection]:
        """All or nothing: ``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` if the body raises)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            with contextlib.suppress(LibraryError):  # SQLite may have rolled back already (a full disk)
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
    def config_id(self, config: dict) -> int | None:
        """The id of a configuration, stored on first use (None: a library opened for reading that has
        nothing made under it)."""
        text = json.dumps(config, sort_keys=True)
        key = hashlib.sha256(text.encode()).hexdigest()
        row = self._db.execute("SELECT id FROM configs WHERE key=?", (key,)).fetchone()
        if row or not self.writable:
            return row[0] if row else None
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
        paths = {p: _path(p) for p in dict.fromkeys(r[0] for r in rows)}  # one Path per video, not per clip
        return [(paths[p], i, a, b, cap, [tuple(x) for x in json.loads(con)], np.frombuffer(vec, dtype=np.float32))
                for p, i, a, b, cap, con, vec in rows]

    def pending(self, config_id: int) -> list[tuple]:
        """(clip id, video path, idx, start, end) of the clips of a configuration still waiting for their caption."""
        rows = self._db.execute("SELECT c.id, v.path, c.idx, c.start_s, c.end_s FROM clips c JOIN videos v ON "
                                "v.id = c.video_id WHERE c.config_id=? AND c.caption=? ORDER BY v.path, c.idx",
                                (config_id, PENDING)).fetchall()
        return [(i, _path(p), idx, a, b) for i, p, idx, a, b in rows]

    def set_clip(self, clip_id: int, caption: str, concepts: list, embedding: np.ndarray) -> bool:
        """Land one pending clip's caption, concepts and embedding in its own transaction; False when the clip is
        gone or no longer pending (its video indexed again meanwhile)."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM clips WHERE id=? AND caption=?", (clip_id, PENDING)).fetchone() is None:
                return False
            db.execute("UPDATE clips SET caption=?, concepts=?, embedding=? WHERE id=?",
                       (caption, json.dumps(concepts), np.asarray(embedding, dtype=np.float32).tobytes(), clip_id))
            return True

    def counts(self) -> dict[str, int]:
        one = lambda q, *a: self._db.execute(q, a).fetchone()[0]  # noqa: E731
        return {"videos": one("SELECT COUNT(*) FROM videos"), "unreadable": one("SELECT COUNT(*) FROM videos WHERE error IS NOT NULL"),
                "clips": one("SELECT COUNT(*) FROM clips"), "configs": one("SELECT COUNT(*) FROM configs"),
                "pending": one("SELECT COUNT(*) FROM clips WHERE caption=?", PENDING)}
