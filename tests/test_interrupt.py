"""`atomkit assemble` killed with SIGKILL at several moments: the output folder always holds the previous
complete set (reel, script.json, captions.json of one run) or the new one, and the next run leaves no
temporary file behind. Each run is a real process (tiny random-weight models, real videos, real moviepy)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # make test-fast leaves these out (see pyproject.toml)

TINY = ["--models", "tiny-default", "--device", "cpu", "--max-new-tokens", "4", "--beams", "1", "-k", "2"]
FIRST, SECOND = "a first reel", "a second reel"

# Runs the CLI with a SIGKILL of its own process at one point of the output code (test code, not atomkit's).
KILLER = r"""
import os, signal, sys
import atomkit.io as io, atomkit.pipeline.tasks as tasks
point = sys.argv[1]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if point == "between-files":  # the reel and captions.json are staged, script.json is not
    write = tasks.write_json_atomic
    def write_then_die(path, obj):
        out = write(path, obj)
        if path.name == "captions.json":
            die()
        return out
    tasks.write_json_atomic = write_then_die
elif point in ("before-switch", "after-switch"):
    link = io._link
    def link_then_die(target, at):
        if at.name == "current" and point == "before-switch":
            die()
        link(target, at)
        if at.name == "current":
            die()
    io._link = link_then_die
from atomkit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _argv(folder: Path, out: Path, prompt: str) -> list[str]:
    return ["assemble", str(folder), "--prompt", prompt, "--out", str(out), *TINY]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _run(folder: Path, out: Path, prompt: str) -> None:
    r = subprocess.run([sys.executable, "-m", "atomkit.cli", *_argv(folder, out, prompt), "-q"], env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def _published(out: Path) -> str:
    """The prompt of the set the folder shows, after checking that its three files belong to one run."""
    script = json.loads((out / "script.json").read_text())
    reel, captions = (out / "reel.mp4").read_bytes(), (out / "captions.json").read_bytes()
    assert hashlib.sha256(reel).hexdigest() == script["reel"]["sha256"], "the reel is not the script's"
    assert hashlib.sha256(captions).hexdigest() == script["captions_sha256"], "captions.json is not the script's"
    assert script["reel"]["n_clips"] == len(script["entries"])
    return script["prompt"]


def _temporaries(out: Path) -> list[str]:
    sets = out / ".atomkit" / "sets"
    current = (out / ".atomkit" / "current").resolve()
    return sorted([str(p.relative_to(out)) for p in out.rglob("*") if ".tmp-" in p.name]
                  + [str(p.relative_to(out)) for p in sets.iterdir() if p.resolve() != current])


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"the run ended before the moment came: {proc.stderr.read()}"
        assert time.monotonic() - t0 < timeout, "the moment never came"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)


def _reel_being_written(out: Path):
    def ready() -> bool:
        sets = out / ".atomkit" / "sets"
        current = (out / ".atomkit" / "current").resolve()
        return any(p.stat().st_size > 0 for s in sets.glob("*") if s.resolve() != current
                   for p in s.glob(".reel.mp4.tmp-*"))
    return ready


@pytest.fixture(scope="module")
def videos(tmp_path_factory, samples) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    shutil.copy(samples["carphone_pristine.mp4"], folder / "carphone.mp4")  # one 4 s clip: each run ~15 s
    return folder


def test_sigkill_at_any_moment_leaves_one_complete_set(videos, tmp_path):
    out = tmp_path / "out"
    _run(videos, out, FIRST)
    assert _published(out) == FIRST

    # during captioning: the progress bar has started, nothing is staged yet
    proc = subprocess.Popen([sys.executable, "-m", "atomkit.cli", *_argv(videos, out, SECOND)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []

    def captioning() -> bool:
        seen.append(proc.stderr.read(1))
        return "captioning" in "".join(seen)

    _kill_when(proc, captioning)
    assert _published(out) == FIRST

    # while moviepy writes the reel into the staged set
    proc = subprocess.Popen([sys.executable, "-m", "atomkit.cli", *_argv(videos, out, SECOND), "-q"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, _reel_being_written(out))
    assert _published(out) == FIRST
    assert _temporaries(out), "the kill left nothing half-written: it came too late to test anything"

    # at exact points of the publishing code, from inside the process
    for point, expected in [("between-files", FIRST), ("before-switch", FIRST), ("after-switch", SECOND)]:
        r = subprocess.run([sys.executable, "-c", KILLER, point, *_argv(videos, out, SECOND), "-q"], env=_env(),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr)
        assert _published(out) == expected, point

    _run(videos, out, SECOND)  # the next run cleans up what the killed ones left
    assert _published(out) == SECOND
    assert _temporaries(out) == []
    assert sorted(p.name for p in out.iterdir()) == [".atomkit", "captions.json", "reel.mp4", "script.json"]
