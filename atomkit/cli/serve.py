"""The ``serve`` command: run the resident service, start it in the background, show its status, stop it."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

from atomkit.cli.options import RESIDENT, command

START_TIMEOUT_S = 60


def register(sub) -> None:
    from atomkit.serve.protocol import FORWARDED
    from atomkit.serve.server import IDLE_UNLOAD_S

    p = command(sub, "serve", "keep the modules loaded for every atomkit command of this user (a local service)",
                serve, description=(
                    f"Runs one service that keeps sessions resident; `atomkit {'/'.join(FORWARDED)}` then run there "
                    "(and say so in one line) instead of loading models themselves. Only this user can reach it: a "
                    "Unix socket in an owner-only folder, no network port (docs/serve.md)."), examples="""
        atomkit serve --detach                 # start it in the background
        atomkit retrieve --db lib.db --query "a man wearing a tie"   # answered by the service
        atomkit serve --status
        atomkit serve --stop""")
    p.add_argument("--detach", action="store_true", help="start the service in the background and return once it answers")
    p.add_argument("--status", action="store_true", help="show what the running service holds (exit 1 when none runs)")
    p.add_argument("--stop", action="store_true", help="stop the running service")
    p.add_argument("--idle-unload", type=float, default=IDLE_UNLOAD_S, metavar="SECONDS", help=(
        "unload a session's modules after this long without a request; the next request loads them again "
        "(default: %(default)s)"))
    p.add_argument("--socket", metavar="PATH", help="the socket (default: $ATOMKIT_SOCKET or ~/.cache/atomkit/serve/atomkit.sock)")
    p.add_argument("--json", action="store_true", help="--status as JSON")


def _status_lines(st: dict) -> list[str]:
    lines = [f"atomkit serve: pid {st['pid']} at {st['socket']}, up {st['uptime_s']:.0f} s, {st['requests']} requests, "
             f"{st['rss_mib']} MiB resident in memory; modules unload after {st['idle_unload_s']:g} s idle"]
    for s in st["sessions"]:
        mods = ", ".join(f"{m} {v['mib']} MiB, loaded {v['loads']}x{'' if v['resident'] else ' (unloaded)'}"
                         for m, v in s["modules"].items()) or "nothing loaded yet"
        lines.append(f"  {s['model']}: {s['requests']} requests, idle {s['idle_s']:.0f} s; {mods}")
    for c in st.get("captions", []):
        state = "captioning" if c["running"] else "done" if not c["pending"] else "stopped"
        lines.append(f"  captions for {c['library']}: {state}, {c['captioned']} landed, {c['pending']} pending"
                     + (f" ({c['error']})" if c["error"] else ""))
    return lines


def serve(args) -> int:
    from atomkit.serve.client import Client
    from atomkit.serve.protocol import ServiceError, socket_path

    path = Path(args.socket).expanduser().absolute() if args.socket else socket_path()
    if args.status or args.stop:
        try:
            client = Client(path, timeout=10)
        except ServiceError as e:
            print(f"atomkit serve: not running ({e})", file=sys.stderr)
            return 1
        if args.stop:
            st = client.stop()
            print(f"atomkit serve: stopping pid {st['pid']}")
            return 0
        st = client.status()
        print(json.dumps(st, indent=2) if args.json else "\n".join(_status_lines(st)))
        return 0
    if args.detach:
        return _detach(args, path)
    from atomkit.serve.server import Service

    service = Service(run_command, path, idle_unload_s=args.idle_unload)
    service.bind()
    print(f"atomkit serve: listening at {path} (pid {os.getpid()}); modules load on first use and unload after "
          f"{args.idle_unload:g} s idle; `atomkit serve --stop` or Ctrl-C stops it", file=sys.stderr, flush=True)
    service.run()
    return 0


def _detach(args, path: Path) -> int:
    """Start ``atomkit serve`` as its own session in the background, its output in a log beside the socket."""
    from atomkit.serve.client import start
    from atomkit.serve.protocol import ServiceError, answers

    if answers(path):
        print(f"atomkit serve: already running at {path} (`atomkit serve --status`)", file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = path.with_suffix(".log")
    try:
        _, client = start(path, args.idle_unload, log, new_session=True, timeout=START_TIMEOUT_S)
    except ServiceError as e:
        print(f"atomkit serve: {e}", file=sys.stderr)
        return 1
    print(f"atomkit serve: running in the background (pid {client.status()['pid']}) at {path}; log {log}")
    return 0


_PATH_FIELDS = ("db", "out", "annotations", "weights", "programs")


@functools.lru_cache(maxsize=1)
def _parser():
    """The CLI's parser, built once per service (parsing does not change it; building it costs ~10 ms)."""
    from atomkit.cli import build_parser

    return build_parser()


def run_command(argv: list[str], cwd: str, env: dict, service) -> int:
    """One command line of a client, run in the service: the CLI's own parser and command, its paths as the
    client meant them, ``session_from`` lending the service's resident session; ``index`` is search-first (where
    the model's decoder captions from concepts) and its captions follow in the service's background."""
    from atomkit.cli import run_args

    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed its usage to this client's stderr
        return e.code if isinstance(e.code, int) else 2
    _absolute(args, cwd, env)
    if args.command == "index" and args.ray is None:
        from atomkit.models.registry import get_spec
        from atomkit.errors import UnknownModel

        try:
            args.search_first = args.search_first or get_spec(args.models).concept_captions
        except UnknownModel:
            pass  # the command says so itself
    RESIDENT.provider, RESIDENT.follow, RESIDENT.heard = service.borrow, service.follow, service.heard
    try:
        return run_args(args)
    finally:
        RESIDENT.provider = RESIDENT.follow = RESIDENT.heard = None


def _absolute(args, cwd: str, env: dict) -> None:
    """Relative paths against the client's working folder; a bare ``--db`` as its ``$ATOMKIT_LIBRARY`` or the
    default library."""
    def here(p):
        return p if os.path.isabs(p) else os.path.join(cwd, os.path.expanduser(p))

    if getattr(args, "paths", None):
        args.paths = [here(p) for p in args.paths]
    if getattr(args, "db", None) == "":
        from atomkit.retrieval.library import default_path

        args.db = str(default_path(env))
    for field in _PATH_FIELDS:
        value = getattr(args, field, None)
        if isinstance(value, str) and value:
            setattr(args, field, here(value))
