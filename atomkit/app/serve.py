"""`atomkit app`: the assembly app served as a standalone page by Voila on 127.0.0.1, for its user only.

``serve`` writes a one-cell page notebook into a scratch folder (owner-only) and runs Voila on it; the settings
(paths, model, decoding, output folder) reach the page's kernel as JSON in ``$ATOMKIT_APP``, and ``show_page``
builds the Session and the app there. The page needs the token in the URL that ``serve`` prints (as Jupyter
does), answers only to loopback Host names, and holds a capped number of kernels (``atomkit.app.pages``).
Stopping the server (Ctrl-C, or SIGTERM to its process group) ends its kernels too.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from atomkit.app.pages import CULL_S, MAX_PAGES, voila_config

ENV = "ATOMKIT_APP"
_PAGE = """# atomkit interactive assembly: the settings come from $ATOMKIT_APP (written by `atomkit app`)
from atomkit.app.serve import show_page
app = show_page()"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """True once something accepts TCP connections on 127.0.0.1:port (a connect, not a GET: every GET of
    a Voila page starts a kernel); False on timeout or when ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def page_settings(paths, *, model: str = "default", out_dir: str | Path = "out/app", k: int = 5,
                  device: str | None = None, weights: str | None = None, random_weights: bool = False,
                  programs: str | None = None, decode: dict | None = None, window: dict | None = None,
                  db: str | None = None) -> dict:
    """The JSON the page's kernel reads: every path absolute (the kernel runs in another folder)."""
    absolute = lambda p: str(Path(p).expanduser().resolve()) if p else None  # noqa: E731
    return {"paths": [absolute(p) for p in paths or []], "model": model, "out_dir": absolute(out_dir), "k": int(k),
            "device": device, "weights": absolute(weights), "random_weights": bool(random_weights),
            "programs": absolute(programs), "decode": decode or {}, "window": window or {},
            "db": None if db is None else (absolute(db) or "")}


def show_page(settings: dict | None = None):
    """Build the Session and the app from ``settings`` (default: ``$ATOMKIT_APP``) and display the page.
    A bad setting (an unknown model, missing weights) is shown as a message, not a traceback."""
    from IPython.display import HTML, display

    from atomkit.config import DecodeConfig, WindowConfig
    from atomkit.errors import AtomkitError
    from atomkit.pipeline.session import Session
    from atomkit.app.assembly import AssemblyApp

    cfg = settings if settings is not None else json.loads(os.environ.get(ENV) or "{}")
    try:
        session = Session(cfg.get("model", "default"), device=cfg.get("device"), weights=cfg.get("weights"),
                          random_weights=cfg.get("random_weights", False), programs=cfg.get("programs"),
                          decode=DecodeConfig(**cfg.get("decode", {})), window=WindowConfig(**cfg.get("window", {})))
    except AtomkitError as e:
        display(HTML(f"<p style='color:#b00020'><b>atomkit app cannot start:</b> {e}</p>"))
        return None
    library = None
    if cfg.get("db") is not None:
        from atomkit.retrieval.library import Library

        try:
            library = Library(cfg["db"] or None)
        except AtomkitError as e:
            display(HTML(f"<p style='color:#b00020'><b>atomkit app cannot start:</b> {e}</p>"))
            return None
    app = AssemblyApp(session, cfg.get("paths") or None, out_dir=cfg.get("out_dir") or "out/app",
                      k=cfg.get("k", 5), library=library)
    display(app.widget)
    return app


def voila_command(notebook: Path, port: int) -> list[str]:
    """Voila on ``notebook``; the rest of its settings (the token among them) are in ``voila.json`` beside it."""
    return [sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
            "--show_tracebacks=True", "--VoilaConfiguration.file_allowlist=.*\\.(png|jpg|gif|svg|mp4)"]


def start(settings: dict, *, port: int | None = None, folder: Path | None = None, log_path: Path | None = None,
          max_pages: int = MAX_PAGES, cull_s: int = CULL_S) -> tuple[subprocess.Popen, str, Path]:
    """Start Voila on the app page in its own process group; returns (process, URL with the token, page folder).
    Stop it with ``stop(process)``."""
    folder = Path(folder or tempfile.mkdtemp(prefix="atomkit-app-page-"))  # mkdtemp: owner-only
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(nbformat.v4.new_code_cell(_PAGE))
    nb.cells[0].id = "atomkit-app"
    notebook = folder / "atomkit_app.ipynb"
    nbformat.write(nb, notebook)
    token = secrets.token_urlsafe(24)
    config = folder / "voila.json"  # Voila reads voila.json from its working folder
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(voila_config(token, max_pages=max_pages, cull_s=cull_s), f)
    port = port or free_port()
    env = {**os.environ, ENV: json.dumps(settings), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    log = open(log_path or folder / "voila.log", "wb")
    proc = subprocess.Popen(voila_command(notebook, port), cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return proc, f"http://127.0.0.1:{port}/?token={token}", folder


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """End the server and its kernels (its whole process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def serve(settings: dict, *, port: int | None = None, startup_timeout: float = 120, max_pages: int = MAX_PAGES) -> int:
    """Serve the page until Ctrl-C; prints the URL (with its token). Returns a process exit status."""
    proc, url, folder = start(settings, port=port, max_pages=max_pages)
    port = int(url.split(":")[2].split("/")[0])
    log = folder / "voila.log"
    # SIGTERM (a service manager, a test's teardown) stops Voila too: it runs in its own process group
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if not wait_for_port(port, startup_timeout, proc):
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            print(f"atomkit: error: Voila did not start on 127.0.0.1:{port}; its log ({log}):\n{tail}", file=sys.stderr)
            return 1
        print(f"atomkit app: {url}\n  (this machine only; the token lets only you in; at most "
              f"{max_pages} pages at once; Voila log: {log}; Ctrl-C stops it)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        print("atomkit app: stopped", file=sys.stderr)
        return 0
    finally:
        stop(proc)
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(folder, ignore_errors=True)
