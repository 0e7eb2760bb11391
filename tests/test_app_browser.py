"""The assembly app in a real browser: `atomkit app` serves it with Voila on 127.0.0.1, Playwright drives
Debian's Chromium, the real default models caption the sample videos. The reel on disk is checked against
the sources frame by frame, with decoding written here (PyAV), not atomkit's.

`make test` installs Chromium from Debian when it is missing (as root); elsewhere this test skips with the
reason. Set ATOMKIT_APP_SCREENSHOT=docs/app.png to refresh the README's screenshot."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from media import check_reel, duration

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(900)]

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/lib/chromium/chromium") if Path(p).exists()), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.3)
    return False


@pytest.fixture
def app_server(tmp_path, samples):
    """`atomkit app <samples> --out tmp/out` in its own process group; stopped (with its kernels) after."""
    port, out, log = _port(), tmp_path / "out", tmp_path / "atomkit-app.log"
    cmd = [sys.executable, "-m", "atomkit.cli", "app", *map(str, samples.values()), "--port", str(port),
           "--out", str(out), "-k", "4"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        assert _listening(port, proc, 120), f"atomkit app did not start:\n{log.read_text()[-3000:]}"
        yield _printed_url(log, proc), out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the CLI stops Voila (its own process group) and the kernels
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _printed_url(log: Path, proc: subprocess.Popen, timeout: float = 60) -> str:
    """The URL `atomkit app` prints, with its token (the page refuses requests without it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"atomkit app: (http://127\.0\.0\.1:\d+/\?token=[\w-]+)", log.read_text(errors="replace"))
        if m:
            return m.group(1)
        time.sleep(0.2)
    raise AssertionError(f"atomkit app printed no URL:\n{log.read_text()[-3000:]}")


def _ids(page) -> list[str]:
    return [e.inner_text().strip() for e in page.query_selector_all(".ak-rows .ak-cut .ak-clip-id")]


def test_app_in_browser(app_server, samples, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make test installs it with apt-get when run as root)")
    from playwright.sync_api import expect, sync_playwright

    url, out = app_server
    by_stem = {p.stem: p for p in samples.values()}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1700})
            page.set_default_timeout(60_000)
            page.goto(url, timeout=180_000)
            page.wait_for_selector(".ak-app", timeout=180_000)
            # the library opens by itself: wait until the four sample clips are captioned and shown
            expect(page.locator(".ak-message")).to_contain_text("clips from", timeout=600_000)
            expect(page.locator(".ak-card")).to_have_count(4)
            page.locator(".ak-card button.ak-play").first.click()  # a clip plays on click
            page.wait_for_function("() => { const v = document.querySelector('video.ak-preview, .ak-preview video');"
                                   " return v && v.readyState >= 1 && v.duration > 0; }")

            page.fill(".ak-prompt input", "a man wearing a tie")
            page.click("button.ak-search")
            expect(page.locator(".ak-rows .ak-cut")).to_have_count(4)
            expect(page.locator(".ak-message")).to_contain_text("best first")
            ranked = _ids(page)
            assert sorted(ranked) == sorted(f"{stem}#00" for stem in by_stem)
            scores = [float(t.split("score ")[1].split()[0]) for t in page.locator(".ak-cut-meta").all_inner_texts()]
            assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]

            # exclude the first carphone clip (the two carphone videos show the same scene)
            drop = next(i for i in ranked if i.startswith("carphone"))
            page.locator(f".ak-cut-{ranked.index(drop)} .ak-include input").uncheck()
            expect(page.locator(".ak-cut-off")).to_have_count(1)
            # move the last clip up one place
            order = list(ranked)
            last = order.pop()
            order.insert(2, last)
            page.click(".ak-cut-3 button.ak-up")
            expect(page.locator(".ak-rows .ak-cut-2 .ak-clip-id")).to_have_text(last)
            assert _ids(page) == order
            # trim bikes to 2-7 s of its source (the in point first: out stays valid throughout)
            bikes = order.index("bikes#00")
            page.fill(f".ak-cut-{bikes} .ak-out input", "7")
            page.press(f".ak-cut-{bikes} .ak-out input", "Enter")
            page.fill(f".ak-cut-{bikes} .ak-in input", "2")
            page.press(f".ak-cut-{bikes} .ak-in input", "Enter")
            kept = [i for i in order if i != drop]
            spans = {i: (0.0, duration(by_stem[i.split("#")[0]])) for i in kept}
            spans["bikes#00"] = (2.0, 7.0)
            expected = sum(b - a for a, b in spans.values())
            # the kernel has the trim once the editor's head shows the new total
            expect(page.locator(".ak-edit-head")).to_contain_text(f"3 of 4 clips in the reel, {expected:.1f} s")
            # edit the narration of the first clip in the reel
            first = order.index(kept[0])
            line = "Our man in the car, tie and all."
            page.fill(f".ak-cut-{first} .ak-line input", line)
            page.press(f".ak-cut-{first} .ak-line input", "Tab")

            page.click("button.ak-render")
            expect(page.locator(".ak-message")).to_contain_text("rendered 3 clips", timeout=300_000)
            page.wait_for_function(
                "() => { const v = document.querySelector('video.ak-reel, .ak-reel video');"
                " return v && v.readyState >= 1 && v.duration > 0; }", timeout=60_000)
            duration_in_page = page.evaluate(
                "() => (document.querySelector('video.ak-reel, .ak-reel video')).duration")
            status = page.inner_text(".ak-status")
            # the whole page in one picture (Voila scrolls inside its own container), the reel showing a frame
            page.set_viewport_size({"width": 1200, "height": 2500})
            page.evaluate("() => new Promise(r => { const v = document.querySelector('video.ak-reel, .ak-reel video');"
                          " v.addEventListener('seeked', () => r(), {once: true}); v.currentTime = 1.0; })")
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            if os.environ.get("ATOMKIT_APP_SCREENSHOT"):
                shutil.copy(tmp_path / "app.png", os.environ["ATOMKIT_APP_SCREENSHOT"])
        finally:
            browser.close()

    for module in ("encoder", "decoder", "embedder"):
        assert f"{module} 1× load" in status, status
    script = json.loads((out / "script.json").read_text())
    assert [e["clip_id"] for e in script["entries"]] == kept
    assert script["entries"][0]["narration"] == line
    assert script["prompt"] == "a man wearing a tie"

    # the reel on disk: the kept clips, trimmed, in the edited order (the dropped carphone's twin left out)
    assert abs(duration_in_page - expected) < 0.25
    check_reel(out / "reel.mp4", [(by_stem[i.split("#")[0]], *spans[i]) for i in kept],
               [p for stem, p in by_stem.items() if stem != drop.split("#")[0]])
