"""The benchmark commands: bench (ATOM reuse vs the reload baseline), bench-decode, bench-library. Each writes a
JSON result that carries its own record (command, commit, date, machine: ``atomkit.bench.record``)."""
from __future__ import annotations

from pathlib import Path

from atomkit.cli.options import add, check_positive, command, decode_from
from atomkit.config import DecodeConfig
from atomkit.io import write_json_atomic


def register(sub) -> None:
    from atomkit.config import BENCH_EXECUTORS
    p = command(sub, "bench", "ATOM reuse + pipelining vs the sequential reload baseline (JSON, table, plot)", bench,
                description="Runs both paths on the same videos and prompts in one process and writes components, "
                "end-to-end times, overlap efficiency, memory and device info as JSON, prints a table in the paper's "
                "Table 3 layout and plots the encoder/decoder timeline.", examples="""
        atomkit bench --models default --repeats 5 --out results/reuse-default.json
        atomkit bench --models default --cold --repeats 5 --out results/reuse-default-cold.json
        atomkit bench --models atom-paper --random-weights --prompts 2 --out results/reuse-atom-paper.json""")
    add(p, "videos", "models", "weights", "random-weights", "device", "captions", "max-new-tokens", "beams",
        "caption-batch", "script-tokens", "backend", "exact", "repeats", "quiet",
        repeats=dict(default=1, help="run both paths this many times, in ABBA order; end-to-end times are medians "
                     "and the JSON has the ratio of every repeat (default: %(default)s)"))
    p.add_argument("--prompts", type=int, default=5, help="number of prompts per path (default: %(default)s)")
    p.add_argument("-k", type=int, default=3, help="clips retrieved per prompt (default: %(default)s)")
    p.add_argument("--out", metavar="FILE.json", default="results/reuse.json",
                   help="where the JSON goes; the timeline PNG goes beside it (default: %(default)s)")
    p.add_argument("--no-warmup", action="store_true", help="skip the unmeasured warm-up run")
    p.add_argument("--cold", action="store_true", help=(
        "drop the OS page cache before every load (needs root on Linux): weights come from storage, as on a phone "
        "whose memory no longer caches them; the drops are not timed"))
    p.add_argument("--executor", choices=BENCH_EXECUTORS, default="measured", help=(
        "executor of the reuse path (measured: pipelined or pipelined-disjoint where every sample in this run's "
        "overlap measurement beat the fastest sequential one by 5 %%, else sequential; auto: pipelined with a GPU or "
        ">= 4 cores; pipelined-disjoint: encoder and decoder on separate cores; prefetch: frames decoded ahead on "
        "one thread, encoder and decoder in turn on the main thread)"))

    p = command(sub, "bench-decode", "decode tokens/s of every engine backend, generate and llama.cpp (JSON, PNG)",
                bench_decode, description="Decodes the same caption prompt with every backend (transformers generate "
                "as the baseline, the atomkit engine backends, and llama.cpp on the model's own GGUF when "
                "llama-cpp-python is installed: `make peer`), the same numbers of new tokens (EOS ignored) on the same "
                "threads. Writes prefill time, decode tokens/s (median of repeats, warm-up excluded), beam-4 caption "
                "latency, batch throughput, token agreement with generate and a per-token profile of the fastest "
                "backend as JSON, and a bar chart beside it.", examples="""
        atomkit bench-decode --models default --out results/decode.json
        atomkit bench-decode --backends torch,int4 --new-tokens 8,32 --repeats 1 --out /tmp/d.json
        atomkit bench-decode --program export/default-int8 --out results/decode-with-program.json""")
    add(p, "models", "repeats", "beams", "script-tokens", "quiet",
        repeats=dict(help="timed runs per measurement after one warm-up (default: %(default)s)"),
        beams=dict(help="beam width of the caption latency (paper: 4; default: %(default)s)"),
        quiet=dict(help="no progress lines"))
    p.add_argument("--out", metavar="FILE.json", default="results/decode.json",
                   help="where the JSON goes; the PNG goes beside it (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and llama.cpp threads (default: 2)")
    p.add_argument("--new-tokens", default="23,128", help="comma-separated new-token counts (default: %(default)s)")
    p.add_argument("--backends", default=None,
                   help="comma-separated engine backends (default: all; hf is always run as the baseline)")
    p.add_argument("--caption-tokens", type=int, default=DecodeConfig.max_new_tokens,
                   help="max new tokens of the beam caption (paper: 23; default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="prompts decoded together for batch throughput (default: 4)")
    p.add_argument("--program", action="append", default=[], metavar="PATH", help=(
        "also time this decoder .pte program (or `atomkit export` folder) on the ExecuTorch runtime, as contender "
        "pte-<quant> (repeatable)"))
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when it is installed")
    p.add_argument("--no-profile", action="store_true", help="skip the per-token profile")

    p = command(sub, "bench-library", "the library measured: first index vs re-run, query latency at 10k/100k clips, "
                "indexing throughput on Ray (JSON)", bench_library, description="Indexes the videos into a fresh "
                "library, re-runs the index on the unchanged library, times queries on it (open + load + rank, and "
                "embed + rank) and the ranking alone over 10k and 100k synthetic unit vectors (p50, p99). Models are "
                "resident before either index run is timed. Then indexes --copies copies of the videos in this process "
                "and on a local Ray cluster with each --ray-actors count (clips/s; actors share this machine's CPUs).",
                examples="atomkit bench-library --out results/library.json")
    add(p, "videos", "models", "random-weights", "device", "backend", "max-new-tokens", "beams", "repeats", "quiet",
        repeats=dict(default=200, help="queries per size (default: %(default)s)"))
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="synthetic library sizes (clips)")
    p.add_argument("--ray-actors", type=int, nargs="+", default=[1, 2], metavar="N",
                   help="actor counts for the throughput runs (default: 1 2)")
    p.add_argument("--copies", type=int, default=3, help="copies of the videos indexed per throughput run (default: 3)")
    p.add_argument("--no-ray", action="store_true", help="skip the throughput runs")
    p.add_argument("--out", metavar="FILE.json", default="results/library.json", help="where the JSON goes")

    p = command(sub, "bench-serve", "atomkit serve measured: CLI query latency with and without it, an hour of video "
                "searchable and captioned, memory while idle (JSON)", bench_serve, description="Builds an hour of "
                "video from the development set's sources (once, into the cache), indexes it in one pass without the "
                "service and search-first through a fresh service, then times `atomkit retrieve` as whole processes "
                "with and without the service and reads the service's memory after its modules unloaded.",
                examples="atomkit bench-serve --out results/serve.json")
    p.add_argument("--minutes", type=int, default=60, help="one-minute videos in the synthetic library (default: 60)")
    p.add_argument("--queries", type=int, default=50, help="CLI queries through the service (default: %(default)s)")
    p.add_argument("--local-queries", type=int, default=10,
                   help="CLI queries with --no-server, each loading torch and the embedder (default: %(default)s)")
    p.add_argument("--idle-unload", type=float, default=20.0, metavar="SECONDS",
                   help="the service's idle unload for the memory reading (default: %(default)s)")
    p.add_argument("--out", metavar="FILE.json", default="results/serve.json", help="where the JSON goes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")


def bench(args) -> int:
    from atomkit.bench.record import with_record
    from atomkit.bench.reuse import benchmark
    from atomkit.bench.figures import plot_timeline, table

    check_positive(repeats=args.repeats, prompts=args.prompts, k=args.k)
    result = benchmark(args.models, prompts=args.prompts, videos=args.paths or None, k=args.k, device=args.device,
                       weights=args.weights, random_weights=args.random_weights, decode=decode_from(args),
                       warmup=not args.no_warmup, executor=args.executor, repeats=args.repeats, cold=args.cold,
                       progress=not args.quiet)
    out = Path(args.out)
    png = plot_timeline(result, out.with_suffix(".png"))
    result["timeline_png"] = str(png)
    write_json_atomic(out, with_record(result))
    print(table(result))
    for m, f in result["load_vs_read_floor"].items():
        print(f"{m:9s} load " + ", ".join(f"{p} {t:.3f} s ({f['load_vs_floor'][p]:.1f}x)" for p, t in f["load_s"].items())
              + f" vs reading its {f['mib']:.0f} MiB {'from storage' if result['cold'] else 'from the page cache'} "
              f"{f['read_s']:.3f} s")
    print(f"wrote {out} and {png}")
    return 0


def bench_decode(args) -> int:
    from atomkit.bench.decode import bench_decode as run, plot
    from atomkit.bench.record import with_record
    from atomkit.errors import InputError

    try:
        lengths = tuple(int(n) for n in args.new_tokens.split(",") if n.strip())
    except ValueError:
        raise InputError(f"--new-tokens takes comma-separated integers, got {args.new_tokens!r}") from None
    if not lengths or min(lengths) < 2:
        raise InputError("--new-tokens must be >= 2 each")
    check_positive(repeats=args.repeats, threads=args.threads)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    result = run(args.models, backends=backends, threads=args.threads, new_tokens=lengths, repeats=args.repeats,
                 llama_cpp=not args.no_llama_cpp, batch=args.batch, beams=args.beams, caption_tokens=args.caption_tokens,
                 script_tokens=args.script_tokens, profile_steps=0 if args.no_profile else 32, progress=not args.quiet,
                 programs=args.program)
    out = Path(args.out)
    png = plot(result, out.with_suffix(".png"))
    result["plot_png"] = str(png)
    write_json_atomic(out, with_record(result))
    width = max(len(k) for k in result["tok_s"])
    print(f"{'backend':{width}s}  " + "  ".join(f"tok/s@{n:<4d}" for n in result["new_tokens"])
          + "  prefill ms  caption beam4 s")
    for name, by_n in result["tok_s_by_new_tokens"].items():
        if by_n is None:
            print(f"{name:{width}s}  not run: {result.get('llama_cpp_reason', '')}")
            continue
        cap = result["caption_latency_beam4_s"].get(name)
        print(f"{name:{width}s}  " + "  ".join(f"{by_n[str(n)]:10.1f}" for n in result["new_tokens"])
              + f"  {result['prefill_s'][name] * 1e3:10.1f}  {cap if cap is not None else '-':>14}")
    print(f"wrote {out} and {png}")
    return 0


def bench_library(args) -> int:
    from atomkit.bench.library import run
    from atomkit.bench.record import with_record
    from atomkit.media.scan import sample_videos
    from atomkit.pipeline.session import Session

    check_positive(repeats=args.repeats, copies=args.copies, sizes=min(args.sizes), ray_actors=min(args.ray_actors))
    with Session(args.models, device=args.device, decode=decode_from(args), random_weights=args.random_weights) as session:
        result = run(session, args.paths or sample_videos(), sizes=args.sizes, repeats=args.repeats,
                     progress=not args.quiet, ray_actors=() if args.no_ray else args.ray_actors, copies=args.copies)
    path = write_json_atomic(Path(args.out), with_record(result))
    q = result["query_on_library"]
    print(f"first index {result['first_index_s']:.2f} s, re-run {result['rerun_s']['median'] * 1e3:.1f} ms "
          f"({result['speedup']:.0f}x); query: open+load {q['open_and_load_index']['p50_ms']:.1f} ms, "
          f"embed+rank {q['embed_query_and_rank']['p50_ms']:.1f} ms (p50)")
    for s in result["search_at_scale"]:
        print(f"rank {s['clips']:>7d} clips: p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms (synthetic embeddings)")
    t = result["indexing_throughput"]
    if t:
        print(f"index {t['videos']} videos: one process {t['one_process']['clips_per_s']:.2f} clips/s"
              + "".join(f"; Ray {r['actors']} actor(s) x {r['cpus_per_actor']:g} CPU {r['clips_per_s']:.2f} clips/s "
                        f"({r['vs_one_process']:.2f}x, start-up {r['startup_s']:.0f} s)" for r in t["ray"]))
    r = result.get("retriever")
    if r:
        print(f"retriever: {r['embed_clip_s']['median'] * 1e3:.0f} ms a clip ({r['frames_per_clip']} frames at "
              f"{r['image_size']} px, + {r['embed_clip_s']['frames_s'] * 1e3:.0f} ms decoding them), a query "
              f"{r['query']['p50_ms']:.1f} ms (p50); index {r['clips_per_s']['retrieval_only']:.2f} clips/s "
              f"retrieval-only against {r['clips_per_s']['captioning']:.2f} captioning; {r['resident_mib']} MiB")
    print(f"wrote {path}")
    return 0


def bench_serve(args) -> int:
    from atomkit.bench.record import with_record
    from atomkit.bench.serve import HOUR_VERSION, run
    from atomkit.config import cache_dir

    check_positive(minutes=args.minutes, queries=args.queries, local_queries=args.local_queries)
    result = run(cache_dir() / f"hour-v{HOUR_VERSION}", minutes=args.minutes, served_queries=args.queries,
                 local_queries=args.local_queries, idle_s=args.idle_unload, progress=not args.quiet)
    path = write_json_atomic(Path(args.out), with_record(result))
    h, one, svc, q, m = (result[k] for k in ("hour", "one_pass", "service", "cli_query_latency", "memory_mib"))
    print(f"{h['clips']} clips ({h['minutes']} min): one pass {one['all_captioned_s']:.0f} s to searchable and "
          f"captioned; through the service searchable in {svc['searchable_s']:.0f} s, all captioned in "
          f"{svc['all_captioned_s']:.0f} s ({svc['all_captioned_vs_one_pass']:.2f}x)")
    print(f"`atomkit retrieve` p50 {q['with_service']['p50_ms']:.0f} ms (p99 {q['with_service']['p99_ms']:.0f}) with "
          f"the service, {q['without_service']['p50_ms']:.0f} ms without; service memory {m['resident']} MiB resident, "
          f"{m['idle_after_unload']} MiB after idle unload")
    print(f"wrote {path}")
    return 0
