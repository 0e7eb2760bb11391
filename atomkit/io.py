"""Atomic file output: a reader never sees a half-written file at the final path."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temp files are created 0600; the final file gets the permissions a plain open() would give.
_FILE_MODE = 0o666 & ~_umask()


def _unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def printable(text: str) -> str:
    """``text`` with each lone surrogate written as ``\\udcXX``, so that it always encodes to valid UTF-8.

    A file name that is not valid UTF-8 reaches Python as a str with lone surrogates (``os.fsdecode``,
    surrogateescape: byte 0xE9 is ``"\\udce9"``), which UTF-8 cannot encode (printing it, or sending it to a
    page, fails). Every other character is kept as itself.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_text(obj) -> str:
    """`obj` as JSON text (indent 2, non-ASCII kept) that always encodes to valid UTF-8, losslessly: a lone
    surrogate (:func:`printable`) becomes the JSON escape ``\\udcXX``, so ``json.loads`` gives back the same
    str, and ``os.fsencode`` of a file name the original bytes."""
    return printable(json.dumps(obj, indent=2, ensure_ascii=False))


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write `obj` as JSON (:func:`json_text`: indent 2, UTF-8, names that are not UTF-8 escaped losslessly,
    trailing newline) to `path` atomically.

    The JSON goes to a temp file in the same directory, is flushed and fsync'd, then renamed over
    `path`. On any failure (including serialisation errors) the temp file is removed and the
    exception re-raised; an existing file at `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, delete=False, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with tmp:
            tmp.write(json_text(obj))
            tmp.write("\n")
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, _FILE_MODE)
        os.replace(tmp.name, path)
    except BaseException:
        _unlink_quietly(tmp.name)
        raise
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path` (same suffix, e.g. `.reel.mp4.tmp-x1y2.mp4`) to write to.

    On normal exit the temp file replaces `path`; if the body raises (or is interrupted) the temp
    file is deleted and the exception propagates, so `path` never holds a partial file.
    The suffix is kept so tools that choose a container from the extension (ffmpeg) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=path.suffix)
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
    there is removed first). If the body raises, the temp folder is deleted and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
