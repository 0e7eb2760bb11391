"""Outputs published as one set (atomkit.io.output_set) and the clean-up of what killed writers leave behind."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import atomkit.io as io
from atomkit.io import atomic_dir, atomic_path, count, current_set, output_set, remove_stale, write_json_atomic

NAMES = ["reel.mp4", "script.json", "captions.json"]


def publish(folder: Path, tag: str, names=NAMES) -> None:
    with output_set(folder, names) as stage:
        for n in names:
            (stage / n).write_text(f"{tag}:{n}")


def contents(folder: Path, names=NAMES) -> dict[str, str | None]:
    return {n: (folder / n).read_text() if (folder / n).exists() else None for n in names}


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_set_appears_as_links_through_one_current_folder(tmp_path):
    publish(tmp_path, "one")
    assert contents(tmp_path) == {n: f"one:{n}" for n in NAMES}
    assert all(os.readlink(tmp_path / n) == f".atomkit/current/{n}" for n in NAMES)
    first = current_set(tmp_path)
    publish(tmp_path, "two")
    assert contents(tmp_path) == {n: f"two:{n}" for n in NAMES}
    assert current_set(tmp_path) != first and not first.exists()  # the previous set is removed
    assert [p.name for p in (tmp_path / ".atomkit" / "sets").iterdir()] == [current_set(tmp_path).name]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".atomkit", *sorted(NAMES)]


def test_a_failed_set_changes_nothing(tmp_path):
    publish(tmp_path, "old")
    with pytest.raises(RuntimeError, match="stitching failed"):
        with output_set(tmp_path, NAMES) as stage:
            (stage / "reel.mp4").write_text("new, half")
            raise RuntimeError("stitching failed")
    assert contents(tmp_path) == {n: f"old:{n}" for n in NAMES}
    with pytest.raises(FileNotFoundError, match="script.json"):
        with output_set(tmp_path, NAMES) as stage:  # a file of the set was not written
            (stage / "reel.mp4").write_text("new")
            (stage / "captions.json").write_text("new")
    assert contents(tmp_path) == {n: f"old:{n}" for n in NAMES}
    assert len(list((tmp_path / ".atomkit" / "sets").iterdir())) == 1


def test_a_failed_first_set_leaves_no_trace(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with output_set(out, NAMES):
            raise RuntimeError("cancelled")
    assert list(out.iterdir()) == []


def test_sets_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    publish(tmp_path, "old")
    sets = tmp_path / ".atomkit" / "sets"
    killed = sets / f"{dead_pid()}-abcd1234"
    live = sets / f"{os.getppid()}-abcd1234"  # another process that is still running (this test's parent)
    for s in (killed, live):
        s.mkdir()
        (s / "reel.mp4").write_text("half")
    publish(tmp_path, "new")
    assert not killed.exists() and live.exists()
    assert contents(tmp_path) == {n: f"new:{n}" for n in NAMES}


def test_files_of_an_older_atomkit_become_links(tmp_path):
    for n in NAMES:
        (tmp_path / n).write_text("legacy")
    publish(tmp_path, "new")
    assert contents(tmp_path) == {n: f"new:{n}" for n in NAMES}
    assert all((tmp_path / n).is_symlink() for n in NAMES)


def test_names_the_new_set_lacks_are_unlinked(tmp_path):
    publish(tmp_path, "old", ["trip.mp4", "script.json"])
    publish(tmp_path, "new", ["reel.mp4", "script.json"])
    assert not (tmp_path / "trip.mp4").exists() and not (tmp_path / "trip.mp4").is_symlink()
    assert contents(tmp_path, ["reel.mp4", "script.json"]) == {"reel.mp4": "new:reel.mp4",
                                                               "script.json": "new:script.json"}


def test_without_symbolic_links_files_are_renamed_in(tmp_path, monkeypatch):
    def no_links(*a, **k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(io.os, "symlink", no_links)  # as on a FAT or exFAT card
    publish(tmp_path, "one")
    publish(tmp_path, "two")
    assert contents(tmp_path) == {n: f"two:{n}" for n in NAMES}
    assert not any((tmp_path / n).is_symlink() for n in NAMES)
    assert list((tmp_path / ".atomkit" / "sets").iterdir()) == []


def test_remove_stale_takes_dead_writers_temporaries_only(tmp_path):
    target = tmp_path / "reel.mp4"
    dead = tmp_path / f".reel.mp4.tmp-{dead_pid()}-x1y2.mp4"
    live = tmp_path / f".reel.mp4.tmp-{os.getppid()}-x1y2.mp4"
    legacy_old = tmp_path / ".reel.mp4.tmp-k3j4l5.mp4"  # an older atomkit's name, without a process id
    legacy_new = tmp_path / ".reel.mp4.tmp-a1b2c3.mp4"
    other = tmp_path / ".script.json.tmp-1-x.tmp"
    for p in (dead, live, legacy_old, legacy_new, other):
        p.write_text("partial")
    os.utime(legacy_old, (time.time() - 7200, time.time() - 7200))
    assert sorted(remove_stale(target)) == sorted([dead, legacy_old])
    assert live.exists() and legacy_new.exists() and other.exists()


def test_every_atomic_writer_cleans_up_after_killed_ones(tmp_path):
    pid = dead_pid()
    reel, script, cache = tmp_path / "reel.mp4", tmp_path / "script.json", tmp_path / "smollm2"
    leftovers = [tmp_path / f".reel.mp4.tmp-{pid}-ab.mp4", tmp_path / f".script.json.tmp-{pid}-cd",
                 tmp_path / f".smollm2.tmp-{pid}-ef"]
    leftovers[0].write_bytes(b"half a reel")
    leftovers[1].write_text("{")
    leftovers[2].mkdir()
    (leftovers[2] / "model.safetensors").write_bytes(b"half a model")
    with atomic_path(reel) as tmp:
        assert f".reel.mp4.tmp-{os.getpid()}-" in tmp.name
        tmp.write_bytes(b"reel")
    write_json_atomic(script, {"ok": True})
    with atomic_dir(cache) as tmp:
        (tmp / "model.safetensors").write_bytes(b"model")
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reel.mp4", "script.json", "smollm2"]


def test_count_gives_the_singular_for_one_only():
    """Messages say "1 clip" and "0 videos", not "1 clips" (the CLI summary and the app said so before)."""
    assert [count(n, "clip") for n in (0, 1, 2, 11)] == ["0 clips", "1 clip", "2 clips", "11 clips"]
