"""Indexing on a real local Ray cluster (started here with 2 CPUs, stopped after), tiny random-weight model.

The tiny model writes the same noise for every clip, so these tests tell the videos apart by what the
windows make of them: cut into 2 s windows every 2 s, each of the four videos has clip bounds of its own. A result stored under the wrong video, a dropped video or a video stored twice
fails the comparison with a run in one process."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import av
import ipaddress

import numpy as np
import psutil
import pytest

import atomkit
from atomkit.retrieval.cluster import ClusterError, RayCaptioner, init_local, token_auth_on
from atomkit.retrieval.indexing import load_index, update
from atomkit.retrieval.library import Library

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module's tests."""
    init_local(2)
    yield ray.cluster_resources()
    ray.shutdown()


@pytest.fixture(scope="module")
def session():
    """tiny-default cut into 2 s windows every 2 s (so videos of different lengths give different clips)."""
    with atomkit.Session("tiny-default", device="cpu", decode=atomkit.DecodeConfig(max_new_tokens=4, num_beams=1),
                         window=atomkit.WindowConfig(length_s=2, stride_s=2)) as s:
        yield s


@pytest.fixture
def four(tmp_path, samples) -> Path:
    """Three real sample videos (4.0, 5.3 and 10 s) and a 13 s one written here with PyAV."""
    f = tmp_path / "videos"
    f.mkdir()
    for name in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"):
        shutil.copy(samples[name], f / name)
    with av.open(str(f / "ramp.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(130):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 2 % 256, np.uint8), format="rgb24")))
        out.mux(stream.encode(None))
    return f


def _stored(lib: Library, session) -> dict[str, tuple]:
    """video name -> its stored clips as (index, start, end, caption, concept labels)."""
    out: dict[str, list] = {}
    for c in load_index(session, lib).captions.clips:
        out.setdefault(Path(c.clip.video).name, []).append(
            (c.clip.index, round(c.clip.start_s, 3), round(c.clip.end_s, 3), c.caption, tuple(lbl for lbl, _ in c.concepts)))
    return {k: tuple(sorted(v)) for k, v in out.items()}


def test_two_actors_index_what_one_process_does_and_a_killed_worker_is_retried(cluster, session, four, tmp_path):
    with Library(tmp_path / "local.db") as lib:
        update(session, lib, [four])
        expected = _stored(lib, session)
    assert sorted(expected) == ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "ramp.mp4"]
    assert len(set(expected.values())) == 4, "each video must have clip bounds of its own"
    n_clips = sum(len(v) for v in expected.values())

    killed: list[str] = []
    killed_worker: list[str] = []
    driver = atomkit.Session("tiny-default", device="cpu", decode=session.decode, window=session.window)
    with Library(tmp_path / "ray.db") as lib, RayCaptioner(driver, actors=2) as pool:
        assert len({w["pid"] for w in pool.workers}) == 2 and os.getpid() not in {w["pid"] for w in pool.workers}

        def kill_one_in_flight(done: int, total: int) -> None:
            if done == 1 and not killed:  # a worker dies while it captions a video (as on an OOM kill)
                video, worker = next(iter(pool.assignments.items()))
                os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
                killed.append(str(video))
                killed_worker.append(worker)

        report = update(driver, lib, [four], captioner=pool, on_progress=kill_one_in_flight)
        assert killed, "a video was in flight on the other actor when the first result arrived"
        assert sorted(Path(p).name for p in report.captioned) == sorted(expected)
        assert report.failed == [] and report.clips_new == n_clips and not report.cancelled
        w = report.workers
        # the first result came from one actor; the other is killed while it holds a video. Where that video had
        # just finished (its result already sent), the kill lands on the next video the dead worker is given, and
        # that one is retried: one death and one retry either way, and every clip stored once (below)
        assert w["backend"] == "ray" and w["deaths"] == 1 and len(w["retried"]) == 1
        per_worker = w["videos_per_worker"]
        assert w["retried"] == killed or per_worker.get(killed_worker[0]) == 1, (w["retried"], killed, per_worker)
        assert sum(per_worker.values()) == 4 and per_worker.get(killed_worker[0], 0) <= 1
        assert _stored(lib, driver) == expected  # the same clips under the same videos, nothing twice
        assert lib.counts()["clips"] == n_clips
        again = update(driver, lib, [four], captioner=pool)
        assert again.captioned == [] and len(again.cached) == 4
    assert driver.loaded() == []  # the actors captioned; the driver only wrote the library


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


def test_the_local_cluster_listens_on_loopback_only_with_token_auth(cluster, session):
    """Every listening socket of the cluster's processes (GCS, raylet, agents, the driver, the actors) is on
    loopback, and its servers run with Ray's token authentication."""
    driver = atomkit.Session("tiny-default", device="cpu", decode=session.decode, window=session.window)
    with RayCaptioner(driver, actors=2):
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        sockets = set()
        for p in procs:
            try:
                sockets |= {(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                            if c.status == psutil.CONN_LISTEN}
            except psutil.NoSuchProcess:
                continue
        names = {name for name, _, _ in sockets}
        assert {"gcs_server", "raylet"} <= names and sum(n.startswith("ray::") for n in names) >= 1, sockets
        assert [s for s in sockets if not _loopback(s[1])] == []
        gcs = next(p for p in procs if p.name() == "gcs_server")
        assert gcs.environ().get("RAY_AUTH_MODE") == "token" and token_auth_on()


def test_workers_that_cannot_load_the_model_say_why(cluster, tmp_path):
    s = atomkit.Session("atom-paper", device="cpu", weights=tmp_path / "no-such-weights")
    with pytest.raises(ClusterError, match="could not load 'atom-paper'.*no-such-weights"):
        with RayCaptioner(s, actors=1):
            pass


def test_cli_index_on_ray(cluster, tmp_path, samples, capsys):
    from atomkit.cli import main

    f = tmp_path / "v"
    f.mkdir()
    for name in ("bigbuckbunny.mp4", "carphone_pristine.mp4"):
        shutil.copy(samples[name], f / name)
    db = tmp_path / "lib.db"
    args = ["index", str(f), "--db", str(db), "--models", "tiny-default", "--device", "cpu", "--max-new-tokens", "4",
            "--beams", "1", "--ray", "--actors", "1", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["workers"]["backend"] == "ray" and out["workers"]["actors"] == 1
    assert sorted(Path(p).name for p in out["captioned"]) == ["bigbuckbunny.mp4", "carphone_pristine.mp4"]
    assert out["counts"]["clips"] == 2
    assert main(["index", str(f), "--db", str(db), "--ray", "--actors", "0"]) == 2
    assert "--actors must be at least 1" in capsys.readouterr().err
    assert main(["index", str(f), "--db", str(db), "--models", "tiny-default", "--ray", "--actors", "3"]) == 2
    assert "3 actor(s) x 1 CPU / 0 GPU need more than the cluster has (2 CPUs, 0 GPUs)" in capsys.readouterr().err


def test_bench_throughput_on_the_running_cluster(cluster, session, samples):
    from atomkit.bench.library import throughput

    video = samples["carphone_pristine.mp4"]
    t = throughput(session, [video], actors=(1,), copies=2)
    assert t["videos"] == 2
    clips = t["one_process"]["clips"]
    assert clips == 2 * len(session.caption([video]).clips) > 2
    (r,) = t["ray"]
    assert r["actors"] == 1 and r["clips"] == clips and r["videos"] == 2 and r["failed"] == 0
    assert sum(r["videos_per_worker"].values()) == 2 and r["clips_per_s"] > 0 and r["startup_s"] > 0
