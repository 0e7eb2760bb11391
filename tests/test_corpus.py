"""The bad-input corpus (tests/corpus.py, written once per session with PyAV) beside two good videos, through
`atomkit caption`, `index`, `retrieve`, `assemble` (in process, tiny random-weight models) and the app's
open-library path: exit 0, every unreadable file named with its reason, every odd-but-valid one captioned and
in the reel (or dropped from it by name), never a traceback. The tiny model's captions are noise: these tests
check which files were skipped or captioned, by path and clip id, and what the reel's segments show."""
from __future__ import annotations

import html
import json
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from corpus import CAPTIONED, NON_UTF8_NAME, UNREADABLE, Expect, write_corpus
from media import duration, frames_at

from atomkit.cli import main
from atomkit.errors import VideoError
from atomkit.io import printable
from atomkit.media.video import probe
from atomkit.media.scan import scan

TINY = ["--models", "tiny-default", "--device", "cpu", "--max-new-tokens", "4", "--beams", "1", "-q"]
REEL = (640, 360)  # stitch's default frame size
# Clip ids where the stem alone would be ambiguous; every other file's one clip is "<stem>#00".
IDS = {"h264.mkv": "h264.mkv#00", "h264.mov": "h264.mov#00", "day1/GOPR0001.mp4": "day1/GOPR0001#00",
       "day2/GOPR0001.mp4": "day2/GOPR0001#00", "nested/a/b/deep.mp4": "deep#00"}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, samples) -> tuple[Path, dict[str, Expect]]:
    """The corpus and two good sample videos in one folder: (folder, manifest by relative path)."""
    folder = tmp_path_factory.mktemp("corpus") / "videos"
    manifest = write_corpus(folder)
    for name, sample, size in (("bunny.mp4", "bigbuckbunny.mp4", (1280, 720)),
                               ("carphone.mp4", "carphone_pristine.mp4", (176, 144))):
        shutil.copy(samples[sample], folder / name)
        manifest[name] = Expect(CAPTIONED, "a good video", display=size)
    return folder, manifest


def _names(folder: Path, manifest: dict[str, Expect], group: str) -> dict[str, Expect]:
    return {str(folder / name): e for name, e in manifest.items() if e.group == group}


def _clip_id(name: str) -> str:
    return IDS.get(name, f"{Path(name).stem}#00")


def _run(argv: list[str], capsysbinary) -> tuple[int, str, str]:
    """``atomkit ARGV`` in process: (exit status, stdout, stderr), both of which must be valid UTF-8."""
    code = main(argv)
    out, err = capsysbinary.readouterr()
    out, err = out.decode("utf-8"), err.decode("utf-8")  # strict: a name that is not UTF-8 is escaped
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


def _check_skipped(skipped: list[dict], told: str, folder: Path, manifest: dict[str, Expect], *,
                   as_told=lambda s: f"skipped {printable(s['path'])}: {printable(s['reason'])}") -> None:
    """Every unreadable file is skipped once, with its reason, and told the user (``as_told(skip)`` is in
    ``told``: stderr, or the app's page); nothing else is skipped."""
    unreadable = _names(folder, manifest, UNREADABLE)
    assert sorted(s["path"] for s in skipped) == sorted(unreadable)
    for s in skipped:
        assert unreadable[s["path"]].reason in s["reason"], s
        assert as_told(s) in told, s


def test_probe_and_scan_judge_every_corpus_file(corpus):
    folder, manifest = corpus
    found = scan(folder)
    reasons = {str(p): r for p, r in found.problems}
    shown = {}
    for video in found.videos:
        try:
            info = probe(video)
            shown[str(video)] = (info.width, info.height)
        except VideoError as e:
            reasons[str(video)] = e.reason
    assert reasons.keys() == _names(folder, manifest, UNREADABLE).keys()
    for path, e in _names(folder, manifest, UNREADABLE).items():
        assert e.reason in reasons[path], (e.kind, reasons[path])
    assert shown == {path: e.display for path, e in _names(folder, manifest, CAPTIONED).items()}
    assert found.not_videos == 0


def test_caption_skips_the_unreadable_and_captions_the_rest(corpus, tmp_path, capsysbinary):
    folder, manifest = corpus
    code, out, err = _run(["caption", str(folder), "--json", "--out", str(tmp_path), *TINY], capsysbinary)
    assert code == 0
    result = json.loads(out)
    _check_skipped(result["skipped"], err, folder, manifest)
    captioned = {c["video"]: c["id"] for c in result["clips"]}
    assert captioned == {str(folder / n): _clip_id(n) for n, e in manifest.items() if e.group == CAPTIONED}
    assert all(c["caption"] for c in result["clips"])
    # captions.json holds the same, and the name that is not UTF-8 comes back as the bytes on disk
    assert json.loads((tmp_path / "captions.json").read_text(encoding="utf-8")) == {k: v for k, v in result.items() if k != "load"}
    latin = next(c["video"] for c in result["clips"] if c["id"] == _clip_id(NON_UTF8_NAME))
    assert os.fsencode(latin) == os.fsencode(folder / NON_UTF8_NAME) and Path(latin).exists()


@pytest.mark.slow
def test_assemble_writes_a_reel_of_every_readable_clip(corpus, tmp_path, capsysbinary):
    """-k 60: every captioned clip is retrieved, so every odd-but-valid file is stitched or dropped by name. The
    text output (clip ids that are not UTF-8 among them) prints; the summary names the dropped clips."""
    folder, manifest = corpus
    out = tmp_path / "out"
    code, stdout, err = _run(["assemble", str(folder), "--prompt", "make a highlight reel", "-k", "60",
                              "--out", str(out), *TINY], capsysbinary)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [".atomkit", "captions.json", "reel.mp4", "script.json"]
    _check_skipped(json.loads((out / "captions.json").read_text(encoding="utf-8"))["skipped"], err, folder, manifest)
    script = json.loads((out / "script.json").read_text(encoding="utf-8"))
    assert f"{printable(_clip_id(NON_UTF8_NAME))} " in stdout
    summary = next(line for line in stdout.splitlines() if line.startswith("wrote "))
    assert (f"{len(script['reel']['segments'])} clips; dropped 2 that could not be read: "
            + ", ".join(d["clip_id"] for d in script["dropped"])) in summary

    captioned = _names(folder, manifest, CAPTIONED)
    dropped = {d["video"]: d for d in script["dropped"]}
    assert dropped.keys() == {p for p, e in captioned.items() if e.dropped}
    for path, d in dropped.items():
        assert captioned[path].dropped in d["reason"] and d["clip_id"] == _clip_id(os.path.relpath(path, folder))
        assert f"dropped {d['clip_id']} ({printable(path)}) from the reel: " in err
    segments = script["reel"]["segments"]
    assert sorted(s["video"] for s in segments) == sorted(p for p, e in captioned.items() if not e.dropped)
    assert sorted(s["clip_id"] for s in segments) == sorted(
        _clip_id(os.path.relpath(p, folder)) for p, e in captioned.items() if not e.dropped)
    assert duration(out / "reel.mp4") == pytest.approx(sum(s["end_s"] - s["start_s"] for s in segments), abs=0.25)

    # each segment shows its own source, upright and fitted into the reel without stretching
    colours = {p: e.colour for p, e in captioned.items() if e.colour}
    mids = [(s["out_start_s"] + s["out_end_s"]) / 2 for s in segments]
    for s, frame in zip(segments, frames_at(out / "reel.mp4", mids)):
        lit = np.nonzero(frame.max(axis=-1) > 24)
        top, bottom, left, right = lit[0].min(), lit[0].max() + 1, lit[1].min(), lit[1].max() + 1
        w, h = captioned[s["video"]].display
        scale = min(REEL[0] / w, REEL[1] / h)
        assert (right - left, bottom - top) == pytest.approx((w * scale, h * scale), abs=3), s["clip_id"]
        if s["video"] not in colours:
            continue
        picture = frame[top:bottom, left:right].reshape(-1, 3).astype(int)
        seen = np.median(frame[top:bottom, (left + right) // 2:right].reshape(-1, 3), axis=0)
        nearest = min(colours, key=lambda p: np.abs(seen - colours[p]).sum())
        assert nearest == s["video"], (s["clip_id"], seen)
        if s["video"].endswith("rotated.mp4"):  # the white left third of the coded frame is shown at the bottom
            third = len(picture) // 3
            assert picture[-third:].mean() > 200 and picture[:third].mean() < 150


def test_index_records_the_unreadable_and_retrieve_reads_the_library(corpus, tmp_path, capsysbinary):
    folder, manifest = corpus
    db = tmp_path / "lib.db"
    code, out, err = _run(["index", str(folder), "--db", str(db), "--json", *TINY], capsysbinary)
    assert code == 0
    result = json.loads(out)
    _check_skipped(result["skipped"], err, folder, manifest)
    captioned = _names(folder, manifest, CAPTIONED)
    assert sorted(result["captioned"]) == sorted(captioned)
    probed_unreadable = [p for p, e in _names(folder, manifest, UNREADABLE).items()
                         if Path(p).is_file() and not p.endswith(".m4a")]  # scan reports the others itself
    assert result["counts"] == {"videos": len(captioned) + len(probed_unreadable),
                                "unreadable": len(probed_unreadable), "clips": len(captioned), "configs": 1, "pending": 0}

    code, out, err = _run(["retrieve", str(folder), "--db", str(db), "--query", "a red picture", "-k", "3",
                           "--json", *TINY], capsysbinary)
    assert code == 0
    result = json.loads(out)
    _check_skipped(result["skipped"], err, folder, manifest)
    assert [h["rank"] for h in result["hits"]] == [1, 2, 3] and {h["video"] for h in result["hits"]} <= set(captioned)
    assert "nothing to caption" in err


@pytest.mark.slow
def test_the_app_opens_the_corpus_and_renders_without_the_unreadable(corpus, tiny_session, tmp_path):
    from atomkit.app import AssemblyApp

    folder, manifest = corpus
    app = AssemblyApp(tiny_session, folder, out_dir=tmp_path / "app")
    app.wait(600)
    st = app.state
    assert not st.error and "clips from" in st.message
    assert f"{len(_names(folder, manifest, UNREADABLE))} skipped" in st.message
    assert sorted(c.id for c in st.clips) == sorted(
        _clip_id(n) for n, e in manifest.items() if e.group == CAPTIONED)
    # the page lists every skipped file with its reason, and shows the name that is not UTF-8 escaped
    page = "".join(c.value for c in _html_widgets(app.widget))
    page.encode("utf-8")  # valid UTF-8: it goes to the browser
    _check_skipped([s.to_dict() for s in st.skipped], page, folder, manifest,
                   as_told=lambda s: f"<code>{html.escape(s['path'])}</code>: {html.escape(s['reason'])}")
    assert "caf\\udce9 latin-1#00" in page
    # a reel of the rotated clip and of live.mkv, which moviepy cannot read: made from the first, names the second
    app.search("anything", k=60)
    keep = {_clip_id("rotated.mp4"), _clip_id("live.mkv")}
    for cid in app.edit.ids():
        app.change(app.edit.include, cid, cid in keep)
    app.render()
    app.wait(600)
    assert not app.state.error, app.state.message
    assert "rendered 1 clip," in app.state.message and "dropped live#00: moviepy cannot read it" in app.state.message
    assert [s["clip_id"] for s in app.state.reel_info["segments"]] == ["rotated#00"]
    script = json.loads(app.state.outputs["script"].read_text(encoding="utf-8"))
    assert [d["clip_id"] for d in script["dropped"]] == ["live#00"]
    app.close()


def _html_widgets(widget):
    if hasattr(widget, "value") and isinstance(widget.value, str) and "<" in widget.value:
        yield widget
    for child in getattr(widget, "children", ()):
        yield from _html_widgets(child)


def test_a_4k_source_never_reaches_python_at_full_size(corpus, tmp_path):
    """Frames are scaled while they are decoded (PyAV's converter; ffmpeg for the reel): the Python heap (numpy
    arrays, pipe buffers) never holds a 3840x2160 RGB frame while sampling, thumbnailing, previewing or
    stitching the 4K clip."""
    from atomkit.media.stitch import stitch
    from atomkit.media.video import clips, sample_frames
    from atomkit.media.preview import preview, thumbnail

    folder, _ = corpus
    video = folder / "4k.mp4"
    clip = clips(video)[0]
    full_frame = 3840 * 2160 * 3
    for name, work in (("sample_frames", lambda: sample_frames(clip)),
                       ("thumbnail", lambda: thumbnail(video, 0.1)),
                       ("preview", lambda: preview(video, 0.0, 0.3, tmp_path / "p.mp4")),
                       ("stitch", lambda: stitch([clip], tmp_path / "reel.mp4", audio=False))):
        tracemalloc.start()
        try:
            work()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < full_frame, f"{name}: {peak / 2**20:.1f} MiB traced, a full frame is {full_frame / 2**20:.1f} MiB"
