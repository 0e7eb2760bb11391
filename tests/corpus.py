"""A corpus of bad and odd video inputs, written with PyAV into a folder by the tests (nothing binary is
committed): files atomkit must skip with a reason, and files that are odd but valid and must be captioned.

``write_corpus(folder)`` writes every kind and returns the manifest: the path of each entry relative to
``folder`` (``str``, as ``os.fsdecode`` gives it: a name that is not UTF-8 holds lone surrogates) -> ``Expect``.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

UNREADABLE, CAPTIONED = "unreadable", "captioned"
NON_UTF8_NAME = os.fsdecode(b"caf\xe9 latin-1.mp4")  # a Latin-1 file name: not valid UTF-8
ODD_NAME = "-my clip \u00fc \u65e5\u672c.mp4"  # spaces, unicode and a leading dash


@dataclass(frozen=True)
class Expect:
    """What atomkit must do with one corpus entry.

    Attributes:
        group: ``"unreadable"`` (skipped, with ``reason`` in the message) or ``"captioned"``.
        kind: What the entry is, in words (the before/after table's first column).
        reason: A part of the skip reason (unreadable entries).
        display: ``(width, height)`` as the video is shown, rotation applied (captioned entries).
        dropped: A part of the reason it is left out of a reel (captioned entries moviepy cannot read);
            empty: it is in the reel.
        colour: The background colour of its frames (captioned corpus entries): tells its reel segment apart.
    """

    group: str
    kind: str
    reason: str = ""
    display: tuple[int, int] | None = None
    dropped: str = ""
    colour: tuple[int, int, int] | None = None


def _picture(w: int, h: int, i: int, colour: tuple[int, int, int]) -> np.ndarray:
    """Frame ``i``: a solid colour, a white left third (tells orientation apart) and a grey bar that moves."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = colour
    img[:, : max(1, w // 3)] = 255
    y = (i * max(1, h // 8)) % h
    img[y:y + max(1, h // 8), w // 3:] = 128
    return img


def write_video(path: Path, *, size=(64, 48), frames: int = 10, fps: int = 10, codec: str = "libx264",
                pix_fmt: str = "yuv420p", colour=(40, 90, 200), rotation: int = 0, pts_ms: list[int] | None = None,
                audio: bool = False, options: dict | None = None, container_options: dict | None = None) -> Path:
    """Write a small video with PyAV: ``frames`` pictures at ``fps`` (or at ``pts_ms`` milliseconds: a variable
    frame rate), optionally tagged with a display rotation (counter-clockwise degrees) and with an AAC tone."""
    w, h = size
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", **(options or {})}
        if pts_ms is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        sound = out.add_stream("aac", rate=44100, layout="mono") if audio else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_picture(w, h, i, colour), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            else:
                frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if sound is not None:
            _tone(out, sound, frames / fps)
    return path


def _tone(out, stream, seconds: float) -> None:
    """A 440 Hz tone of ``seconds`` encoded into the audio ``stream`` of ``out``."""
    n = int(seconds * 44100)
    pcm = (0.2 * np.sin(2 * np.pi * 440 * np.arange(n) / 44100)).astype(np.float32)
    for s in range(0, n, 1024):
        frame = av.AudioFrame.from_ndarray(pcm[None, s:s + 1024], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 44100, s, Fraction(1, 44100)
        out.mux(stream.encode(frame))
    out.mux(stream.encode())


def write_audio(path: Path, seconds: float = 1.0) -> Path:
    """An AAC tone in an MP4 container and nothing else (``.m4a`` or ``.mp4``)."""
    with av.open(str(path), "w", format="mp4") as out:
        _tone(out, out.add_stream("aac", rate=44100, layout="mono"), seconds)
    return path


def _boxes(data: bytes, start: int = 0, end: int | None = None):
    """``(type, offset, size)`` of the ISO-BMFF boxes in ``data[start:end]`` (32-bit sizes; what PyAV writes)."""
    end = len(data) if end is None else end
    while start + 8 <= end:
        size, kind = struct.unpack(">I4s", data[start:start + 8])
        yield kind.decode("latin-1"), start, size
        start += size


def _box(data: bytes, *path: str) -> tuple[int, int]:
    """``(offset, size)`` of the box at ``path`` (e.g. ``"moov", "trak", "mdia", ...``), first match each level."""
    start, end = 0, len(data)
    for name in path:
        start, size = next((o, s) for k, o, s in _boxes(data, start, end) if k == name)
        end = start + size
        start += 8
    return start - 8, end - start + 8


_STBL = ("moov", "trak", "mdia", "minf", "stbl")


def _corrupt_index(data: bytes) -> bytes:
    """A faststart mp4 whose chunk offset table (``stco``) points past the end of the file."""
    offset, size = _box(data, *_STBL, "stco")
    count = struct.unpack(">I", data[offset + 12:offset + 16])[0]
    table = struct.pack(f">{count}I", *[0x7FFF0000 + 4096 * k for k in range(count)])
    return data[:offset + 16] + table + data[offset + 16 + 4 * count:]


def write_corpus(folder: str | Path) -> dict[str, Expect]:
    """Write every kind of bad or odd input into ``folder`` (created); returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m: dict[str, Expect] = {}

    def bad(name: str, kind: str, reason: str, data: bytes | None = None) -> Path:
        m[name] = Expect(UNREADABLE, kind, reason)
        path = folder / name
        if data is not None:
            path.write_bytes(data)
        return path

    def good(name: str, kind: str, display=(64, 48), dropped: str = "", **video) -> Path:
        m[name] = Expect(CAPTIONED, kind, display=display, dropped=dropped, colour=video["colour"])
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_video(path, **video)

    scratch = folder / ".scratch"  # hidden: the scan skips it
    scratch.mkdir(exist_ok=True)
    plain = write_video(scratch / "plain.mp4", frames=20)  # moov at the end
    fast = write_video(scratch / "fast.mp4", frames=20, container_options={"movflags": "+faststart"})
    mjpeg = write_video(scratch / "mjpeg.avi", codec="mjpeg", pix_fmt="yuvj420p")

    # -- unreadable: each is skipped with a reason that names the file ---------------------------------------
    bad("zero.mp4", "zero bytes", "empty file", b"")
    bad("random.mp4", "random bytes", "not a readable video", np.random.default_rng(0).bytes(4096))
    bad("notes.mp4", "text named .mp4", "not a readable video", b"shopping list: eggs, milk\n" * 20)
    data = fast.read_bytes()
    mdat, _ = _box(data, "mdat")
    bad("header-only.mp4", "header only (moov, no media data)", "no frame could be decoded", data[:mdat + 8])
    data = plain.read_bytes()
    bad("truncated.mp4", "truncated (moov lost)", "cut short", data[:len(data) * 2 // 3])
    bad("corrupt-index.mp4", "corrupt index (chunk offsets past the end)", "no frame could be decoded",
        _corrupt_index(fast.read_bytes()))
    write_audio(bad("audio-only.mp4", "audio-only .mp4", "audio only"))
    write_audio(bad("voice-memo.m4a", "audio-only .m4a", "audio"))
    os.symlink("gone-missing.mp4", bad("dangling.mp4", "dangling symlink", "dangling symbolic link"))
    bad("folder.mp4", "a folder named like a video", "a folder").mkdir()
    bad("unknown-codec.avi", "unsupported codec (AVI fourcc XQZ9)", "no decoder",
        mjpeg.read_bytes().replace(b"MJPG", b"XQZ9"))
    from PIL import Image
    still = bad("photo.mp4", "a JPEG photo named .mp4", "still image")
    Image.fromarray(_picture(64, 48, 0, (200, 60, 60))).save(still, format="JPEG")

    # -- odd but valid: each is captioned ----------------------------------------------------------------------
    good("one-frame.mp4", "one frame", frames=1, colour=(200, 40, 40))
    good("short.mp4", "0.2 s", frames=2, colour=(40, 200, 40))
    good("one-fps.mp4", "1 fps, 4 s", frames=4, fps=1, colour=(200, 200, 40))
    good("tiny.mp4", "18x10 px", display=(18, 10), size=(18, 10), colour=(40, 200, 200))
    good("portrait.mp4", "portrait 48x64", display=(48, 64), size=(48, 64), colour=(200, 40, 200))
    good("rotated.mp4", "rotation-tagged 90 (64x48 coded, shown 48x64)", display=(48, 64), rotation=90,
         colour=(120, 60, 20))
    good("vfr.mp4", "variable frame rate", pts_ms=[0, 40, 150, 170, 400, 420, 700, 760, 900, 1000],
         colour=(20, 60, 120))
    good("mjpeg.avi", "MJPEG .avi", codec="mjpeg", pix_fmt="yuvj420p", colour=(60, 120, 20))
    good("vp9.webm", "VP9 .webm", codec="libvpx-vp9", colour=(120, 20, 60))
    good("h264.mkv", "H.264 .mkv", colour=(20, 120, 60))
    good("h264.mov", "H.264 .mov", colour=(60, 20, 120))
    good("yuv444.mp4", "yuv444p", pix_fmt="yuv444p", colour=(160, 100, 40))
    good("ten-bit.mp4", "10-bit (yuv420p10le)", pix_fmt="yuv420p10le", colour=(40, 100, 160))
    good("UPPER.MP4", "upper-case .MP4", colour=(100, 160, 40))
    good(ODD_NAME, "spaces, unicode, leading dash", colour=(160, 40, 100))
    good(NON_UTF8_NAME, "a name that is not UTF-8 (Latin-1 bytes)", colour=(100, 40, 160))
    good("4k.mp4", "4K frames (3840x2160, 3 frames)", display=(3840, 2160), size=(3840, 2160), frames=3,
         colour=(180, 180, 180))
    good("nested/a/b/deep.mp4", "nested folders", colour=(90, 90, 30))
    good("day1/GOPR0001.mp4", "same name, other folder (1)", colour=(30, 90, 90))
    good("day2/GOPR0001.mp4", "same name, other folder (2)", colour=(90, 30, 90))
    good("with-audio.mp4", "with an audio track", audio=True, colour=(150, 150, 60))
    # PyAV reads these, moviepy 2.1.2 cannot (ffmpeg reports no duration): captioned, then dropped from a reel
    good("raw.h264", "raw H.264 stream (no container, no duration)", codec="libx264", colour=(60, 150, 150),
         dropped="failed to read the duration")
    good("live.mkv", "Matroska without a duration (as a live recorder leaves it)", colour=(150, 60, 150),
         container_options={"live": "1"}, dropped="failed to read the duration")

    for p in scratch.iterdir():
        p.unlink()
    scratch.rmdir()
    return m
