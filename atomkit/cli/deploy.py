"""The deployment commands: quantize (torchao, checked against fp32), export (ExecuTorch .pte programs with a
report), device (Android phones over adb)."""
from __future__ import annotations

import json
from pathlib import Path

from atomkit.cli.options import add, command
from atomkit.io import write_json_atomic


def register(sub) -> None:
    p = command(sub, "quantize", "quantize every module with torchao and check it against fp32 by numbers", quantize,
                description="Quantizes encoder, decoder and embedder (Linear and Embedding layers) and writes "
                "report.json: weight bytes before/after, output SQNR per module on real inputs, captions of the "
                "quantized pipeline scored against fp32 captions, retrieval rank agreement.",
                examples="atomkit quantize --models default --quant int8 --out export/default-int8")
    add(p, "videos", "models", "beams", "quiet", quiet=dict(help="no progress bars"))
    p.add_argument("--quant", choices=["int8", "int4"], default="int8", help="torchao scheme (default: int8, the paper's)")
    p.add_argument("--out", metavar="DIR", default="export", help="report.json goes here (default: %(default)s)")

    p = command(sub, "export", "quantize and export encoder, decoder, embedder to ExecuTorch .pte (XNNPACK)", export,
                description="Writes <module>.pte programs lowered to XNNPACK, a sidecar JSON for each (shapes, "
                "quantization, versions, delegation, parity) and report.json: weight bytes before/after, SQNR vs fp32 "
                "on real inputs (eager quantized and .pte), parity against the eager module of the same quantization, "
                "delegation, load times of eager / TorchScript / .pte, and (--pipeline) the whole pipeline run on the "
                "programs with captions scored against fp32.", examples="""
        atomkit export --models default --quant int8 --out export/default-int8
        atomkit export --models default --quant int8 --out export/default-int8 --pipeline
        atomkit assemble $(atomkit samples) --prompt "make a highlight reel" --programs export/default-int8 --beams 1""")
    add(p, "videos", "models", "weights", "random-weights", "quiet",
        videos=dict(help="videos for real test inputs (default: the samples)"),
        random_weights=dict(help="random weights (sizes and speed only)"))
    p.add_argument("--quant", choices=["int8", "int4", "none"], default="int8",
                   help="torchao scheme of Linear and Embedding layers (default: int8, the paper's)")
    p.add_argument("--only", nargs="+", choices=["encoder", "decoder", "embedder", "retriever"], default=None,
                   help="export only these modules (default: every module the spec has)")
    p.add_argument("--max-seq-len", type=int, default=768,
                   help="decoder static KV cache: prompt + new tokens (default: %(default)s)")
    p.add_argument("--decoder-batch", type=int, default=4, metavar="B", help=(
        "rows of the decoder program's KV cache = the most beams it searches with (default: %(default)s, the "
        "paper's beam 4)"))
    p.add_argument("--pipeline", action="store_true",
                   help="also assemble the videos on the programs and score their captions against fp32")
    p.add_argument("--no-load-times", action="store_true", help="skip the eager/TorchScript/.pte load-time probe")
    p.add_argument("--cold", action="store_true",
                   help="drop the OS page cache before each load-time probe (Linux, root): loads read from disk")
    p.add_argument("--out", metavar="DIR", default="export", help="programs and report.json (default: %(default)s)")

    p = command(sub, "device", "Android phones over adb: list, info, bench .pte programs", device,
                description="Find attached Android phones, describe them, and time ExecuTorch programs on them with "
                "a runner binary you build (see docs/phones.md).", examples="""
        atomkit device list
        atomkit device info --serial 1A2B3C
        atomkit device bench --programs export/default-int8 --runner ./executor_runner --out results/pixel8a.json""")
    p.add_argument("action", choices=["list", "info", "bench"])
    p.add_argument("--serial", help="which phone (default: the only one attached)")
    add(p, "repeats", repeats=dict(default=10, help="timed runs per program (default: %(default)s)"))
    p.add_argument("--programs", metavar="DIR", help="folder of .pte programs (from `atomkit export`)")
    p.add_argument("--runner", metavar="PATH", help="ExecuTorch runner binary for the phone (or $ATOMKIT_RUNNER)")
    p.add_argument("--out", metavar="FILE.json", help="write the bench result here")


def quantize(args) -> int:
    from atomkit.config import DecodeConfig
    from atomkit.evaluation.parity import quant_report
    from atomkit.media.scan import sample_videos

    report = quant_report(args.models, args.quant, args.paths or sample_videos(),
                          decode=DecodeConfig(num_beams=args.beams), progress=not args.quiet)
    from atomkit.bench.record import with_record

    path = write_json_atomic(Path(args.out) / "report.json", with_record(report))
    for m, r in report["modules"].items():
        sqnr = r["sqnr_db"] if r["sqnr_db"] is not None else "inf (identical)"
        print(f"{m:9s} Linear+Embedding {r['linear_embedding_bytes_fp32'] / 2**20:7.1f} -> "
              f"{r['linear_embedding_bytes'] / 2**20:6.1f} MiB (x{r['linear_embedding_ratio']})  SQNR {sqnr} dB")
    c = report["pipeline"]["captions"]
    print(f"captions vs fp32: BLEU-4 {c['bleu4']:.3f}  CIDEr {c['cider']:.3f}  identical {c['identical_share']:.0%}")
    print(f"wrote {path}")
    return 0


def export(args) -> int:
    from atomkit.deploy.report import export_model

    r = export_model(args.models, args.quant, args.out, weights=args.weights, random_weights=args.random_weights,
                     modules=tuple(args.only) if args.only else None, max_seq_len=args.max_seq_len, decoder_batch=args.decoder_batch,
                     videos=args.paths or None, load_times=not args.no_load_times, cold=args.cold,
                     pipeline=args.pipeline, progress=not args.quiet)
    from atomkit.bench.record import with_record

    write_json_atomic(Path(r["report"]), with_record({k: v for k, v in r.items() if k != "report"}))
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


def device(args) -> int:
    from atomkit.deploy import adb

    serials = adb.list_devices()
    if args.action == "list":
        print("\n".join(serials) if serials else "no Android device attached (adb devices lists none in state 'device')")
        return 0
    if not serials:
        raise adb.DeviceError("no Android device attached: connect a phone with USB debugging on, then check "
                              "`adb devices`")
    serial = args.serial or serials[0]
    if args.action == "info":
        print(json.dumps(adb.device_info(serial), indent=2))
        return 0
    if not args.programs:
        raise adb.DeviceError("device bench needs --programs DIR (a folder of .pte files from `atomkit export`)")
    programs = {p.stem: p for p in sorted(Path(args.programs).glob("*.pte"))}
    if not programs:
        raise adb.DeviceError(f"no .pte programs in {args.programs}; run `atomkit export` first")
    result = adb.bench_pte(serial, programs, adb.resolve_runner(args.runner), repeats=args.repeats)
    if args.out:
        from atomkit.bench.record import with_record

        write_json_atomic(Path(args.out), with_record(result))
    for name, comp in result["components"].items():
        load = result["load"].get(name, {}).get("median")
        print(f"{name:28s} run {comp['median'] * 1e3:8.1f} ms   load {load * 1e3 if load else float('nan'):8.1f} ms")
    return 0
