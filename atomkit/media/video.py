"""Video probing, windowing into clips and frame sampling (with ``preview`` and ``scan``, the only modules that
read video files).

Every failure to open, probe or decode a file is raised as ``VideoError`` naming the file.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from atomkit.config import WindowConfig
from atomkit.errors import VideoError
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


def _clock(stream) -> tuple[Fraction, float]:
    """A stream's time base and its start time in seconds (frame times count from there)."""
    tb = stream.time_base or Fraction(1, av.time_base)
    return tb, float(stream.start_time * tb) if stream.start_time is not None else 0.0


def _converter(fit: str, size: int) -> Callable:
    """A frame -> RGB array of ``size`` x ``size``: the whole frame resized, or (``crop``) a centre crop."""
    if fit not in ("crop", "whole"):
        raise ValueError(f"fit must be 'crop' or 'whole', got {fit!r}")
    return (lambda f: _to_square_rgb(f, size)) if fit == "crop" else (lambda f: _display_rgb(f, size, size))


def _pick_frames(container, targets: list[float], convert: Callable, seek: bool) -> list | None:
    """``convert(frame)`` of the frame shown at each of ``targets`` (s from stream start); None if seeking went
    wrong."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    tb, t0 = _clock(stream)
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
    convert = _converter(cfg.fit if fit is None else fit, cfg.size)
    picked = _frames_at(Path(clip.video), frame_times(clip, cfg.frames), convert,
                        f"clip {clip.start_s:.3f}-{clip.end_s:.3f} s")
    array = np.stack(picked)  # (T, H, W, 3)
    return torch.from_numpy(array).permute(3, 0, 1, 2).unsqueeze(0).contiguous()


def glance_frame(clip: Clip, cfg: WindowConfig = WindowConfig(), *, fit: str | None = None) -> torch.Tensor:
    """One frame for a first look at a clip (search-first indexing): the keyframe at or before the clip's middle
    where it lies inside the clip, so nothing past it is decoded (phone cameras write a keyframe about every
    second); else the middle frame as ``sample_frames`` finds it. Shape ``(1, 3, 1, size, size)``, as
    ``sample_frames`` with one frame."""
    convert = _converter(cfg.fit if fit is None else fit, cfg.size)
    path, middle, picked = Path(clip.video), (clip.start_s + clip.end_s) / 2, None
    _check_file(path)
    try:
        with av.open(str(path)) as container:
            if container.streams.video:
                stream = container.streams.video[0]  # one frame: no frame threads (they buffer frames first)
                tb, t0 = _clock(stream)
                container.seek(int((middle + t0) / tb), stream=stream, backward=True)
                frame = next(container.decode(stream), None)
                if frame is not None and frame.time is not None and clip.start_s - _EPS <= frame.time - t0 <= middle + _EPS:
                    picked = convert(frame)
    except (*_AV_ERRORS, StopIteration):
        picked = None
    if picked is None:
        return sample_frames(clip, replace(cfg, frames=1), fit=fit)
    return torch.from_numpy(picked[None]).permute(3, 0, 1, 2).unsqueeze(0).contiguous()


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
