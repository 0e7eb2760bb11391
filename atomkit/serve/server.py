"""``atomkit serve``: one process that keeps sessions resident for every CLI call, notebook and app of its user.

A request runs the very command the CLI would run (same parser, same code, its paths made absolute against the
client's working folder), with one difference: ``session_from`` hands it a resident session for its settings
instead of building one, so modules load once and every later call reuses them (ATOM's reuse, across processes).
A command's stdout and stderr go back to its client as it writes them (a thread-local router in place of
``sys.stdout``/``sys.stderr``), so several clients run at once and each sees only its own output.

Modules a session has not used for ``idle_unload_s`` seconds are unloaded (Immich's ``MACHINE_LEARNING_MODEL_TTL``
does the same for its resident CLIP model) and load again on the next request; ``status`` shows what is resident,
what it holds, how often each module was loaded and for how long the service has run.

Transport and trust: ``atomkit.serve.protocol``.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from atomkit.serve.protocol import (ENV_KEYS, FORWARDED, MAX_REQUEST, RequestError, ServiceError, answers,
                                    check_path, peer_uid, receive, send, socket_path)
from atomkit.version import __version__

IDLE_UNLOAD_S = 300.0  # Immich's default model TTL


class _Router(io.TextIOBase):
    """Stands in for ``sys.stdout``/``sys.stderr``: a thread serving a request writes to its client; any other
    thread to the service's own stream."""

    def __init__(self, real, which: str, local: threading.local):
        self.real, self.which, self.local = real, which, local

    def write(self, text: str) -> int:
        target = getattr(self.local, "client", None)
        if target is None:
            return self.real.write(text)
        target.write(self.which, text)
        return len(text)

    def flush(self) -> None:
        if getattr(self.local, "client", None) is None:
            self.real.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"

    def fileno(self) -> int:
        return self.real.fileno()


class _Client:
    """One connection's replies; a client that went away is noted and its command runs on unheard."""

    def __init__(self, conn: socket.socket):
        self.conn, self.gone, self.lock = conn, False, threading.Lock()

    def write(self, which: str, text: str) -> None:
        self.send({which: text})

    def send(self, message: dict) -> None:
        with self.lock:
            if self.gone:
                return
            try:
                send(self.conn, message)
            except OSError:
                self.gone = True


class _Resident:
    """A session kept for one combination of settings."""

    def __init__(self, key: str, build):
        self.key, self.build, self.session = key, build, None
        self.in_flight, self.requests, self.last_used = 0, 0, time.monotonic()
        self.lock = threading.Lock()


class Service:
    """The resident sessions and the socket that serves them (``run()`` blocks until ``stop()``)."""

    def __init__(self, runner, path: str | Path | None = None, idle_unload_s: float = IDLE_UNLOAD_S, log=None):
        """``runner(argv, cwd, env, service) -> exit status`` runs one command line with the service's ``borrow``
        (resident sessions), ``follow`` (captions in the background) and ``heard`` (what queries ranked high):
        the CLI's ``atomkit.cli.serve.run_command``."""
        if not idle_unload_s > 0:
            from atomkit.errors import InputError

            raise InputError(f"--idle-unload must be a number of seconds > 0, got {idle_unload_s}")
        self.runner = runner
        self.path = Path(path) if path else socket_path()
        check_path(self.path)
        self.idle_unload_s = float(idle_unload_s)
        self.log = log or sys.__stderr__
        self.residents: dict[str, _Resident] = {}
        self.started = time.time()
        self.requests = 0
        self.unloads = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._local = threading.local()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._env = {k: os.environ.get(k) for k in ENV_KEYS}
        self.followers: dict[tuple, object] = {}  # (library, settings) -> atomkit.retrieval.deferred.Follower
        self.recent: dict[str, list] = {}  # library -> (video, window) of the clips recent queries ranked high

    # -- lifecycle -------------------------------------------------------------------------------------------
    def bind(self) -> None:
        """Create the owner-only folder and socket; a live service at the same path is an error, a stale socket
        file (its service was killed) is replaced."""
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)
        if self.path.exists() or self.path.is_symlink():
            if answers(self.path):
                raise ServiceError(f"a service is already running at {self.path} (`atomkit serve --status`)")
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created owner-only, with no moment at wider modes
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        self._listener = listener

    def run(self) -> None:
        """Serve until ``stop()`` (or SIGTERM/SIGINT when run on the main thread)."""
        if self._listener is None:
            self.bind()
        sys.stdout = _Router(sys.stdout, "out", self._local)
        sys.stderr = _Router(sys.stderr, "err", self._local)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        reaper = threading.Thread(target=self._unload_idle, name="atomkit-idle-unload", daemon=True)
        reaper.start()
        self._listener.settimeout(0.2)
        try:
            while not self._stopping.is_set():
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stopping.is_set():
                        break
                    raise
                t = threading.Thread(target=self._handle, args=(conn,), name="atomkit-request", daemon=True)
                with self._lock:
                    self._threads.add(t)
                t.start()
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
        deadline = time.monotonic() + 30
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        for f in list(self.followers.values()):
            f.stop(timeout=60)  # after the group in flight: its captions land, the rest stay pending
        for r in self.residents.values():
            if r.session is not None:
                r.session.close()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        print(f"atomkit serve: stopped after {self.requests} requests", file=self.log, flush=True)

    # -- sessions --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def borrow(self, model: str, settings: dict):
        """The resident session for these settings (built on first use); never closed by the command."""
        key = repr((model, sorted(settings.items())))
        with self._lock:
            r = self.residents.get(key)
            if r is None:
                from atomkit.pipeline.session import Session

                r = self.residents[key] = _Resident(key, lambda: Session(model, **settings))
            r.in_flight += 1
            r.requests += 1
        try:
            with r.lock:
                if r.session is None:
                    r.session = r.build()
            yield r.session
        finally:
            with self._lock:
                r.in_flight -= 1
                r.last_used = time.monotonic()

    def _resident_of(self, session) -> _Resident:
        return next(r for r in self.residents.values() if r.session is session)

    def follow(self, db, session) -> None:
        """Caption the library's pending clips in the background with this resident session (once per library
        and settings at a time); the session counts as busy meanwhile, so it is not unloaded."""
        from atomkit.retrieval.deferred import Follower

        r = self._resident_of(session)
        key = (str(Path(db).resolve()), r.key)

        def done():
            with self._lock:
                r.in_flight -= 1
                r.last_used = time.monotonic()

        with self._lock:
            running = self.followers.get(key)
            if (running is not None and running.running) or self._stopping.is_set():
                return
            r.in_flight += 1
            self.followers[key] = Follower(session, key[0], prefer=lambda: set(self.recent.get(key[0], ())),
                                           log=self.log, on_done=done).start()

    def heard(self, db, clips: list[tuple[str, int]]) -> None:
        """A query ranked these (video, window) clips high: their captions go first."""
        key = str(Path(db).resolve())
        with self._lock:
            self.recent[key] = (list(clips) + self.recent.get(key, []))[:50]

    def _unload_idle(self) -> None:
        while not self._stopping.wait(min(1.0, self.idle_unload_s / 4)):
            now = time.monotonic()
            for r in list(self.residents.values()):
                with self._lock:
                    idle = r.in_flight == 0 and now - r.last_used >= self.idle_unload_s
                    loaded = r.session.loaded() if r.session is not None and idle else []
                    if loaded:
                        r.in_flight += 1  # no request takes the session while its modules go
                if not loaded:
                    continue
                try:
                    for m in loaded:
                        r.session.unload(m, collect=m == loaded[-1])
                    self.unloads += 1
                    _trim_heap()  # a long-lived process: what the modules held goes back to the system
                    print(f"atomkit serve: unloaded {', '.join(loaded)} of {r.session.model} after "
                          f"{now - r.last_used:.0f} s idle", file=self.log, flush=True)
                finally:
                    with self._lock:
                        r.in_flight -= 1

    def status(self) -> dict:
        sessions = []
        now = time.monotonic()
        for r in list(self.residents.values()):
            s = r.session
            report = s.load_report() if s is not None else {}
            loaded = s.loaded() if s is not None else []
            sessions.append({
                "model": s.model if s is not None else None, "settings": r.key, "requests": r.requests,
                "in_flight": r.in_flight, "idle_s": round(now - r.last_used, 1), "resident": loaded,
                "resident_mib": round(sum(report[m]["bytes"] for m in loaded if m in report) / 2**20, 1),
                "modules": {m: {"loads": v["loads"], "mib": round(v["bytes"] / 2**20, 1),
                                "last_load_s": round(v["seconds"], 3), "resident": m in loaded}
                            for m, v in report.items()}})
        return {"pid": os.getpid(), "version": __version__, "socket": str(self.path),
                "uptime_s": round(time.time() - self.started, 1), "idle_unload_s": self.idle_unload_s,
                "requests": self.requests, "unloads": self.unloads, "rss_mib": _rss_mib(), "sessions": sessions,
                "captions": [f.status() for f in list(self.followers.values())]}

    # -- requests --------------------------------------------------------------------------------------------
    def _handle(self, conn: socket.socket) -> None:
        client = _Client(conn)
        try:
            with conn:
                uid = peer_uid(conn)
                if uid is not None and uid != os.getuid():
                    client.send({"error": f"refused: this service belongs to uid {os.getuid()}, the caller is uid {uid}"})
                    print(f"atomkit serve: refused a connection from uid {uid}", file=self.log, flush=True)
                    return
                try:
                    request = receive(conn, limit=MAX_REQUEST)
                except RequestError as e:
                    client.send({"error": f"bad request: {e}"})
                    return
                if request is None:
                    return
                with self._lock:
                    self.requests += 1
                self._answer(client, request)
        except Exception as e:  # one request's failure never takes the service down
            print(f"atomkit serve: a request failed: {type(e).__name__}: {e}", file=self.log, flush=True)
            client.send({"error": f"the service failed on this request: {type(e).__name__}: {e}"})
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _answer(self, client: _Client, request: dict) -> None:
        op = request.get("op")
        if op == "status":
            client.send({"result": self.status()})
        elif op == "stop":
            client.send({"result": {"stopping": True, "pid": os.getpid()}})
            self.stop()
        elif op == "run":
            self._run(client, request)
        else:
            client.send({"error": f"bad request: unknown op {op!r} (status, stop, run)"})

    def _run(self, client: _Client, request: dict) -> None:
        argv, cwd, env = request.get("argv"), request.get("cwd"), request.get("env") or {}
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and argv
                and isinstance(cwd, str) and os.path.isabs(cwd) and isinstance(env, dict)):
            client.send({"error": "bad request: run needs argv (a non-empty list of strings), an absolute cwd and env"})
            return
        if argv[0] not in FORWARDED:
            client.send({"decline": f"the service answers {', '.join(FORWARDED)}, not {argv[0]!r}"})
            return
        differs = [k for k in ENV_KEYS if env.get(k) != self._env[k]]
        if differs:
            client.send({"decline": f"the client's {', '.join(differs)} differ from the service's"})
            return
        client.send({"service": {"pid": os.getpid(), "version": __version__}})
        client.send({"exit": self._command(client, argv, cwd, env)})

    def _command(self, client: _Client, argv: list[str], cwd: str, env: dict) -> int:
        self._local.client = client
        try:
            return self.runner(argv, cwd, env, self)
        finally:
            self._local.client = None


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_mib() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None
