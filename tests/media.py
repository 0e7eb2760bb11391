"""Reading reels back for tests, with PyAV directly (not atomkit's decoder): durations, and which source a
reel's frame shows."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

BOX = (640, 360)  # the reel's frame size (atomkit.media.stitch.stitch's default)


def duration(path: Path) -> float:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return float(s.duration * s.time_base) if s.duration else c.duration / av.time_base


def frames_at(path: Path, times: list[float]) -> list[np.ndarray]:
    """RGB frames shown at each of ``times`` (s, increasing), read in one pass over the video."""
    picked, prev = [], None
    with av.open(str(path)) as c:
        for f in c.decode(c.streams.video[0]):
            while len(picked) < len(times) and prev is not None and f.time > times[len(picked)]:
                picked.append(prev)
            if len(picked) == len(times):
                break
            prev = f.to_ndarray(format="rgb24")
    return picked + [prev] * (len(times) - len(picked))


def frame(path: Path, t: float) -> np.ndarray:
    """Grey centre crop (96 px) of the frame shown at t s, scaled to fit BOX as a reel frame is."""
    with av.open(str(path)) as c:
        picked = None
        for f in c.decode(c.streams.video[0]):
            if picked is not None and f.time is not None and f.time > t:
                break
            picked = f
    w, h = picked.width, picked.height
    scale = min(BOX[0] / w, BOX[1] / h)
    img = picked.to_ndarray(format="gray", width=max(2, round(w * scale)), height=max(2, round(h * scale)))
    cy, cx = img.shape[0] // 2, img.shape[1] // 2
    return img[cy - 48:cy + 48, cx - 48:cx + 48].astype(np.float32)


def check_reel(reel: Path, cuts: list[tuple[Path, float, float]], candidates: list[Path]) -> None:
    """Assert that ``reel`` is the ``cuts`` (source, in, out) in order: its duration is their sum, and the
    middle frame of each segment looks more like its own source at that time than like any other candidate."""
    expected = sum(b - a for _, a, b in cuts)
    got = duration(reel)
    assert abs(got - expected) < 0.25, f"reel is {got:.2f} s, the cuts add up to {expected:.2f} s"
    t = 0.0
    for src, a, b in cuts:
        mid = (b - a) / 2
        seen = frame(reel, t + mid)
        dist = {c: float(np.abs(seen - frame(c, a + mid if c == src else mid)).mean()) for c in candidates}
        assert min(dist, key=dist.get) == src, f"segment at {t:.2f} s should show {src.name}: {dist}"
        t += b - a


def thumbnail(image: np.ndarray, size=(16, 12)) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).convert("L").resize(size, Image.BILINEAR), dtype=np.float32)


def segment_sources(video: Path, times: list[float], folder: Path) -> list[str]:
    """For each time of ``video``, the stem of the short video in ``folder`` whose middle frame looks most like
    the frame shown then (16x12 grey thumbnails): which source a long video shows at each time."""
    shorts = {p.stem: p for p in sorted(folder.glob("*.mp4")) if p != video and not p.stem.startswith("long_")}
    refs = {stem: thumbnail(frames_at(p, [duration(p) / 2])[0]) for stem, p in shorts.items()}
    out = []
    for f in frames_at(video, times):
        seen = thumbnail(f)
        out.append(min(refs, key=lambda s: float(np.abs(refs[s] - seen).mean())))
    return out
