"""How a client and ``atomkit serve`` talk: one Unix socket that only its user can reach, and length-prefixed
JSON frames on it.

Where: ``$ATOMKIT_SOCKET``, else ``<cache>/serve/atomkit.sock`` (``$ATOMKIT_CACHE`` or ``~/.cache/atomkit``). The
folder is made owner-only (0700) and the socket owner-only (0600), so the file system refuses another local user
before the service sees them; the service also reads the peer's uid from the socket (``SO_PEERCRED``) and refuses
any other uid (root included), so a socket whose modes were loosened by hand still answers only its owner. No
TCP port is opened: nothing listens on any network address.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON. A request is one frame; a frame over
``MAX_REQUEST`` bytes, or one that is not a JSON object, gets an error frame and the connection is closed, the
service stays up. Replies are frames of ``{"out": text}`` / ``{"err": text}`` (a command's stdout and stderr as it
writes them) ending with ``{"exit": status}``, or one ``{"result": ...}`` / ``{"error": text}`` frame.
"""
from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

from atomkit.errors import AtomkitError

MAX_REQUEST = 1 << 20  # bytes in one request frame (a command line and its environment fit in far less)
MAX_REPLY = 1 << 28
_HEADER = struct.Struct(">I")
FORWARDED = ("caption", "retrieve", "assemble", "index")  # the commands a running service answers
# environment a command reads: a client whose values differ is declined (it runs locally instead) rather than
# answered with the service's settings. ATOMKIT_LIBRARY is per request (the library a bare --db names).
ENV_KEYS = ("ATOMKIT_CACHE", "ATOMKIT_PAPER_WEIGHTS", "HF_HOME", "HF_HUB_CACHE", "ATOMKIT_DEVICE")
UNIX_PATH_MAX = 107  # bytes in sun_path, less its terminating NUL (Linux)


class ServiceError(AtomkitError):
    """The service could not be reached, refused a request, or broke off its reply."""


class RequestError(ServiceError):
    """A malformed or oversized request (the service answers it with an error and stays up)."""


def socket_path(env: dict | None = None) -> Path:
    """The service's socket: ``$ATOMKIT_SOCKET``, else ``<cache>/serve/atomkit.sock``."""
    env = os.environ if env is None else env
    if env.get("ATOMKIT_SOCKET"):
        return Path(env["ATOMKIT_SOCKET"]).expanduser()
    cache = env.get("ATOMKIT_CACHE")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache" / "atomkit") / "serve" / "atomkit.sock"


def check_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > UNIX_PATH_MAX:
        raise ServiceError(f"the socket path {path} is longer than a Unix socket allows ({UNIX_PATH_MAX} bytes): "
                           "set ATOMKIT_SOCKET to a shorter path")


def connect(path: Path, timeout: float | None) -> socket.socket:
    """A connected socket to the service at ``path`` (OSError when nothing listens there)."""
    check_path(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        raise
    return s


def answers(path: Path) -> bool:
    """Whether a service listens at ``path`` (a socket file left by a killed one does not)."""
    try:
        connect(path, timeout=2).close()
        return True
    except (OSError, ServiceError):
        return False


def send(sock: socket.socket, message: dict) -> None:
    data = json.dumps(message, ensure_ascii=False).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 16))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def receive(sock: socket.socket, limit: int = MAX_REPLY) -> dict | None:
    """The next frame as a dict, or None when the peer closed the connection before one began."""
    header = _exactly(sock, _HEADER.size)
    if header is None:
        return None
    (n,) = _HEADER.unpack(header)
    if n > limit:
        raise RequestError(f"a frame of {n} bytes is over the limit of {limit} bytes")
    data = _exactly(sock, n)
    if data is None:
        raise RequestError(f"the connection closed inside a frame ({n} bytes announced)")
    try:
        message = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"a frame is not JSON ({e})") from None
    if not isinstance(message, dict):
        raise RequestError(f"a frame must be a JSON object, got {type(message).__name__}")
    return message


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux ``SO_PEERCRED``; None elsewhere)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid
