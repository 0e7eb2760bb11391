"""Misuse that must end in one line with exit 2 and touch nothing that is not atomkit's: another program's
SQLite file as --db, a mistyped --db, two creators of one library at once, a damaged library, a read-only
library, a full disk, malformed annotation files. Each case writes the bad input, runs the command in process
(tiny random-weight model, unit scale) and checks the exit status, the message and, where the file is not
ours, that its sha256 is unchanged.

The read-only and full-disk cases mount a read-only bind mount and a small tmpfs; they need root (CI runs as
root) and skip elsewhere, saying so."""
from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from atomkit.cli import main
from atomkit.io import sha256_file
from atomkit.retrieval.library import APPLICATION_ID, Library, LibraryError

from conftest import run_threads

TINY = ["--models", "tiny-default", "--device", "cpu", "--max-new-tokens", "4", "--beams", "1", "-q"]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    return code, out, err


def _one_line_error(code: int, err: str, *parts: str) -> str:
    """The command failed with exit 2 and one line that says every part of ``parts``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("atomkit: error: "), err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def two(tmp_path, samples) -> Path:
    f = tmp_path / "videos"
    f.mkdir()
    for name in ("bigbuckbunny.mp4", "carphone_pristine.mp4"):
        shutil.copy(samples[name], f / name)
    return f


@pytest.fixture
def indexed(tmp_path, two, capsys) -> Path:
    db = tmp_path / "lib" / "library.db"
    assert _run(["index", two, "--db", db, *TINY], capsys)[0] == 0
    return db


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextlib.contextmanager
def _mounted(target: Path, *args: str):
    """``mount ARGS target`` for the block; skips (saying why) where this user cannot mount."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        _mount(*args, str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount here (needs root; CI runs as root): {getattr(e, 'stderr', b'') or e}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextlib.contextmanager
def _read_only_view(folder: Path, at: Path):
    """``folder`` as a read-only bind mount at ``at`` (nobody, root included, can write there)."""
    with _mounted(at, "--bind", str(folder)):
        _mount("-o", "remount,ro,bind", str(at))
        yield at


@contextlib.contextmanager
def _full_disk(at: Path, size: str = "1m", keep_bytes: int = 0):
    """A tmpfs of ``size`` at ``at``; ``fill()`` then takes all of its space but ``keep_bytes``."""
    with _mounted(at, "-t", "tmpfs", "-o", f"size={size}", "tmpfs"):
        def fill():
            filler = at / "filler"
            with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
            if keep_bytes:
                with open(filler, "r+b") as f:
                    f.truncate(max(0, filler.stat().st_size - keep_bytes))
        yield fill


# -- files that are not ours -------------------------------------------------------------------------------------
def _foreign(path: Path, *pragmas: str) -> str:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE bookmarks(id INTEGER PRIMARY KEY, url TEXT)")
    db.execute("INSERT INTO bookmarks(url) VALUES ('https://example.org')")
    for p in pragmas:
        db.execute(p)
    db.commit()
    db.close()
    return sha256_file(path)


@pytest.mark.parametrize("pragmas", [(), ("PRAGMA user_version=1",), ("PRAGMA application_id=1234",)],
                         ids=["plain", "user_version-1", "application_id"])
def test_another_programs_sqlite_file_is_never_changed(tmp_path, two, capsys, pragmas):
    db = tmp_path / "bookmarks.db"
    before = _foreign(db, *pragmas)
    for argv in (["index", two], ["retrieve", "--query", "a rabbit"], ["assemble", "--prompt", "a reel", "--out",
                                                                         tmp_path / "out"]):
        code, _, err = _run([*argv, "--db", db, *TINY], capsys)
        _one_line_error(code, err, str(db), "another program", "untouched", "--db")
        assert sha256_file(db) == before and sorted(p.name for p in tmp_path.iterdir() if "bookmarks" in p.name) \
            == ["bookmarks.db"]  # no -wal or -shm beside it either
    with pytest.raises(LibraryError, match="another program"):
        Library(db)
    assert sha256_file(db) == before


def test_a_file_that_is_not_sqlite_is_left_as_it_was(tmp_path, two, capsys):
    db = tmp_path / "notes.db"
    db.write_bytes(b"my notes, not a database\n" * 300)
    before = sha256_file(db)
    code, _, err = _run(["index", two, "--db", db, *TINY], capsys)
    _one_line_error(code, err, str(db), "not an SQLite file")
    assert sha256_file(db) == before


def test_queries_never_create_a_library(tmp_path, capsys):
    typo = tmp_path / "libary.db"
    for argv in (["retrieve", "--query", "a rabbit"], ["assemble", "--prompt", "a reel", "--out", tmp_path / "out"]):
        code, _, err = _run([*argv, "--db", typo, *TINY], capsys)
        _one_line_error(code, err, f"no library at {typo}", "atomkit index --db")
        assert not typo.exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    code, _, err = _run(["retrieve", "--query", "a rabbit", "--db", empty, *TINY], capsys)
    _one_line_error(code, err, "holds no library yet")
    assert empty.stat().st_size == 0


def test_concurrent_creators_of_one_new_library_all_get_it(tmp_path):
    """Creating is one step: each of four threads opening the same new path at once gets the one library
    (before, some failed with 'table configs already exists' or a false schema-version error)."""
    for round_ in range(15):
        path = tmp_path / f"new-{round_}.db"
        libs = run_threads(4, lambda: Library(path))
        ids = {lib.config_id({"round": round_}) for lib in libs}
        for lib in libs:
            lib.close()
        assert len(ids) == 1
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
            assert db.execute("SELECT COUNT(*) FROM configs").fetchone()[0] == 1
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_library_written_before_application_id_still_opens(tmp_path):
    path = tmp_path / "v1.db"
    Library(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA application_id=0")  # as libraries of schema 1 were written
    with Library(path) as lib:
        assert lib.counts()["videos"] == 0


# -- a damaged library -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_damaged_library_gives_one_line_with_the_way_out(indexed, two, capsys):
    data = bytearray(indexed.read_bytes())
    page = 4096
    pages = len(data) // page
    assert pages >= 4
    for n in range(1, min(21, pages)):  # every page but the first (the header), up to 20
        data[n * page:(n + 1) * page] = bytes(page)
    indexed.write_bytes(bytes(data))
    for argv in (["retrieve", "--query", "a rabbit"], ["index", two]):
        code, _, err = _run([*argv, "--db", indexed, *TINY], capsys)
        _one_line_error(code, err, f"{indexed} is damaged", "PRAGMA integrity_check", "move it aside")


# -- read-only libraries -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_read_only_library_answers_queries_and_refuses_indexing_up_front(indexed, two, tmp_path, capsys):
    with _read_only_view(indexed.parent, tmp_path / "ro") as ro:
        db = ro / indexed.name
        code, out, err = _run(["retrieve", "--query", "a cartoon rabbit", "-k", "2", "--db", db, *TINY], capsys)
        assert code == 0 and [line.split()[0] for line in out.splitlines()[:2]] == ["1.", "2."], err
        code, _, err = _run(["index", two, "--db", db, *TINY], capsys)
        _one_line_error(code, err, f"{db} is read-only", "indexing needs write access", "retrieve")
        code, _, err = _run(["index", two, "--db", ro / "new.db", *TINY], capsys)
        _one_line_error(code, err, f"cannot create the library {ro / 'new.db'}", "another --db")


# -- full disks --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_full_disk_while_indexing_says_so_and_keeps_what_was_stored(tmp_path, two, samples, tiny_session, capsys):
    from atomkit.retrieval.indexing import update

    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(samples["bikes.mp4"], more / "bikes.mp4")
    with _full_disk(tmp_path / "disk") as fill:
        db = tmp_path / "disk" / "library.db"
        assert _run(["index", two, "--db", db, *TINY], capsys)[0] == 0
        with Library(db) as lib:  # open (its WAL files made), then the disk fills while a video is stored
            fill()
            with pytest.raises(LibraryError, match=f"the disk holding {db} is full: free some space"):
                update(tiny_session, lib, [more])
        code, _, err = _run(["index", more, "--db", db, *TINY], capsys)  # full before the command starts
        _one_line_error(code, err, f"the disk holding {db} is full", "free some space")
        (tmp_path / "disk" / "filler").unlink()
        with Library(db) as lib:
            assert lib.counts()["clips"] == 2 and lib.counts()["videos"] == 2
        with sqlite3.connect(db) as c:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_full_disk_while_assembling_names_the_out_folder_not_an_internal_path(tmp_path, two, capsys):
    with _full_disk(tmp_path / "disk", size="2m", keep_bytes=64 * 1024) as fill:
        out = tmp_path / "disk" / "reel"
        fill()  # room for the folder and the JSON, not for the reel
        code, _, err = _run(["assemble", two, "--prompt", "a reel", "--out", out, *TINY], capsys)
        line = _one_line_error(code, err, f"the disk holding {out} is full", "free some space")
        assert ".atomkit" not in line and "Broken pipe" not in line
        assert not (out / "reel.mp4").exists() and not (out / ".atomkit").exists()


# -- annotation files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, parts", [
    ("short.csv", "video_id,sentence\nbikes,people ride bikes\nbigbuckbunny\n",
     ["short.csv:3", "fewer cells than the header"]),
    ("long.csv", "video_id,sentence\nbikes,people ride bikes,on a road\n", ["long.csv:2", "more cells"]),
    ("nocolumn.csv", "video,text\nbikes,people ride bikes\n", ["MSR-VTT CSV needs the columns sentence, video_id"]),
    ("string.json", '{"queries": [{"q": "bikes on a road", "relevant": "bikes"}]}',
     ["query 1 ('bikes on a road')", 'needs \'relevant\' as a non-empty list of video names, e.g. ["bikes"]',
      "got 'bikes'"]),
    ("noq.json", '{"queries": [{"q": "bikes", "relevant": ["bikes"]}, {"relevant": ["x"]}]}',
     ["query 2 needs a non-empty text 'q'"]),
    ("didemo.json", '[{"video": "bikes.mp4", "description": "bikes"}, {"video": "bikes.mp4"}]',
     ["entry 2 of the list needs 'video' and 'description'"]),
    ("cut.json", '{"queries": [', ["cannot read it as an annotation file (JSONDecodeError"]),
])
def test_malformed_annotations_name_the_row(tmp_path, two, capsys, name, text, parts):
    ann = tmp_path / name
    ann.write_text(text)
    code, _, err = _run(["eval", two, "--annotations", ann, *TINY], capsys)
    line = _one_line_error(code, err, str(ann), *parts)
    assert "as auto" not in line
