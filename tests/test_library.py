"""The video library (SQLite) and incremental indexing, on the tiny random-weight model and real sample videos.
The tiny model's captions are noise; these tests check what is stored, what is captioned again and what not."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import atomkit
from atomkit.retrieval.indexing import load_index, update
from atomkit.retrieval.library import Library, LibraryError
from atomkit.media.scan import unique_ids


@pytest.fixture
def lib(tmp_path):
    with Library(tmp_path / "lib.db") as library:
        yield library


@pytest.fixture
def folder(tmp_path, samples):
    f = tmp_path / "videos"
    f.mkdir()
    for name in ("bigbuckbunny.mp4", "carphone_pristine.mp4"):
        shutil.copy(samples[name], f / name)
    return f


def _fresh_tiny(tiny_session) -> atomkit.Session:
    """A new session with the same configuration as the shared tiny one (so it reads the same clips)."""
    return atomkit.Session("tiny-default", device="cpu", decode=tiny_session.decode, window=tiny_session.window)


def test_second_run_captions_nothing_and_a_query_needs_only_the_embedder(tiny_session, lib, folder):
    first = update(tiny_session, lib, [folder])
    assert sorted(Path(p).name for p in first.captioned) == ["bigbuckbunny.mp4", "carphone_pristine.mp4"]
    assert first.clips_new == 2 and lib.counts()["clips"] == 2
    with _fresh_tiny(tiny_session) as s:
        again = update(s, lib, [folder])
        assert again.captioned == [] and len(again.cached) == 2 and "nothing to caption" in again.summary()
        hits = s.retrieve(load_index(s, lib), "a cartoon rabbit", k=2)
        assert sorted(h.clip.id for h in hits) == ["bigbuckbunny#00", "carphone_pristine#00"]
        assert s.loaded() == ["embedder"]  # no video decoded, no encoder or decoder loaded


def test_stored_clips_are_what_captioning_gave(tiny_session, lib, folder):
    update(tiny_session, lib, [folder])
    # one video at a time, as the indexer captions them (a caption may depend on the clips batched with it)
    direct = {c.id: c for v in sorted(folder.iterdir()) for c in tiny_session.caption([v]).clips}
    stored = load_index(tiny_session, lib)
    assert {c.id for c in stored.captions.clips} == set(direct)
    for c in stored.captions.clips:
        d = direct[c.id]
        assert (c.caption, c.clip.start_s, c.clip.end_s) == (d.caption, d.clip.start_s, d.clip.end_s)
        assert [lbl for lbl, _ in c.concepts] == [lbl for lbl, _ in d.concepts]
    from atomkit.retrieval.ranking import clip_vectors

    embedded = clip_vectors(tiny_session.embedder, stored.captions.clips)  # what indexing embeds
    assert (stored.vectors - embedded).abs().max() < 1e-5


@pytest.mark.slow
def test_same_file_names_in_two_folders_get_distinct_ids(tiny_session, lib, tmp_path, samples):
    for day, src in (("day1", "bikes.mp4"), ("day2", "bigbuckbunny.mp4")):
        (tmp_path / "cam" / day).mkdir(parents=True)
        shutil.copy(samples[src], tmp_path / "cam" / day / "GOPR0001.MP4")
    days = [tmp_path / "cam" / "day1", tmp_path / "cam" / "day2"]
    update(tiny_session, lib, days)
    idx = load_index(tiny_session, lib)
    assert sorted(c.id for c in idx.captions.clips) == ["day1/GOPR0001#00", "day2/GOPR0001#00"]
    caps = tiny_session.caption(days)  # without a library too
    assert sorted(c.id for c in caps.clips) == ["day1/GOPR0001#00", "day2/GOPR0001#00"]
    asm = tiny_session.assemble(idx, "make a highlight reel", tmp_path / "out", k=2)
    assert sorted(asm.script.order) == ["day1/GOPR0001#00", "day2/GOPR0001#00"]  # both used, none rejected
    assert {Path(s["video"]).parent.name for s in asm.reel_info["segments"]} == {"day1", "day2"}


def test_unique_ids():
    got = unique_ids([Path("/a/day1/G1.mp4"), Path("/a/day2/G1.mp4"), Path("/a/x.mp4"), Path("/b/day1/G1.mp4")])
    assert got == {Path("/a/day1/G1.mp4"): "a/day1/G1", Path("/a/day2/G1.mp4"): "day2/G1", Path("/a/x.mp4"): "x",
                   Path("/b/day1/G1.mp4"): "b/day1/G1"}
    same_stem = [Path("/v/h264.mkv"), Path("/v/h264.mov"), Path("/w/h264.mkv"), Path("/v/other.mp4")]
    assert unique_ids(same_stem) == {Path("/v/h264.mkv"): "v/h264.mkv", Path("/v/h264.mov"): "h264.mov",
                                     Path("/w/h264.mkv"): "w/h264", Path("/v/other.mp4"): "other"}


def test_moved_file_keeps_its_clips_and_a_changed_one_is_captioned_again(tiny_session, lib, folder, samples):
    update(tiny_session, lib, [folder])
    before = {c.caption for c in load_index(tiny_session, lib).captions.clips}
    (folder / "sub").mkdir()
    os.rename(folder / "bigbuckbunny.mp4", folder / "sub" / "bunny-renamed.mp4")
    moved = update(tiny_session, lib, [folder, folder / "sub"])
    assert moved.captioned == [] and [Path(new).name for _, new in moved.moved] == ["bunny-renamed.mp4"]
    assert moved.pruned == [] and lib.counts() == {"videos": 2, "unreadable": 0, "clips": 2, "configs": 1, "pending": 0}
    assert {c.caption for c in load_index(tiny_session, lib).captions.clips} == before
    shutil.copy(samples["bikes.mp4"], folder / "carphone_pristine.mp4")  # same name, new content
    changed = update(tiny_session, lib, [folder, folder / "sub"])
    assert [Path(p).name for p in changed.captioned] == ["carphone_pristine.mp4"]
    row = lib.video((folder / "carphone_pristine.mp4").resolve())
    assert abs(row.duration_s - 10.0) < 0.1  # bikes' duration now


def test_deleted_files_are_pruned(tiny_session, lib, folder):
    update(tiny_session, lib, [folder])
    (folder / "carphone_pristine.mp4").unlink()
    report = update(tiny_session, lib, [folder])
    assert [Path(p).name for p in report.pruned] == ["carphone_pristine.mp4"]
    assert lib.counts()["videos"] == 1 and lib.counts()["clips"] == 1


def test_unreadable_file_is_recorded_and_retried_only_when_it_changes(tiny_session, lib, folder, samples, monkeypatch):
    bad = folder / "broken.mp4"
    bad.write_bytes(samples["bikes.mp4"].read_bytes()[:3000])
    first = update(tiny_session, lib, [folder])
    assert [Path(s.path).name for s in first.skipped] == ["broken.mp4"] and lib.counts()["unreadable"] == 1
    import atomkit.retrieval.indexing as indexing

    def no_captioning(*a, **k):
        raise AssertionError("an unchanged unreadable file was opened again")

    monkeypatch.setattr(indexing, "caption", no_captioning)
    again = update(tiny_session, lib, [folder])
    assert [Path(s.path).name for s in again.skipped] == ["broken.mp4"] and again.captioned == []
    monkeypatch.undo()
    shutil.copy(samples["carphone_distorted.mp4"], bad)  # repaired
    fixed = update(tiny_session, lib, [folder])
    assert [Path(p).name for p in fixed.captioned] == ["broken.mp4"] and lib.counts()["unreadable"] == 0


def test_another_configuration_is_captioned_apart(tiny_session, lib, folder):
    update(tiny_session, lib, [folder])
    with atomkit.Session("tiny-default", device="cpu", decode=atomkit.DecodeConfig(max_new_tokens=3, num_beams=1)) as other:
        report = update(other, lib, [folder])
        assert len(report.captioned) == 2  # never mixed with the first configuration's clips
        assert len(load_index(other, lib).captions.clips) == 2
    assert lib.counts()["configs"] == 2 and lib.counts()["clips"] == 4
    assert len(load_index(tiny_session, lib).captions.clips) == 2


def test_a_library_indexed_with_other_concept_sources_is_captioned_again(tiny_session, lib, folder, monkeypatch):
    """A library made before the detector joined the concepts: its clips are another configuration's."""
    import atomkit.models.detector as detector

    update(tiny_session, lib, [folder])
    monkeypatch.setattr(detector, "CONCEPTS", "imagenet-classifier/0")
    report = update(tiny_session, lib, [folder])
    assert len(report.captioned) == 2 and lib.counts()["configs"] == 2


def test_schema_versions_and_foreign_files(tmp_path):
    path = tmp_path / "lib.db"
    Library(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(LibraryError, match="newer atomkit"):
        Library(path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LibraryError, match="junk.db"):
        Library(junk)


TINY_CLI = ["--models", "tiny-default", "--device", "cpu", "--max-new-tokens", "4", "--beams", "1", "-q"]


def _done(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM done").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.slow
def test_kill_9_then_the_same_command_loses_and_duplicates_nothing(tmp_path, samples):
    folder = tmp_path / "many"
    folder.mkdir()
    srcs = ["carphone_pristine.mp4", "carphone_distorted.mp4", "bigbuckbunny.mp4"]
    for n in range(8):
        shutil.copy(samples[srcs[n % 3]], folder / f"v{n}.mp4")
    db = tmp_path / "lib.db"
    cmd = [sys.executable, "-m", "atomkit.cli", "index", str(folder), "--db", str(db), "--json", *TINY_CLI]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ATOMKIT_CACHE": os.environ.get("ATOMKIT_CACHE", "")}
    env = {k: v for k, v in env.items() if v}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while _done(db) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # a reader while the indexer writes (WAL)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    killed_at = _done(db)
    assert 2 <= killed_at < 8, proc.stderr.read().decode()[-2000:]
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        partial = c.execute("SELECT COUNT(*) FROM clips").fetchone()[0]
    assert partial == killed_at  # whole videos (one clip each) or none

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    report = json.loads(again.stdout)
    assert len(report["captioned"]) == 8 - killed_at and len(report["cached"]) == killed_at
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM videos").fetchone()[0] == 8
        assert c.execute("SELECT COUNT(*) FROM clips").fetchone()[0] == 8
        assert c.execute("SELECT COUNT(DISTINCT video_id) FROM clips").fetchone()[0] == 8


def test_app_opens_folders_through_the_library(tiny_session, lib, folder, tmp_path):
    from atomkit.app import AssemblyApp

    first = AssemblyApp(tiny_session, folder, out_dir=tmp_path / "o1", library=lib)
    first.wait(300)
    assert not first.state.error and len(first.state.clips) == 2, first.state.message
    first.close()
    with _fresh_tiny(tiny_session) as s:
        app = AssemblyApp(s, folder, out_dir=tmp_path / "o2", library=lib)
        app.wait(300)
        assert len(app.state.clips) == 2 and app.search("a cartoon rabbit", k=2)
        assert s.loaded() == ["embedder"]  # read from the library: nothing captioned again
        app.change(app.edit.move, app.edit.ids()[1], -1)
        order = app.edit.ids()
        assert app.render() and app.wait(300) and not app.state.error, app.state.message
        assert [e["clip_id"] for e in json.loads((tmp_path / "o2" / "script.json").read_text())["entries"]] == order
        app.close()


def test_bench_library_json(tiny_session, folder):
    from atomkit.bench.library import run

    result = run(tiny_session, [folder], sizes=(500, 2000), repeats=12)
    assert result["videos"] == 2 and result["library"]["clips"] == 2
    assert result["first_index"]["clips_new"] == 2 and result["speedup"] > 1
    assert len(result["rerun_s"]["samples"]) == 5
    assert [s["clips"] for s in result["search_at_scale"]] == [500, 2000]
    for s in result["search_at_scale"]:
        assert s["synthetic_embeddings"] and s["agrees_with_numpy"] and s["n"] == 12
        assert 0 < s["p50_ms"] <= s["p99_ms"]
    assert result["query_on_library"]["embed_query_and_rank"]["n"] == 20


def test_cli_index_then_retrieve_from_the_library(folder, tmp_path, capsys):
    from atomkit.cli import main

    db = str(tmp_path / "cli.db")
    assert main(["index", str(folder), "--db", db, "--json", *TINY_CLI]) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(first["captioned"]) == 2 and first["counts"]["clips"] == 2
    assert main(["retrieve", "--db", db, "--query", "a cartoon rabbit", "-k", "2", "--json", *TINY_CLI]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(h["id"] for h in out["hits"]) == ["bigbuckbunny#00", "carphone_pristine#00"]
    assert list(out["load"]) == ["embedder"]
    assert main(["retrieve", "--query", "x", *TINY_CLI]) == 2
    assert "give video files or folders, or --db" in capsys.readouterr().err


def test_a_name_that_is_not_utf8_is_stored_and_read_back_unchanged(tiny_session, lib, tmp_path, samples):
    """SQLite text cannot hold a Latin-1 file name: it is stored as its bytes and comes back as the same path,
    so the next run finds it unchanged and an unreadable one is recorded too."""
    folder = tmp_path / "latin"
    folder.mkdir()
    good = folder / os.fsdecode(b"caf\xe9.mp4")
    bad = folder / os.fsdecode(b"cass\xe9.mp4")
    shutil.copy(samples["carphone_pristine.mp4"], good)
    bad.write_text("not a video")
    first = update(tiny_session, lib, [folder])
    assert first.captioned == [str(good.resolve())] and [s.path for s in first.skipped] == [str(bad.resolve())]
    assert sorted(os.fsencode(v.path.name) for v in lib.videos()) == [b"caf\xe9.mp4", b"cass\xe9.mp4"]
    [clip] = load_index(tiny_session, lib).captions.clips
    assert os.fsencode(clip.clip.video) == os.fsencode(good.resolve()) and clip.id == os.fsdecode(b"caf\xe9#00")
    again = update(tiny_session, lib, [folder])
    assert again.captioned == [] and again.cached == [str(good.resolve())]
    assert [(s.path, s.reason) for s in again.skipped] == [(str(bad.resolve()), first.skipped[0].reason)]
    assert lib.counts() == {"videos": 2, "unreadable": 1, "clips": 1, "configs": 1, "pending": 0}
