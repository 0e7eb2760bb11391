"""Looking at a clip: a thumbnail (a JPEG of one frame) and a short preview mp4 of a clip with its trim, cut
with PyAV (decoded upright at display size)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av

from atomkit.errors import VideoError
from atomkit.media.video import _AV_ERRORS, _EPS, _check_file, _display_rgb, _display_size, _frames_at, _message


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
