"""Stitch clips into one mp4 reel with moviepy 2.x.

Every clip is letterboxed into the same frame size (fit inside, aspect kept, black bars, centred),
the clips are concatenated in the given order, and the reel is written through
`io.atomic_path` so an interrupted or failed run never leaves a half-written file behind."""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import AssemblyError, InputError
from .io import atomic_path

if TYPE_CHECKING:
    from .video import Clip

MAX_FPS = 30.0
_MIN_SEGMENT_S = 1e-3  # shorter than this after clamping to the source = nothing to show


def _check_size(size) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError) as e:
        raise InputError(f"reel size must be (width, height), got {size!r}") from e
    if w < 2 or h < 2 or w % 2 or h % 2:
        raise InputError(f"reel size must be even and >= 2 px on each side (H.264 4:2:0), got {w}x{h}")
    return w, h


def _fit(src_size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """Largest size with the aspect of `src_size` that fits inside `box`."""
    (sw, sh), (bw, bh) = src_size, box
    scale = min(bw / sw, bh / sh)
    return max(1, min(bw, round(sw * scale))), max(1, min(bh, round(sh * scale)))


def _clip_id(clip) -> str:
    try:
        return str(clip.id)
    except AttributeError:
        return f"{Path(clip.video).stem}#{clip.index:02d}"


def stitch(
    clips: Sequence["Clip"],
    out_path: str | Path,
    *,
    size: tuple[int, int] = (640, 360),
    fps: float | None = None,
    audio: bool = True,
    logger=None,
) -> dict:
    """Write `clips` (objects with .video, .index, .start_s, .end_s) in order to `out_path` (mp4).

    Each clip is cut from its source at [start_s, min(end_s, source duration)) and letterboxed into
    `size`. `fps` defaults to the highest source fps, capped at 30. Source audio is kept where
    present (clips without audio are silent); `audio=False` writes no audio track. `logger` is
    passed to moviepy (None: silent, "bar": progress bars).

    Returns {"path", "duration_s", "n_clips", "size", "fps", "segments": [{"clip_id", "video",
    "start_s", "end_s", "out_start_s", "out_end_s"}]}.
    Raises InputError for no clips / bad arguments / a clip outside its video, AssemblyError when a
    source cannot be read or the reel cannot be written.
    """
    from moviepy import CompositeVideoClip, VideoFileClip, concatenate_videoclips

    clips = list(clips)
    if not clips:
        raise InputError("no clips to stitch")
    w, h = _check_size(size)
    if fps is not None and not fps > 0:
        raise InputError(f"fps must be > 0, got {fps}")
    out_path = Path(out_path)

    sources: dict[Path, VideoFileClip] = {}  # one reader per source video, shared by its clips
    parts: list = []  # derived clips to close (composites own their background clip)
    try:
        segments, pieces, t = [], [], 0.0
        for clip in clips:
            video = Path(clip.video)
            src = sources.get(video)
            if src is None:
                try:
                    src = sources[video] = VideoFileClip(str(video), audio=audio)
                except Exception as e:  # moviepy raises OSError, KeyError, IndexError, ... for bad input
                    raise AssemblyError(f"{video}: cannot read video ({type(e).__name__}: {e})") from e
            start, end = float(clip.start_s), min(float(clip.end_s), float(src.duration))
            if start < 0 or end - start < _MIN_SEGMENT_S:
                raise InputError(
                    f"clip {_clip_id(clip)}: [{clip.start_s}, {clip.end_s}) s is empty or outside "
                    f"{video} (duration {src.duration:.2f} s)")
            piece = src.without_audio().subclipped(start, end)
            if tuple(piece.size) != (w, h):
                piece = piece.resized(new_size=_fit(tuple(piece.size), (w, h)))
            piece = CompositeVideoClip([piece.with_position("center")], size=(w, h), bg_color=(0, 0, 0))
            parts.append(piece)
            if audio and src.audio is not None:
                # the audio stream can be a few ms shorter than the video; clamp to it
                a_end = min(end, float(src.audio.duration))
                if a_end - start >= _MIN_SEGMENT_S:
                    piece = piece.with_audio(src.audio.subclipped(start, a_end))
            pieces.append(piece)
            segments.append({
                "clip_id": _clip_id(clip), "video": str(video), "start_s": start, "end_s": end,
                "out_start_s": t, "out_end_s": t + (end - start),
            })
            t += end - start

        out_fps = float(fps) if fps else min(MAX_FPS, max(float(s.fps or 0) for s in sources.values()) or MAX_FPS)
        reel = concatenate_videoclips(pieces, method="chain")
        parts.append(reel)
        write_audio = audio and reel.audio is not None
        try:
            # moviepy writes the audio track to a temp file first; keep it out of cwd and the output dir
            with tempfile.TemporaryDirectory(prefix="atomkit-reel-") as scratch, atomic_path(out_path) as tmp:
                reel.write_videofile(
                    str(tmp), fps=out_fps, codec="libx264", audio=write_audio, audio_codec="aac",
                    temp_audiofile=str(Path(scratch) / "audio.m4a"), preset="veryfast", threads=2,
                    ffmpeg_params=["-movflags", "+faststart"], logger=logger,
                )
        except Exception as e:
            raise AssemblyError(f"{out_path}: could not write the reel ({type(e).__name__}: {e})") from e
        return {
            "path": str(out_path),
            "duration_s": float(reel.duration),
            "n_clips": len(segments),
            "size": [w, h],
            "fps": out_fps,
            "segments": segments,
        }
    finally:
        for c in reversed(parts):
            c.close()
        for src in sources.values():
            src.close()
