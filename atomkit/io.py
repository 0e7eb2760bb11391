"""Atomic file output: a reader never sees a half-written file at the final path, and never a mix of two runs'
outputs in a folder (``output_set``).

Every temporary name carries the writer's process id (``.<name>.tmp-<pid>-<random>``), so the next writer of the
same name removes what a killed process left behind (:func:`remove_stale`) and never touches the files of a
writer that is still running.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from atomkit.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temp files are created 0600; the final file gets the permissions a plain open() would give.
_FILE_MODE = 0o666 & ~_umask()
_LEGACY_STALE_S = 3600.0  # temporaries without a process id (older atomkit versions): stale after an hour


def no_space(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a full disk or quota: ENOSPC/EDQUOT, or a tool's message that says
    so (ffmpeg's "No space left on device" reaches moviepy as a broken pipe)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def _disk_full_named(target: Path) -> Iterator[None]:
    """A full disk while writing ``target`` (the user's file or folder) becomes one :class:`OutputError` that
    names it, never the temporary path inside it."""
    try:
        yield
    except Exception as e:
        if no_space(e):
            raise OutputError(f"the disk holding {target} is full: free some space and run again ({target} was "
                              f"left as it was)") from e
        raise


def _unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink_quietly(path)


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a pid we may not signal still runs)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(tmp_name: str, prefix: str) -> int | None:
    """The process id in ``.<name>.tmp-<pid>-<random>``, None for a name without one."""
    head = tmp_name[len(prefix):].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def remove_stale(path: str | Path) -> list[Path]:
    """Remove the temporaries that killed writers of ``path`` left beside it; returns what was removed.

    A temporary belongs to a dead writer when its process id no longer runs here; one without a process id
    (written by an older atomkit) when it is older than an hour. The temporaries of live writers are kept.
    """
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    removed = []
    try:
        entries = [e for e in path.parent.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        pid = _owner(entry.name, prefix)
        try:
            stale = (not _alive(pid)) if pid is not None else \
                time.time() - entry.lstat().st_mtime > _LEGACY_STALE_S
        except OSError:
            continue
        if stale:
            _remove(entry)
            removed.append(entry)
    return removed


def printable(text: str) -> str:
    """``text`` with each lone surrogate written as ``\\udcXX``, so that it always encodes to valid UTF-8.

    A file name that is not valid UTF-8 reaches Python as a str with lone surrogates (``os.fsdecode``,
    surrogateescape: byte 0xE9 is ``"\\udce9"``), which UTF-8 cannot encode (printing it, or sending it to a
    page, fails). Every other character is kept as itself.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def count(n: int, noun: str) -> str:
    """``n`` and ``noun`` for a message: ``1 clip``, ``4 clips``, ``0 videos`` (nouns whose plural adds an s)."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def json_text(obj) -> str:
    """`obj` as JSON text (indent 2, non-ASCII kept) that always encodes to valid UTF-8, losslessly: a lone
    surrogate (:func:`printable`) becomes the JSON escape ``\\udcXX``, so ``json.loads`` gives back the same
    str, and ``os.fsencode`` of a file name the original bytes."""
    return printable(json.dumps(obj, indent=2, ensure_ascii=False))


def _dumps(obj) -> bytes:
    """:func:`json_text` with a trailing newline, as UTF-8 bytes."""
    return (json_text(obj) + "\n").encode("utf-8")


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write `obj` as JSON (:func:`json_text`: indent 2, UTF-8, names that are not UTF-8 escaped losslessly,
    trailing newline) to `path` atomically.

    The JSON goes to a temp file in the same directory, is flushed and fsync'd, then renamed over
    `path`. On any failure (including serialisation errors) the temp file is removed and the
    exception re-raised; an existing file at `path` is left untouched.
    """
    path = Path(path)
    data = _dumps(obj)  # a serialisation error leaves nothing behind
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path` (same suffix, e.g. `.reel.mp4.tmp-<pid>-x1y2.mp4`) to write to.

    On normal exit the temp file replaces `path`; if the body raises (or is interrupted) the temp
    file is deleted and the exception propagates, so `path` never holds a partial file. Temporaries that
    killed writers of `path` left are removed first (:func:`remove_stale`).
    The suffix is kept so tools that choose a container from the extension (ffmpeg) still work.
    """
    path = Path(path)
    with _disk_full_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path.name), suffix=path.suffix)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            if not tmp.exists():
                raise FileNotFoundError(f"{tmp}: nothing was written for {path}")
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder next to `path` to fill; on normal exit it replaces `path` (an existing folder
    there is removed first). If the body raises, the temp folder is deleted and `path` is left as it was.
    Temp folders that killed writers of `path` left are removed first (:func:`remove_stale`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_tmp_prefix(path.name)))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- a set of files that appear together ---------------------------------------------------------------------
SETS = ".atomkit"  # inside an output folder: sets/<pid>-<random>/ (one folder per set) and current -> sets/<id>
_STAGING: set[Path] = set()  # sets this process is writing now (another thread's sweep must not remove them)
_STAGING_LOCK = threading.Lock()


def _link(target: str, at: Path) -> None:
    """Point the symbolic link ``at`` to ``target`` atomically (a file or link already there is replaced)."""
    tmp = at.with_name(f"{_tmp_prefix(at.name)}{secrets.token_hex(4)}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, at)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def current_set(folder: str | Path) -> Path | None:
    """The folder of the set published last in ``folder`` by :func:`output_set`, None if there is none."""
    current = Path(folder) / SETS / "current"
    return current.resolve() if current.is_symlink() and current.exists() else None


def _sweep_sets(folder: Path) -> None:
    """Remove the set folders that are not current and whose writer no longer runs (killed or finished)."""
    sets = folder / SETS / "sets"
    current = current_set(folder)
    with contextlib.suppress(OSError):
        for entry in sets.iterdir():
            pid = _owner(entry.name, "")
            with _STAGING_LOCK:
                in_flight = entry in _STAGING
            if entry.resolve() != current and not in_flight and (pid is None or not _alive(pid) or pid == os.getpid()):
                _remove(entry)
    remove_stale(folder / SETS / "current")


@contextlib.contextmanager
def output_set(folder: str | Path, names: Iterable[str]) -> Iterator[Path]:
    """Stage files that belong together (a reel, its script, its captions) and publish them as one.

    Yields a staging folder; write every file of ``names`` into it. On normal exit the set is published in one
    atomic step: ``folder/<name>`` are symbolic links to ``.atomkit/current/<name>``, and ``.atomkit/current``,
    a link to the set's own folder under ``.atomkit/sets/``, is replaced by one rename. A reader of
    ``folder/<name>`` therefore sees every file of the previous set or every file of this one, never a mix,
    whenever the process is killed. The previous set's folder is removed after the switch, and so are sets
    that killed runs left half-written. If the body raises, the staged files are removed and ``folder`` is left
    as it was. Names of the previous set that this set does not have are unlinked (the folder holds one run's
    outputs). A regular file at ``folder/<name>`` (written by an older atomkit) is replaced by the link.
    """
    with _disk_full_named(Path(folder)):
        folder = Path(folder)
        names = list(dict.fromkeys(names))
        if not names or any(n != Path(n).name or n.startswith(".") for n in names):
            raise ValueError(f"output_set takes plain, non-hidden file names, got {names}")
        sets = folder / SETS / "sets"
        sets.mkdir(parents=True, exist_ok=True)
        _sweep_sets(folder)
        for n in names:
            remove_stale(folder / n)
        stage = sets / f"{os.getpid()}-{secrets.token_hex(4)}"
        stage.mkdir()
        with _STAGING_LOCK:
            _STAGING.add(stage)
        try:
            yield stage
            missing = [n for n in names if not (stage / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{stage}: {', '.join(missing)} not written; nothing was published")
            for n in names:
                with open(stage / n, "rb") as f:
                    os.fsync(f.fileno())
            _fsync_dir(stage)
        except BaseException:
            with _STAGING_LOCK:
                _STAGING.discard(stage)
            shutil.rmtree(stage, ignore_errors=True)
            for empty in (sets, sets.parent):  # nothing was ever published here: leave no trace
                with contextlib.suppress(OSError):
                    empty.rmdir()
            raise
        if not _symlinks_work(folder):
            _publish_by_rename(stage, folder, names)
            return
        previous = current_set(folder)
        old_names = {p.name for p in previous.iterdir()} if previous else set()
        target = lambda n: f"{SETS}/current/{n}"  # noqa: E731
        for n in names:  # before the switch: only where it changes nothing a reader can see
            at = folder / n
            if at.is_symlink() and os.readlink(at) == target(n):
                continue
            if at.is_symlink() or not at.exists():  # nothing there, or a link elsewhere (dangling or not)
                _link(target(n), at)
        _link(f"sets/{stage.name}", folder / SETS / "current")  # the switch: one rename
        _fsync_dir(folder / SETS)
        for n in names:  # a regular file written by an older atomkit: replaced now, one by one
            if not (folder / n).is_symlink():
                _link(target(n), folder / n)
        for n in old_names - set(names):
            at = folder / n
            if at.is_symlink() and os.readlink(at) == target(n):
                _unlink_quietly(at)
        with _STAGING_LOCK:
            _STAGING.discard(stage)
        _sweep_sets(folder)


def _symlinks_work(folder: Path) -> bool:
    """Whether ``folder``'s file system takes symbolic links (FAT and exFAT cards, some network shares do not)."""
    probe = folder / SETS / f"{_tmp_prefix('probe')}{secrets.token_hex(4)}"
    try:
        os.symlink("sets", probe)
    except OSError:
        return False
    _unlink_quietly(probe)
    return True


def _publish_by_rename(stage: Path, folder: Path, names: list[str]) -> None:
    """Where links cannot be made: each file is renamed into place (each one atomic, the set not: a process
    killed between two renames leaves a mix)."""
    try:
        for n in names:
            os.replace(stage / n, folder / n)
    finally:
        with _STAGING_LOCK:
            _STAGING.discard(stage)
        shutil.rmtree(stage, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
