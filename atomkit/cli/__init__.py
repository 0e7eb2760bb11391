"""`atomkit` command line: caption, retrieve and assemble videos with resident modules.

Each command lives in the module of its concern (``pipeline``, ``bench``, ``deploy``, ``app``) and registers
itself with the function that runs it; options are defined once in ``options``."""
from __future__ import annotations

import argparse
import os
import sys

EPILOG = """examples:
  atomkit assemble ~/Videos/trip --prompt "make a highlight reel" --out out/
  atomkit retrieve clip1.mp4 clip2.mp4 --query "the dog jumps" -k 3
  atomkit caption $(atomkit samples) --json
  atomkit models

Nothing is downloaded: the default models ship inside installed packages. The atom-paper model needs
weights you supply (--weights DIR or $ATOMKIT_PAPER_WEIGHTS), or --random-weights for latency work."""


def build_parser() -> argparse.ArgumentParser:
    from atomkit.cli import app, bench, deploy, pipeline, serve

    parser = argparse.ArgumentParser(prog="atomkit", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (pipeline, app, bench, deploy, serve):
        module.register(sub)
    return parser


def _printable_names() -> None:
    """File names that are not UTF-8 (lone surrogates in Python) print as ``\\udcXX`` escapes instead of
    crashing a print or writing invalid UTF-8."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from atomkit.serve.client import forward

    answered = forward(argv)  # a running `atomkit serve` answers with its resident modules (before torch is imported)
    if answered is not None:
        return answered
    _printable_names()
    return run_args(build_parser().parse_args(argv))


def run_args(args: argparse.Namespace) -> int:
    """Run a parsed command line: an atomkit error is one line on stderr and exit status 2."""
    from atomkit.config import quiet_libraries
    from atomkit.errors import AtomkitError

    quiet_libraries(offline=args.command != "fetch")  # fetch alone may go online
    try:
        return args.run(args)
    except (AtomkitError, ValueError, OSError) as e:
        if os.environ.get("ATOMKIT_DEBUG"):
            raise
        what = str(e) if isinstance(e, AtomkitError) else f"{e} ({type(e).__name__}; ATOMKIT_DEBUG=1 shows where)"
        print(f"atomkit: error: {what}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atomkit: interrupted; no partial outputs were written", file=sys.stderr)
        return 130
