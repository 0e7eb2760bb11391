"""`atomkit app`'s server lets in only its user: a real Voila serves the page (tiny random-weight model, unit
scale), plain HTTP requests knock on it. Without the token: refused, and no kernel starts. A foreign Host
header (DNS rebinding): refused. Page after page: never more kernels than the cap."""
from __future__ import annotations

import http.client
import time
from urllib.parse import urlsplit

import psutil
import pytest

from atomkit.app.serve import page_settings, start, stop, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    settings = page_settings([], model="tiny-default", device="cpu", out_dir=folder / "out",
                             decode={"num_beams": 1, "max_new_tokens": 4})
    proc, url, _ = start(settings, folder=folder, max_pages=2)
    try:
        port = urlsplit(url).port
        assert wait_for_port(port, 120, proc), (folder / "voila.log").read_text()[-3000:]
        yield proc, url
    finally:
        stop(proc)


def _get(url: str, *, host: str | None = None, token: bool = True) -> tuple[int, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    path = "/" + (f"?{parts.query}" if token else "")
    conn.request("GET", path, headers={"Host": host} if host else {})
    response = conn.getresponse()
    body = response.read().decode(errors="replace")
    conn.close()
    return response.status, body


def _kernels(proc, settle_s: float = 0.0) -> int:
    """Kernel processes the server holds now (after up to ``settle_s`` for ended ones to exit)."""
    deadline = time.monotonic() + settle_s
    while True:
        n = sum("ipykernel" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True)
                if c.is_running() and c.status() != psutil.STATUS_ZOMBIE)
        if time.monotonic() >= deadline:
            return n
        time.sleep(0.5)


def test_no_token_no_page_and_no_kernel(server):
    proc, url = server
    status, body = _get(url, token=False)
    assert status in (302, 403) and "atomkit" not in body.lower()
    assert _kernels(proc) == 0


def test_a_foreign_host_header_is_refused(server):
    proc, url = server
    status, _ = _get(url, host=f"evil.example.com:{urlsplit(url).port}")
    assert status == 403
    status, _ = _get(url, host="rebind.attacker.test")
    assert status == 403
    assert _kernels(proc) == 0


def test_ten_reloads_hold_no_more_kernels_than_the_cap(server):
    proc, url = server
    for host in (None, f"localhost:{urlsplit(url).port}"):  # 127.0.0.1 and localhost are the user's own names
        status, body = _get(url, host=host)
        assert status == 200 and "ak-" in body, body[-2000:]
    held = []
    for _ in range(8):
        status, _ = _get(url)
        assert status == 200
        held.append(_kernels(proc))
    assert max(held) <= 2 and _kernels(proc, settle_s=10) <= 2, held
