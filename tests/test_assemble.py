"""Stitching clips into a reel (moviepy) and atomic file output, on tiny synthetic videos."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from atomkit.media.stitch import stitch
from atomkit.errors import AssemblyError, InputError
from atomkit.io import atomic_dir, atomic_path, write_json_atomic

RED, BLUE = (255, 0, 0), (0, 0, 255)


@dataclass(frozen=True)
class FakeClip:
    """Stand-in for atomkit.media.video.Clip: the attributes stitch() reads."""

    video: Path
    index: int
    start_s: float
    end_s: float

    @property
    def id(self) -> str:
        return f"{self.video.stem}#{self.index:02d}"


def make_video(path: Path, size, color, *, seconds=3.0, fps=10, audio=False) -> Path:
    """A solid-colour H.264 mp4, optionally with a 440 Hz AAC tone."""
    w, h = size
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        astream = out.add_stream("aac", rate=44100, layout="mono") if audio else None
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = color
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(vs.encode(frame))
        out.mux(vs.encode())
        if astream is not None:
            n = int(seconds * 44100)
            pcm = (0.2 * np.sin(2 * np.pi * 440 * np.arange(n) / 44100)).astype(np.float32)
            for s in range(0, n, 1024):
                frame = av.AudioFrame.from_ndarray(pcm[None, s:s + 1024], format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 44100, s, Fraction(1, 44100)
                out.mux(astream.encode(frame))
            out.mux(astream.encode())
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    red = make_video(d / "red.mp4", (64, 48), RED, audio=True)  # 4:3, with audio
    blue = make_video(d / "blue.mp4", (80, 80), BLUE)  # square, no audio
    return red, blue


def probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        info = {"width": v.width, "height": v.height, "duration": c.duration / 1e6,
                "rate": float(v.average_rate), "frames": frames, "audio": len(c.streams.audio)}
    if info["audio"]:
        with av.open(str(path)) as c:
            info["pcm"] = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    return info


def leftovers(folder: Path, keep=()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def near(a, b, tol=12):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def test_stitch_letterboxes_and_concatenates_in_order(sources, tmp_path):
    red, blue = sources
    clips = [FakeClip(red, 0, 0.5, 1.5), FakeClip(blue, 1, 1.0, 2.5), FakeClip(red, 2, 2.0, 5.0)]
    out = tmp_path / "reel" / "out.mp4"  # parent is created
    summary = stitch(clips, out, size=(96, 64))

    # last clip is clamped to the end of its 3 s source
    expected = [(0.5, 1.5), (1.0, 2.5), (2.0, 3.0)]
    total = sum(e - s for s, e in expected)
    assert summary["path"] == str(out)
    assert summary["n_clips"] == 3
    assert summary["size"] == [96, 64]
    assert summary["fps"] == 10.0
    assert summary["duration_s"] == pytest.approx(total)
    segs = summary["segments"]
    assert [s["clip_id"] for s in segs] == ["red#00", "blue#01", "red#02"]
    assert [(s["start_s"], s["end_s"]) for s in segs] == expected
    assert segs[0]["out_start_s"] == 0.0
    for a, b in zip(segs, segs[1:]):
        assert b["out_start_s"] == pytest.approx(a["out_end_s"])
    for s in segs:
        assert s["out_end_s"] - s["out_start_s"] == pytest.approx(s["end_s"] - s["start_s"])
    assert segs[-1]["out_end_s"] == pytest.approx(summary["duration_s"])
    json.dumps(summary)  # JSON-ready

    info = probe(out)
    assert (info["width"], info["height"]) == (96, 64)
    assert info["duration"] == pytest.approx(total, abs=0.25)
    assert len(info["frames"]) == pytest.approx(total * 10, abs=2)
    # colours in order: red (1 s) | blue (1.5 s) | red (1 s); bars are black
    f_red, f_blue, f_red2 = info["frames"][5], info["frames"][17], info["frames"][30]
    assert near(f_red[32, 48], RED) and near(f_blue[32, 48], BLUE) and near(f_red2[32, 48], RED)
    assert near(f_blue[32, 4], (0, 0, 0))  # 80x80 -> 64x64: 16 px bars left and right
    assert near(f_red[32, 2], (0, 0, 0))  # 64x48 -> 85x64: ~5 px bars left and right
    # audio: the tone where the red clips play, silence over the blue (audio-less) clip
    assert info["audio"] == 1
    pcm, sr = info["pcm"], 44100
    assert np.abs(pcm[:, int(0.1 * sr):int(0.9 * sr)]).max() > 0.05
    assert np.abs(pcm[:, int(1.2 * sr):int(2.3 * sr)]).max() < 0.01
    assert np.abs(pcm[:, int(2.6 * sr):int(3.4 * sr)]).max() > 0.05
    assert leftovers(out.parent) == ["out.mp4"]


def test_stitch_without_audio_and_explicit_fps(sources, tmp_path):
    red, blue = sources
    out = tmp_path / "silent.mp4"
    summary = stitch([FakeClip(blue, 0, 0.0, 1.0), FakeClip(red, 1, 1.0, 2.0)], out,
                     size=(64, 64), fps=5, audio=False)
    info = probe(out)
    assert info["audio"] == 0
    assert summary["fps"] == 5.0 and info["rate"] == pytest.approx(5.0)
    assert (info["width"], info["height"]) == (64, 64)
    assert info["duration"] == pytest.approx(2.0, abs=0.25)


def test_unreadable_source_is_dropped_and_the_reel_made_from_the_rest(sources, tmp_path):
    red, blue = sources
    bad = tmp_path / "src" / "broken.mp4"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a video")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    summary = stitch([FakeClip(red, 0, 0.0, 1.0), FakeClip(bad, 0, 0.0, 1.0), FakeClip(blue, 2, 0.0, 1.0)],
                     out_dir / "out.mp4", size=(96, 64), audio=False)
    assert [s["clip_id"] for s in summary["segments"]] == ["red#00", "blue#02"]
    assert [(d["clip_id"], d["video"]) for d in summary["dropped"]] == [("broken#00", str(bad))]
    assert "not a readable video file" in summary["dropped"][0]["reason"]
    frames = probe(out_dir / "out.mp4")["frames"]
    assert len(frames) == pytest.approx(20, abs=2)
    assert near(frames[5][32, 48], RED) and near(frames[15][32, 48], BLUE)
    assert leftovers(out_dir) == ["out.mp4"]


def test_every_source_unreadable_is_an_assembly_error_naming_each_and_leaves_nothing(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    photo = tmp_path / "photo.mp4"
    from PIL import Image

    Image.new("RGB", (64, 48), RED).save(photo, format="JPEG")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(AssemblyError) as err:
        stitch([FakeClip(text, 0, 0.0, 1.0), FakeClip(photo, 3, 0.0, 1.0)], out_dir / "out.mp4", size=(96, 64))
    assert "notes#00" in str(err.value) and "photo#03" in str(err.value) and "still image" in str(err.value)
    assert leftovers(out_dir) == []


def test_a_source_moviepy_cannot_read_is_dropped(sources, tmp_path):
    """A Matroska file written without a duration (as a live recorder leaves it): PyAV probes and decodes it,
    moviepy 2.1.2 cannot open it. Its clip is dropped with moviepy's reason and the fix, the rest is stitched."""
    from corpus import write_video as write_any

    from atomkit.media.video import probe as av_probe

    red, _ = sources
    live = write_any(tmp_path / "live.mkv", container_options={"live": "1"})
    assert av_probe(live).duration_s == pytest.approx(1.0)
    summary = stitch([FakeClip(live, 0, 0.0, 1.0), FakeClip(red, 1, 1.0, 2.0)], tmp_path / "out.mp4",
                     size=(96, 64), audio=False)
    assert [s["clip_id"] for s in summary["segments"]] == ["red#01"]
    assert summary["dropped"] == [{"clip_id": "live#00", "video": str(live), "reason":
                                   "moviepy cannot read it (OSError: MoviePy error: failed to read the duration of "
                                   f"file '{live}'.); rewriting it into an mp4 may help: `ffmpeg -i IN -c copy OUT.mp4`"}]
    assert summary["duration_s"] == pytest.approx(1.0)
    assert near(probe(tmp_path / "out.mp4")["frames"][5][32, 48], RED)


def test_write_failure_leaves_no_partial_file_and_keeps_the_old_reel(sources, tmp_path, monkeypatch):
    from moviepy.video.VideoClip import VideoClip

    def broken_write(self, filename, **kwargs):
        assert Path(filename).suffix == ".mp4" and Path(filename).parent == tmp_path
        Path(filename).write_bytes(b"half an mp4")
        raise OSError("disk full")

    monkeypatch.setattr(VideoClip, "write_videofile", broken_write)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous reel")
    with pytest.raises(AssemblyError, match="disk full") as err:
        stitch([FakeClip(sources[1], 0, 0.0, 1.0)], out, size=(96, 64))
    assert str(out) in str(err.value)
    assert isinstance(err.value.__cause__, OSError)
    assert out.read_bytes() == b"previous reel"
    assert leftovers(tmp_path) == ["out.mp4"]


def test_bad_arguments_are_input_errors(sources, tmp_path):
    red, _ = sources
    with pytest.raises(InputError, match="no clips"):
        stitch([], tmp_path / "out.mp4")
    with pytest.raises(InputError, match="even"):
        stitch([FakeClip(red, 0, 0.0, 1.0)], tmp_path / "out.mp4", size=(95, 64))
    with pytest.raises(InputError, match="red#04"):
        stitch([FakeClip(red, 4, 3.5, 4.5)], tmp_path / "out.mp4", size=(96, 64))
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- io


def test_write_json_atomic(tmp_path):
    path = tmp_path / "a" / "b" / "script.json"
    obj = {"narration": "été — ok", "n": [1, 2]}
    assert write_json_atomic(path, obj) == path
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    write_json_atomic(path, {"n": 3})  # overwrite
    assert json.loads(path.read_text()) == {"n": 3}
    assert leftovers(path.parent) == ["script.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_names_that_are_not_utf8_round_trip_through_json(tmp_path):
    """A Latin-1 file name (bytes, as the OS gives them) is written as valid UTF-8 JSON and read back to the
    same bytes; a name that spells a backslash escape itself stays apart from it."""
    raw = [b"caf\xe9 latin-1.mp4", b"\\udce9 literal.mp4", "日本 ü.mp4".encode()]
    names = [os.fsdecode(b) for b in raw]
    path = write_json_atomic(tmp_path / "names.json", {"videos": names})
    data = path.read_bytes()
    text = data.decode("utf-8")  # valid UTF-8 (strict)
    assert "\\udce9 latin-1.mp4" in text and "日本 ü.mp4" in text
    assert [os.fsencode(n) for n in json.loads(text)["videos"]] == raw


def test_write_json_atomic_failure_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "script.json"
    write_json_atomic(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})  # not serialisable, fails mid-write
    assert json.loads(path.read_text()) == {"ok": True}
    assert leftovers(tmp_path) == ["script.json"]


def test_atomic_path_success(tmp_path):
    path = tmp_path / "sub" / "reel.mp4"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent
        assert tmp.suffix == ".mp4" and tmp.name.startswith(".reel.mp4.tmp-")
        assert not path.exists()
        tmp.write_bytes(b"data")
    assert path.read_bytes() == b"data"
    assert not tmp.exists()
    assert leftovers(path.parent) == ["reel.mp4"]


def test_atomic_path_exception_removes_temp_and_propagates(tmp_path):
    path = tmp_path / "reel.mp4"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not tmp.exists()
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == ["reel.mp4"]


def test_atomic_dir_replaces_the_folder_or_leaves_it(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(folder) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("boom")
    assert sorted(p.name for p in folder.iterdir()) == ["old.txt"] and leftovers(tmp_path) == ["model"]
    with atomic_dir(folder) as tmp:
        assert tmp.parent == tmp_path and not (tmp / "old.txt").exists()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["new.txt"] and leftovers(tmp_path) == ["model"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_rotated_and_portrait_sources_are_upright_and_pillarboxed(tmp_path):
    """A 64x48 frame tagged to be shown turned 90 degrees counter-clockwise is a 48x64 portrait picture whose
    left third (white) is at the bottom: in a 96x64 reel it is 48 px wide and centred, with black bars beside
    it, never stretched to 4:3. A 4K source is scaled into the reel the same way."""
    from corpus import write_video as write_tagged

    colour = (40, 40, 160)
    rotated = write_tagged(tmp_path / "rotated.mp4", rotation=90, colour=colour)
    wide = write_tagged(tmp_path / "4k.mp4", size=(3840, 2160), frames=3, colour=colour)
    summary = stitch([FakeClip(rotated, 0, 0.0, 1.0), FakeClip(wide, 0, 0.0, 0.3)], tmp_path / "reel.mp4",
                     size=(96, 64), audio=False)
    assert summary["dropped"] == []
    frames = probe(tmp_path / "reel.mp4")["frames"]
    f = frames[5].astype(int)  # the rotated clip
    lit = np.nonzero(f.mean(axis=(0, 2)) > 20)[0]
    assert (lit[0], lit[-1]) == pytest.approx((24, 71), abs=1)  # 48 px wide, centred: bars of 24 px
    assert near(f[60, 48], (255, 255, 255), tol=30) and near(f[10, 48], colour, tol=30)  # white at the bottom
    g = frames[-1].astype(int)  # the 4K clip: 16:9 into 3:2, letterboxed (96x54, 5 px bars)
    assert near(g[32, 48], colour, tol=30) and near(g[1, 48], (0, 0, 0)) and near(g[32, 10], (255, 255, 255), tol=30)
