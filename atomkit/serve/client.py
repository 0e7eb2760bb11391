"""Talking to ``atomkit serve``: the CLI's thin path (``forward``) and the Python client (``connect``).

``forward`` runs before the CLI imports anything heavy: when a service is listening at the socket and the
command is one it answers, the command line goes there and its output comes back, so a query costs a Python
start and a round trip instead of importing torch and loading models. With no service (or ``--no-server``,
``--help``, ``--ray``), the CLI runs the command itself, with the same results.

    >>> import atomkit
    >>> svc = atomkit.connect()                                  # doctest: +SKIP
    >>> svc.retrieve("a man wearing a tie", db="lib.db", k=3)["hits"][0]["caption"]   # doctest: +SKIP
    >>> svc.status()["sessions"][0]["resident"]                  # doctest: +SKIP
    ['embedder']
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from atomkit.serve.protocol import ENV_KEYS, FORWARDED, ServiceError, connect as _open, receive, send, socket_path

_ENV_SENT = ("ATOMKIT_LIBRARY", *ENV_KEYS)
_LOCAL_FLAGS = {"--no-server", "-h", "--help", "--ray"}  # a command line with one of these runs here


def _begin_run(sock: socket.socket, argv: list[str], cwd: str | None = None) -> tuple[dict | None, str | None]:
    """Send one command line; (the service's info, None) when it runs it, else (None, why not: its decline or
    error, None when it sent nothing)."""
    send(sock, {"op": "run", "argv": list(argv), "cwd": os.path.abspath(cwd or os.getcwd()),
                "env": {k: os.environ[k] for k in _ENV_SENT if k in os.environ}})
    first = receive(sock)
    if first is None or "service" not in first:
        first = first or {}
        return None, first.get("decline") or first.get("error")
    return first["service"], None


def forward(argv: list[str]) -> int | None:
    """Run ``argv`` on a running service and relay its output; the exit status, or None to run it here (no
    service, or one that declines: another command or other environment)."""
    if not argv or argv[0] not in FORWARDED or _LOCAL_FLAGS.intersection(argv):
        return None
    path = socket_path()
    if not path.exists():
        return None
    try:
        sock = _open(path, timeout=5)
    except OSError:  # a socket file whose service is gone (killed): run here
        return None
    with sock:
        try:
            info, why = _begin_run(sock, argv)
            sock.settimeout(None)  # a command may run for long; progress frames arrive meanwhile
        except (OSError, ServiceError):
            return None
        if info is None:
            if why:
                print(f"atomkit: the service at {path} did not take this command ({why}); running it here",
                      file=sys.stderr)
            return None
        print(f"atomkit: answered by the service at {path} (pid {info.get('pid')}; --no-server runs it here)",
              file=sys.stderr, flush=True)
        return _relay(sock, path)


def _relay(sock: socket.socket, path: Path, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    while True:
        try:
            msg = receive(sock)
        except (OSError, ServiceError) as e:
            msg, why = None, str(e)
        else:
            why = "it closed the connection"
        if msg is None:
            print(f"atomkit: error: the service at {path} broke off this command ({why}); "
                  "`atomkit serve --status` shows whether it still runs, --no-server runs the command here", file=err)
            return 2
        if "out" in msg:
            out.write(msg["out"])
        elif "err" in msg:
            err.write(msg["err"])
        elif "exit" in msg:
            out.flush()
            return int(msg["exit"])
        elif "error" in msg:
            print(f"atomkit: error: {msg['error']}", file=err)
            return 2


class Completed:
    """One command the service ran: its exit status and what it wrote (a plain class: the CLI's thin path imports
    this module, and ``dataclasses`` alone would cost it ~8 ms)."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def __repr__(self) -> str:
        return f"Completed(returncode={self.returncode}, stdout={len(self.stdout)} chars, stderr={len(self.stderr)} chars)"

    def json(self):
        if self.returncode != 0:
            raise ServiceError(f"the command failed (exit {self.returncode}): {self.stderr.strip()[-2000:]}")
        return json.loads(self.stdout)


class _Buffer:
    def __init__(self):
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.parts)


class Client:
    """A running ``atomkit serve``, for notebooks and scripts: the CLI's commands with its resident modules."""

    def __init__(self, path: str | Path | None = None, timeout: float | None = None):
        self.path = Path(path) if path else socket_path()
        self.timeout = timeout
        self.status()  # fails now, with the way out, when nothing answers

    def _ask(self, request: dict) -> dict:
        try:
            sock = _open(self.path, self.timeout)
        except FileNotFoundError:
            raise ServiceError(f"no atomkit service at {self.path}: start one with `atomkit serve --detach`") from None
        except OSError as e:
            raise ServiceError(f"cannot reach the atomkit service at {self.path} ({e}): `atomkit serve --status`, "
                               "or start one with `atomkit serve --detach`") from None
        with sock:
            send(sock, request)
            reply = receive(sock)
        if reply is None:
            raise ServiceError(f"the service at {self.path} closed the connection without a reply")
        if "error" in reply:
            raise ServiceError(reply["error"])
        return reply["result"]

    def status(self) -> dict:
        """pid, uptime, requests, and per resident session: what is loaded, its MiB and load counts."""
        return self._ask({"op": "status"})

    def stop(self) -> dict:
        return self._ask({"op": "stop"})

    def run(self, argv: list[str], cwd: str | None = None) -> Completed:
        """Run one command line (``["retrieve", "--db", "lib.db", "--query", "..."]``) on the service."""
        out, err = _Buffer(), _Buffer()
        with _open(self.path, self.timeout) as sock:
            info, why = _begin_run(sock, argv, cwd)
            if info is None:
                raise ServiceError(f"the service did not run {argv[0]!r}: {why or 'no reply'}")
            code = _relay(sock, self.path, out, err)
        return Completed(code, out.text(), err.text())

    def retrieve(self, query: str, db: str | Path = "", k: int = 5, **options) -> dict:
        """The clips of the library ``db`` (default: the default library) that best fit ``query``, as
        ``atomkit retrieve --json`` gives them."""
        return self.run(["retrieve", "--db", str(db), "--query", query, "-k", str(k), *_flags(options), "--json"]).json()

    def index(self, paths, db: str | Path = "", **options) -> dict:
        return self.run(["index", *map(str, paths), "--db", str(db), *_flags(options), "--json"]).json()

    def caption(self, paths, **options) -> dict:
        return self.run(["caption", *map(str, paths), *_flags(options), "--json"]).json()


def _flags(options: dict) -> list[str]:
    """``models="default", quiet=True`` -> ``--models default --quiet``."""
    out = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value not in (False, None):
            out += [flag, str(value)]
    return out


def start(path: Path, idle_unload_s: float, log: Path, *, env: dict | None = None, new_session: bool = False,
          timeout: float = 60.0):
    """Start ``atomkit serve`` at ``path`` as a child process, its output appended to ``log`` (owner-only), and wait
    until it answers: (the process, a ``Client``). A ``ServiceError`` with the log's last lines when it exits first
    or does not answer within ``timeout`` seconds (then it is terminated). ``new_session``: detached from this
    terminal's process group (``atomkit serve --detach``)."""
    import subprocess
    import time

    cmd = [sys.executable, "-m", "atomkit.cli", "serve", "--socket", str(path), "--idle-unload", str(idle_unload_s)]
    with open(log, "ab") as out:
        os.chmod(log, 0o600)
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=new_session)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = Path(log).read_text(errors="replace").strip().splitlines()[-5:]
            raise ServiceError(f"the service exited with status {proc.returncode}:\n  " + "\n  ".join(tail))
        try:
            return proc, Client(path, timeout=10)
        except ServiceError:
            if time.monotonic() > deadline:
                proc.terminate()
                raise ServiceError(f"the service did not answer within {timeout:g} s (log {log})") from None
            time.sleep(0.1)


def connect(path: str | Path | None = None, timeout: float | None = None) -> Client:
    """The running ``atomkit serve`` at ``path`` (default: ``$ATOMKIT_SOCKET`` or the cache's ``serve/atomkit.sock``);
    a ``ServiceError`` that says how to start one when none answers."""
    return Client(path, timeout)
