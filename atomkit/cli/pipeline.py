"""The pipeline commands: caption, retrieve, assemble, index, eval. They share one path: check the arguments
(before any model loads), open the session, get the clips (captioned now, or from the library with --db), then
do the command's own part and print lines (or --json)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

from atomkit.cli.options import RESIDENT, add, add_session, check_out_dir, check_positive, command, session_from
from atomkit.config import CAPTION_MODES, PENDING
from atomkit.io import count, json_text, write_json_atomic

_LIBRARY_PATHS = " (with --db: optional, default the whole library)"


def register(sub) -> None:
    p = command(sub, "caption", "caption every clip of the videos", run, examples="""
        atomkit caption $(atomkit samples) --json
        atomkit caption ~/Videos/trip --out out/ --window 6 --stride 3""")
    add(p, "videos", videos=dict(nargs="+", help="video files or folders of videos"))
    add_session(p)
    add(p, "no-server")
    p = command(sub, "retrieve", "rank clips against a query", run, examples="""
        atomkit retrieve clip1.mp4 clip2.mp4 --query "the dog jumps" -k 3
        atomkit retrieve --db lib.db --query "a man wearing a tie\"""")
    add(p, "videos", "db", "k", videos=dict(help="video files or folders of videos" + _LIBRARY_PATHS),
        k=dict(help="how many clips to return (default: %(default)s)"))
    p.add_argument("--query", required=True, help='what to find, e.g. "the dog jumps"')
    add_session(p)
    add(p, "no-server")
    p = command(sub, "assemble", "make a video from the clips that best fit a prompt", run, examples="""
        atomkit assemble ~/Videos/trip --prompt "make a highlight reel" --out out/
        atomkit assemble --db lib.db --prompt "the bikes" --out out/bikes""")
    add(p, "videos", "db", "k", videos=dict(help="video files or folders of videos" + _LIBRARY_PATHS),
        k=dict(help="how many retrieved clips the script may use (default: %(default)s)"))
    p.add_argument("--prompt", required=True, help='what to make, e.g. "make a highlight reel"')
    add_session(p)
    add(p, "no-server")
    p = command(sub, "index", "caption new or changed videos into the library (--db); unchanged ones are skipped",
                run, examples="""
        atomkit index ~/Videos --db lib.db
        atomkit index ~/Videos --db lib.db --ray              # a local Ray cluster (loopback only) for this run
        atomkit index /mnt/videos --db lib.db --ray HEAD:6379  # a cluster you started (docs/library.md)""")
    add(p, "videos", "db", videos=dict(nargs="+", help="video files or folders of videos"))
    p.add_argument("--no-prune", action="store_true", help="keep stored videos whose files are gone (default: remove them)")
    p.add_argument("--search-first", action="store_true", help=(
        "give every new clip a one-frame glance first and store its concepts, so the library answers queries "
        "within seconds, then the full pass (models whose encoder names concepts; `atomkit serve` always indexes "
        "this way and does the full pass in the background)"))
    r = p.add_argument_group("scale-out on Ray (each actor keeps one resident session)")
    r.add_argument("--ray", metavar="ADDRESS", nargs="?", const="local", default=None, help=(
        "caption on a Ray cluster: a local one for this run when no ADDRESS is given (loopback only, token "
        "authentication on), or one you started (`ray start --head` prints HOST:6379; 'auto' finds it; it listens "
        "where you told Ray to). Every node must see the videos under the same paths"))
    r.add_argument("--actors", type=int, default=None, metavar="N",
                   help="Ray actors (default: the cluster's CPUs / --cpus-per-actor)")
    r.add_argument("--cpus-per-actor", type=float, default=1, metavar="N",
                   help="CPUs reserved per actor; its torch threads follow (default: 1)")
    r.add_argument("--gpus-per-actor", type=float, default=0, metavar="N", help="GPUs per actor (default: 0, CPU workers)")
    add_session(p)
    add(p, "no-server")
    p = command(sub, "eval", "score retrieval (R@1/5/10, median/mean rank) and captions (BLEU-4, METEOR, ROUGE-L, "
                "CIDEr) against an annotation file", run, examples="""
        atomkit eval --devset --views --out out/eval
        atomkit eval ~/msrvtt/videos --annotations MSRVTT_JSFUSION_test.csv --compare-backend int8""")
    add(p, "videos", "db", videos=dict(help="video files or folders of videos" + _LIBRARY_PATHS))
    p.add_argument("--annotations", metavar="FILE", help=(
        "MSR-VTT json/csv, MSVD txt/csv, DiDeMo json or atomkit json (see atomkit.evaluation.annotations)"))
    p.add_argument("--format", default="auto", choices=["auto", "msrvtt", "msvd", "didemo", "atomkit"],
                   help="annotation format (default: from the file)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process)")
    p.add_argument("--devset", action="store_true", help=(
        "evaluate on atomkit's development set (27 photos from packages as pan/zoom clips, the 4 sample videos and "
        "2 long videos; 93 whole-video and 37 moment queries written by hand, in a tuning and a test part; built "
        "into the cache on first use)"))
    p.add_argument("--views", action="store_true", help=(
        "also rank the same clips on their concepts alone, on caption + concepts, and on the baseline: top-5 "
        "labels of a whole-frame encoder pass (needs the video files)"))
    p.add_argument("--compare-backend", metavar="NAME", action="append", help=(
        "also evaluate with this decode backend (e.g. int8, int4; repeat for several) and report what it loses "
        "against --backend and against the exact engine (torch) where that is one of them, with the paper's bound "
        "(at most 2.3 R@1 and 1.5 CIDEr points)"))
    p.add_argument("--compare-quant", metavar="SCHEME",
                   help="the same for a torchao quantization of every module (int8, int4)")
    p.add_argument("--compare-captions", choices=list(CAPTION_MODES),
                   help="the same with another caption mode (e.g. raw: the paper's beam search, unchecked)")
    add_session(p)


# -- before anything loads ------------------------------------------------------------------------------------
def _check(args):
    """Every argument that can be wrong, checked before a model loads or a video is read; returns the
    annotations of ``eval``."""
    from atomkit.errors import InputError

    if args.out:
        check_out_dir(Path(args.out))
    if args.command in ("retrieve", "assemble"):
        from atomkit.pipeline.tasks import check_text

        check_text(args.query if args.command == "retrieve" else args.prompt,
                   "query" if args.command == "retrieve" else "prompt")
        check_positive(k=args.k)
    if args.command == "index":
        args.db = args.db or ""
    annotations = _annotations(args) if args.command == "eval" else None
    if getattr(args, "db", None) is None and not args.paths:
        raise InputError(f"atomkit {args.command}: give video files or folders, or --db to use the library")
    return annotations


def _annotations(args):
    from atomkit.config import cache_dir, check_backend
    from atomkit.deploy.quant import _check_scheme
    from atomkit.errors import InputError
    from atomkit.evaluation.annotations import load

    if args.devset:
        from atomkit.evaluation.devset import build

        videos, ann_file = build(cache_dir() / "devset")
        args.paths, args.annotations = args.paths or [str(v) for v in videos], args.annotations or str(ann_file)
    if not args.annotations:
        raise InputError("atomkit eval: give --annotations FILE (or --devset)")
    for name in args.compare_backend or ():  # a wrong name fails now, not after the first evaluation
        check_backend(name)
    if args.compare_quant:
        _check_scheme(args.compare_quant)
    return load(args.annotations, args.format)


# -- the clips -------------------------------------------------------------------------------------------------
def _update_library(args, session, lib, progress: bool):
    from atomkit.retrieval.indexing import update

    prune = not getattr(args, "no_prune", False)
    if getattr(args, "ray", None) is None:
        report = update(session, lib, args.paths, progress=progress, prune=prune,
                        search_first=getattr(args, "search_first", False))
        # pending clips (this run's glances, or what a killed service left) get their full pass: in the
        # service's background, else now
        _captions_follow(session, lib, progress, getattr(RESIDENT, "follow", None))
        return report
    from atomkit.retrieval.cluster import RayCaptioner

    with RayCaptioner(session, address=None if args.ray == "local" else args.ray, actors=args.actors,
                      cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor) as ray_pool:
        if progress:
            print(f"Ray: {count(len(ray_pool.actors), 'actor')} ready in {ray_pool.startup_s:.1f} s "
                  f"({', '.join(w['worker'] for w in ray_pool.workers)})", file=sys.stderr)
        return update(session, lib, args.paths, progress=progress, prune=prune, captioner=ray_pool)


def _captions_follow(session, lib, progress: bool, follow=None) -> None:
    """The pending captions of a search-first index: in the background of `atomkit serve` (``follow``), else now."""
    from atomkit.retrieval.deferred import caption_pending, pending_count
    from tqdm.auto import tqdm

    n = pending_count(session, lib) if lib.counts()["pending"] else 0
    if not n:
        return
    if follow is not None:
        follow(lib.path, session)
        return
    with tqdm(total=n, desc="captions", unit="clip", disable=not progress) as bar:
        caption_pending(session, lib, on_group=lambda done, left: bar.update(done - bar.n))


def _from_library(args, session, progress: bool):
    """(captions, index) of the library (indexing the given paths first), or the exit status of ``index``."""
    from atomkit.retrieval.indexing import load_index
    from atomkit.retrieval.library import Library

    # queries never create or write a library; indexing (index, or paths given) opens it for writing, and so does
    # assemble when clips are still pending from a search-first index (its script needs their captions)
    writable = args.command == "index" or bool(args.paths)
    if not writable and args.command == "assemble":
        with Library(args.db or None, writable=False) as lib:
            writable = lib.counts()["pending"] > 0
    with Library(args.db or None, writable=writable) as lib:
        report = _update_library(args, session, lib, progress) if args.paths else None
        if report is not None:
            for s in report.skipped:
                print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
            for s in report.failed:
                print(f"failed {s.path}: {s.reason}", file=sys.stderr)
            print(f"library {lib.path}: {report.summary()}", file=sys.stderr)
        if args.command == "index":
            result = {"library": str(lib.path), **report.to_dict(), "counts": lib.counts(), "load": session.load_report()}
            result.pop("videos", None)
            n = result["counts"]
            print(json_text(result) if args.json else
                  f"{lib.path}: {count(n['clips'], 'clip')} of {count(n['videos'] - n['unreadable'], 'video')}"
                  + (f" ({count(n['unreadable'], 'unreadable file')} recorded)" if n["unreadable"] else ""))
            return 0 if report.captioned or report.cached or not report.skipped else 1
        if args.command == "assemble" and lib.writable:  # its script needs captions: pending ones are written first
            _captions_follow(session, lib, progress)
        idx = load_index(session, lib, report.videos if report is not None else None)
        follow = getattr(RESIDENT, "follow", None)
        if follow is not None and any(c.caption == PENDING for c in idx.captions.clips):
            follow(lib.path, session)  # the service captions what a killed run left pending
        if report is not None:  # what the library could not read goes into the result's "skipped" too
            idx.captions.skipped += report.skipped
    return idx.captions, idx


def run(args) -> int:
    annotations = _check(args)
    progress = not args.quiet and not args.json
    with session_from(args) as session:
        if getattr(args, "db", None) is not None:
            got = _from_library(args, session, progress)
            if isinstance(got, int):
                return got
            caps, source = got
        else:
            caps = source = session.caption(args.paths, progress=progress)
            for s in caps.skipped:
                print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
        if not caps.clips:
            print("atomkit: no input could be captioned" if args.paths else
                  f"atomkit: the library holds no clips made with these settings (model {session.model!r}, its "
                  "quantization, decoding and windows): index into it with the same options first", file=sys.stderr)
            return 1
        result, lines = _OUTPUT[args.command](args, session, caps, source, annotations, progress)
        result["load"] = session.load_report()
        if args.json:
            print(json_text(result))
        else:
            print("\n".join(lines))
            loads = ", ".join(f"{m} {s['seconds']:.1f} s" for m, s in session.load_report().items())
            print(f"{count(len(caps.clips), 'clip')} from {count(len({c.clip.video for c in caps.clips}), 'video')} in "
                  f"{caps.seconds:.1f} s; skipped {len(caps.skipped)}; model loads: {loads}")
    return 0


# -- each command's own part: (result, lines) -------------------------------------------------------------------
def _caption(args, session, caps, source, annotations, progress):
    result = caps.to_dict()
    if args.out:
        write_json_atomic(Path(args.out) / "captions.json", result)
    return result, [f"{c.id:24s} {c.caption}" for c in caps.clips]


def _retrieve(args, session, caps, source, annotations, progress):
    hits = session.retrieve(source, args.query, k=args.k)
    if getattr(RESIDENT, "heard", None) is not None and args.db is not None:
        RESIDENT.heard(args.db, [(str(h.clip.clip.video), h.clip.clip.index) for h in hits])  # captioned first
    result = {"query": args.query, "model": session.model, "hits": [h.to_dict() for h in hits],
              "skipped": [s.to_dict() for s in caps.skipped]}
    if args.out:
        write_json_atomic(Path(args.out) / "retrieval.json", result)
    return result, [f"{h.rank}. {h.score:.3f}  {h.clip.id:24s} {_shown(h.clip)}" for h in hits]


def _shown(clip) -> str:
    """A clip's caption, or what it is ranked on while its caption is pending."""
    if clip.caption != PENDING:
        return clip.caption
    from atomkit.retrieval.ranking import concept_names

    return f"(caption pending) {concept_names(clip.concepts[:5])}"


def _eval(args, session, caps, source, annotations, progress):
    from atomkit.evaluation.quality import report, table
    from atomkit.pipeline.tasks import Index, index as build_index

    idx = source if isinstance(source, Index) else build_index(session, source)
    result = {"model": session.model, "annotations": annotations.source, "format": annotations.format,
              **({"protocol": annotations.protocol} if annotations.protocol else {}),
              **report(session, idx, annotations, views=args.views, meteor=not args.no_meteor),
              "caption_seconds": caps.seconds, "skipped": [s.to_dict() for s in caps.skipped]}
    lines = [table(result)]
    if args.compare_backend or args.compare_quant or args.compare_captions:
        result["compared"] = [_compared(args, annotations, result, backend) for backend in args.compare_backend or [None]]
        _against_exact(args, result)
        for c in result["compared"]:
            lines += [f"-- {c['setting']}", table(c["result"])]
            for against, deltas in ((args.backend, c["delta"]), ("torch, the exact engine", c.get("vs_exact"))):
                for part, d in (deltas or {}).items():
                    lines.append(f"vs {against}, {part}: video R@1 {d['video_r1_points']:+.1f} points"
                                 + (f", CIDEr {d['cider_points']:+.1f} points" if d["cider_points"] is not None else "")
                                 + f" ({'within' if d['within_paper_bound'] else 'outside'} the paper's bound)")
    if args.out:
        from atomkit.bench.record import with_record

        write_json_atomic(Path(args.out) / "eval.json", with_record(result))
    return result, lines


def _deltas(reference: dict, other: dict) -> dict:
    """What ``other`` lost against ``reference``: on the whole set, and on each part where the set has parts."""
    from atomkit.evaluation.quality import delta

    return {"all": delta(reference, other), **{p: delta(reference["parts"][p], r)
                                               for p, r in other.get("parts", {}).items()}}


def _against_exact(args, result: dict) -> None:
    """Each compared backend against the exact engine (torch), where the exact engine is the main run or one of
    the compared ones: the paper's bound is about what quantization loses against full precision."""
    exact = result if args.backend == "torch" else next(
        (c["result"] for c in result["compared"] if c["backend"] == "torch"), None)
    for c in result["compared"]:
        if exact is not None and c["result"] is not exact:
            c["vs_exact"] = _deltas(exact, c["result"])


def _compared(args, annotations, reference: dict, backend: str | None = None) -> dict:
    """``eval --compare-backend/--compare-quant/--compare-captions``: the same videos and queries on a second session."""
    from atomkit.evaluation.quality import report
    from atomkit.pipeline.tasks import index as build_index

    other = copy.copy(args)
    other.backend = backend or args.backend
    other.captions = args.compare_captions or args.captions
    setting = (f"backend {other.backend}" + (f", quant {args.compare_quant}" if args.compare_quant else "")
               + f", {other.captions} captions")
    with session_from(other, quant=args.compare_quant or "none") as session:
        if getattr(args, "db", None) is not None:
            from atomkit.retrieval.indexing import load_index, update
            from atomkit.retrieval.library import Library

            with Library(args.db or None, writable=bool(args.paths)) as lib:
                rep = update(session, lib, args.paths) if args.paths else None
                idx = load_index(session, lib, rep.videos if rep is not None else None)
            seconds = None
        else:
            caps = session.caption(args.paths)
            idx, seconds = build_index(session, caps), caps.seconds
        result = report(session, idx, annotations, meteor=not args.no_meteor) | {"caption_seconds": seconds}
        return {"setting": setting, "backend": other.backend, "result": result, "delta": _deltas(reference, result),
                "load": session.load_report()}


def _assemble(args, session, caps, source, annotations, progress):
    asm = session.assemble(source, args.prompt, args.out or "out", k=args.k, progress=progress)
    result = {"reel": str(asm.reel), "duration_s": asm.reel_info["duration_s"], "script_source": asm.script.source,
              "problems": asm.script.problems, "order": asm.script.order,
              "outputs": {k: str(v) for k, v in asm.outputs.items()},
              "skipped": [s.to_dict() for s in caps.skipped], "dropped": asm.dropped}
    for d in asm.dropped:
        print(f"dropped {d['clip_id']} ({d['video']}) from the reel: {d['reason']}", file=sys.stderr)
    lines = [f"{i + 1}. {e.clip_id:24s} {e.narration}" for i, e in enumerate(asm.script.entries)]
    lines.append(f"script from the {asm.script.source}"
                 + (f" ({'; '.join(asm.script.problems)})" if asm.script.problems else ""))
    dropped = (f"; dropped {len(asm.dropped)} that could not be read: "
               + ", ".join(d["clip_id"] for d in asm.dropped)) if asm.dropped else ""
    lines.append(f"wrote {asm.reel} ({asm.reel_info['duration_s']:.1f} s, {count(asm.reel_info['n_clips'], 'clip')}"
                 f"{dropped}), {asm.outputs['script']}, {asm.outputs['captions']}")
    return result, lines


_OUTPUT = {"caption": _caption, "retrieve": _retrieve, "eval": _eval, "assemble": _assemble}
