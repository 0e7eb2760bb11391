"""Stitch clips into one mp4 reel with moviepy 2.x.

Every clip is shown upright (the source's display rotation applied) and letter- or pillar-boxed into the
same frame size (fit inside, aspect kept, black bars, centred); ffmpeg scales the frames while decoding, so a
4K source never reaches Python at full size. A clip whose source moviepy cannot read is dropped and reported,
and the reel is made from the rest. The clips are concatenated in the given order, and the reel is written
through `io.atomic_path` so an interrupted or failed run never leaves a half-written file behind."""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from atomkit.errors import AssemblyError, InputError, VideoError
from atomkit.io import atomic_path

if TYPE_CHECKING:
    from atomkit.media.video import Clip

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


def _why(e: Exception) -> str:
    """One line on why a source could not be used: the first line of the innermost cause (moviepy wraps its
    own message, and ffmpeg's whole output, in another error), and what may fix it."""
    if isinstance(e, VideoError):
        return e.reason
    while e.__cause__ is not None:
        e = e.__cause__
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return (f"moviepy cannot read it ({type(e).__name__}: {first[:200]}); rewriting it into an mp4 may help: "
            "`ffmpeg -i IN -c copy OUT.mp4`")


def _reader(video: Path, box: tuple[int, int], audio: bool):
    """A moviepy reader of ``video`` whose frames ffmpeg turns upright (its display rotation) and scales to fit
    ``box`` while decoding. The size comes from PyAV (:func:`atomkit.media.video.probe`): moviepy 2.1.2 does not
    parse the display matrix that ffmpeg 7+ prints, so it would scale a rotated frame back to the coded size."""
    from moviepy import VideoFileClip

    from atomkit.media.video import probe

    info = probe(video)
    return VideoFileClip(str(video), audio=audio, target_resolution=_fit((info.width, info.height), box))


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

    Each clip is cut from its source at [start_s, min(end_s, source duration)), turned upright and
    letter- or pillar-boxed into `size`. `fps` defaults to the highest fps of the sources used, capped at 30.
    Source audio is kept where present (clips without audio are silent); `audio=False` writes no audio
    track. `logger` is passed to moviepy (None: silent, "bar": progress bars).

    A clip whose source cannot be opened, or whose first or last frame moviepy cannot read, is dropped
    (listed in "dropped" with the reason) and the reel is made from the others.

    Returns {"path", "duration_s", "n_clips", "size", "fps", "segments": [{"clip_id", "video",
    "start_s", "end_s", "out_start_s", "out_end_s"}], "dropped": [{"clip_id", "video", "reason"}]}.
    Raises InputError for no clips / bad arguments / a clip outside its video, AssemblyError when no
    clip can be read (naming each) or the reel cannot be written.
    """
    from moviepy import CompositeVideoClip, concatenate_videoclips

    clips = list(clips)
    if not clips:
        raise InputError("no clips to stitch")
    w, h = _check_size(size)
    if fps is not None and not fps > 0:
        raise InputError(f"fps must be > 0, got {fps}")
    out_path = Path(out_path)

    sources: dict = {}  # one reader per source video, shared by its clips (or why it cannot be read)
    parts: list = []  # derived clips to close (composites own their background clip)
    try:
        segments, pieces, dropped, used, t = [], [], [], set(), 0.0
        for clip in clips:
            video = Path(clip.video)
            if video not in sources:
                try:
                    sources[video] = _reader(video, (w, h), audio)
                except Exception as e:  # moviepy raises OSError, KeyError, IndexError, ... for bad input
                    sources[video] = e
            src = sources[video]
            if isinstance(src, Exception):
                dropped.append({"clip_id": _clip_id(clip), "video": str(video), "reason": _why(src)})
                continue
            start, end = float(clip.start_s), min(float(clip.end_s), float(src.duration))
            if start < 0 or end - start < _MIN_SEGMENT_S:
                raise InputError(
                    f"clip {_clip_id(clip)}: [{clip.start_s}, {clip.end_s}) s is empty or outside "
                    f"{video} (duration {src.duration:.2f} s)")
            try:  # moviepy may open a file it cannot decode: read the ends now, not halfway through the reel
                piece = src.without_audio().subclipped(start, end)
                for at in (0.0, max(0.0, piece.duration - 1.0 / (src.fps or MAX_FPS))):
                    piece.get_frame(at)
            except Exception as e:  # (the piece shares its source's reader, closed at the end)
                dropped.append({"clip_id": _clip_id(clip), "video": str(video), "reason": _why(e)})
                continue
            used.add(video)
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

        if not pieces:
            raise AssemblyError("no clip could be read for the reel: " + "; ".join(
                f"{d['clip_id']} ({d['video']}): {d['reason']}" for d in dropped))
        out_fps = float(fps) if fps else min(MAX_FPS, max(float(sources[v].fps or 0) for v in used) or MAX_FPS)
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
            "dropped": dropped,
        }
    finally:
        for c in reversed(parts):
            c.close()
        for src in sources.values():
            if not isinstance(src, Exception):
                src.close()
