"""`atomkit bench-library`: what the library saves, measured.

1. The first index of the videos into an empty library against re-running it on the unchanged library
   (same process, same session, models already resident for both: the re-run's time is the library's own).
2. A query on the library: open, load the stored index, rank; and the ranking alone at 10k and 100k clips,
   with synthetic unit vectors (the search does not depend on what the vectors mean: the JSON says so),
   p50 and p99 over repeats.
3. Indexing throughput (clips/s) in this process and on a local Ray cluster with 1 and 2 actors, each into a
   fresh library, over copies of the videos (so each actor has several to do); the actors' start-up (cluster,
   model loads) is timed apart from the indexing.
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from atomkit.retrieval.indexing import load_index, update
from atomkit.retrieval.library import Library, config_of


def percentiles(samples: list[float]) -> dict:
    """p50 and p99 in ms of timings in seconds (numpy's interpolated percentiles), with the samples."""
    a = np.asarray(samples)
    return {"p50_ms": float(np.percentile(a, 50) * 1e3), "p99_ms": float(np.percentile(a, 99) * 1e3),
            "n": len(samples), "samples_ms": [round(s * 1e3, 4) for s in samples]}


def _rank(vectors: torch.Tensor, query: torch.Tensor, k: int) -> list[int]:
    """The search atomkit runs (tasks.retrieve): cosine = dot product of unit vectors, then top-k."""
    return torch.topk(vectors @ query, min(k, len(vectors))).indices.tolist()


def synthetic_search(n: int, dim: int, *, repeats: int = 200, k: int = 5, seed: int = 0) -> dict:
    """Ranking latency over ``n`` random unit vectors (float32) for random unit queries."""
    g = torch.Generator().manual_seed(seed)
    vectors = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(repeats + 10, dim, generator=g), dim=1)
    times = []
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        _rank(vectors, q, k)
        if i >= 10:  # warm-up excluded
            times.append(time.perf_counter() - t0)
    exact = _rank(vectors, queries[0], k)  # the same answer as a brute-force numpy pass
    check = np.argsort(-(vectors.numpy() @ queries[0].numpy()))[:k].tolist()
    return {"clips": n, "dim": dim, "synthetic_embeddings": True, "k": k, "agrees_with_numpy": exact == check,
            **percentiles(times)}


def _copies(paths, folder: Path, copies: int) -> int:
    """``copies`` copies of every video under ``paths`` in ``folder`` (distinct paths, so each is indexed)."""
    from atomkit.media.scan import scan

    videos = scan([Path(p) for p in paths]).videos
    for c in range(copies):
        for v in videos:
            d = folder / f"copy{c}"
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(v, d / Path(v).name)
    return len(videos) * copies


def throughput(session, paths, *, actors=(1, 2), copies: int = 3, cpus: int | None = None) -> dict:
    """Clips/s of a first index in this process (resident session) and on Ray with each actor count.

    The actors share ``cpus`` (default: this machine's): n actors get cpus // n each. A local cluster is
    started once for all counts unless one is already running."""
    import ray

    from atomkit.retrieval.cluster import RayCaptioner, init_local

    cpus = cpus or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="atomkit-bench-throughput-") as tmp:
        folder = Path(tmp) / "videos"
        n_videos = _copies(paths, folder, copies)

        def timed(name: str, captioner=None) -> dict:
            with Library(Path(tmp) / f"{name}.db") as lib:
                t0 = time.perf_counter()
                rep = update(session, lib, [folder], captioner=captioner)
                secs = time.perf_counter() - t0
            return {"index_s": secs, "clips": rep.clips_new, "videos": len(rep.captioned),
                    "clips_per_s": rep.clips_new / secs if secs > 0 else None, "failed": len(rep.failed)}

        for m in session.spec.modules:
            session.get(m)
        local = timed("local") | {"torch_threads": torch.get_num_threads()}
        runs = []
        started = not ray.is_initialized()
        if started:
            init_local(cpus)
        try:
            for n in actors:
                with RayCaptioner(session, actors=n, cpus_per_actor=max(1, cpus // n)) as pool:
                    r = timed(f"ray{n}", pool)
                    r |= {"actors": n, "cpus_per_actor": pool.cpus_per_actor, "startup_s": pool.startup_s,
                          "videos_per_worker": dict(pool.per_worker)}
                r["vs_one_process"] = r["clips_per_s"] / local["clips_per_s"] if local["clips_per_s"] else None
                runs.append(r)
        finally:
            if started:
                ray.shutdown()
    return {"videos": n_videos, "copies": copies, "cpus": cpus, "one_process": local, "ray": runs,
            "note": "each run indexes the same copies into a fresh library; start-up (cluster, actor model "
                    "loads) is not in index_s"}


def retriever_costs(session, paths, queries: list[str], repeats: int = 3) -> dict:
    """What a dual encoder costs beside the captioner: per clip, decoding its frames and embedding them with the image
    tower (pooled); per query, the text tower and ranking; the tower's resident size; and clips/s of a retrieval-only
    index (frames + image tower, no captions) against the captioning index of the same clips (encoder, decoder and
    the tower), median of ``repeats`` passes over the clips."""
    from atomkit.media.scan import find_videos
    from atomkit.media.video import clips, sample_frames
    from atomkit.pipeline.session import module_bytes
    from atomkit.pipeline.tasks import index

    ret = session.get("retriever")
    todo = [c for v in find_videos(paths)[0] for c in clips(v, session.window)]
    frames_s, embed_s, caption_s = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        frames = [sample_frames(c, session.window) for c in todo]
        t1 = time.perf_counter()
        vectors = [ret.embed_clip(f) for f in frames]
        t2 = time.perf_counter()
        caps = session.caption(paths)
        t3 = time.perf_counter()
        frames_s.append(t1 - t0)
        embed_s.append(t2 - t1)
        caption_s.append(t3 - t2)
    idx = index(session, caps)
    query_s = []
    for q in queries * 4:
        t0 = time.perf_counter()
        session.retrieve(idx, q, k=5)
        query_s.append(time.perf_counter() - t0)
    n = len(todo)
    f, e, c = float(np.median(frames_s)), float(np.median(embed_s)), float(np.median(caption_s))
    return {"clips": n, "frames_per_clip": session.window.frames, "image_size": ret.image_size,
            "dim": int(vectors[0].shape[0]) if vectors else None,
            "embed_clip_s": {"median": e / n, "frames_s": f / n}, "query": percentiles(query_s),
            "resident_mib": round(module_bytes(ret)[1] / 2**20, 1),
            "clips_per_s": {"retrieval_only": n / (f + e), "captioning": n / c},
            "note": "retrieval_only: frames decoded + the image tower; captioning: session.caption (frames, encoder, "
                    "decoder and the tower) of the same clips; medians of the passes"}


def run(session, paths, *, db: Path | None = None, queries: list[str] | None = None, sizes=(10_000, 100_000),
        repeats: int = 200, progress: bool = False, ray_actors=(), copies: int = 3) -> dict:
    """The whole benchmark on real videos (into a fresh library file unless ``db`` is given)."""
    queries = queries or ["a man wearing a tie", "a cartoon animal in the grass", "bikes on a street",
                          "make a highlight reel", "people in a car"]
    scratch = None
    if db is None:
        scratch = tempfile.TemporaryDirectory(prefix="atomkit-bench-library-")
        db = Path(scratch.name) / "library.db"
    try:
        for m in session.spec.modules:  # resident before the clock starts, for both runs
            session.get(m)
        with Library(db) as lib:
            t0 = time.perf_counter()
            first = update(session, lib, paths, progress=progress)
            first_s = time.perf_counter() - t0
            reruns = []
            for _ in range(5):
                t0 = time.perf_counter()
                again = update(session, lib, paths)
                reruns.append(time.perf_counter() - t0)
            assert again.captioned == [], again.summary()
            counts = lib.counts()
        open_load, rank_only = [], []
        for q in queries * 4:
            t0 = time.perf_counter()
            with Library(db) as lib:
                idx = load_index(session, lib)
            t1 = time.perf_counter()
            session.retrieve(idx, q, k=5)
            t2 = time.perf_counter()
            open_load.append(t1 - t0)
            rank_only.append(t2 - t1)
        rerun = float(np.median(reruns))
        scale_out = throughput(session, paths, actors=ray_actors, copies=copies) if ray_actors else None
        return {
            "model": session.model, "config": config_of(session), "videos": len(first.videos),
            "library": counts,
            "first_index_s": first_s, "rerun_s": {"median": rerun, "samples": reruns},
            "speedup": first_s / rerun if rerun > 0 else None,
            "first_index": first.to_dict() | {"videos": [str(v) for v in first.videos]},
            "query_on_library": {"open_and_load_index": percentiles(open_load),
                                 "embed_query_and_rank": percentiles(rank_only), "queries": queries,
                                 "modules_loaded_by_queries": ("the retriever (its text tower ranks)" if session.spec.retriever
                                                               else "embedder only")
                                 + " (the session already held every module)"},
            "search_at_scale": [synthetic_search(n, idx.vectors.shape[1] or 384, repeats=repeats) for n in sizes],
            "indexing_throughput": scale_out,
            "retriever": retriever_costs(session, paths, queries) if session.spec.retriever else None,
            "search": "torch matrix product over float32 unit vectors + topk (exact); numpy gives the same order",
            "device": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "python": platform.python_version(), "torch": torch.__version__},
        }
    finally:
        if scratch is not None:
            scratch.cleanup()
