"""atomkit.deploy.adb against tests/fake_adb/adb: one fake Pixel 8a whose programs run on the host."""
from __future__ import annotations

import logging
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atomkit.deploy import adb as device
from atomkit.deploy.adb import DeviceError, parse_runner_output
from atomkit.errors import AtomkitError

from conftest import FAKE_ADB_DIR  # the fake phone and runner fixtures live there too

SERIAL = "FAKE0001"


@pytest.fixture(scope="module", autouse=True)
def _runner_server():
    """The fake adb runs programs in children of a server that imports torch once: `adb start-server`
    warms it up in the background (while the program is exported), `adb kill-server` stops it."""
    env = {**os.environ, "FAKE_ADB_PYTHON": sys.executable}
    subprocess.run([str(FAKE_ADB_DIR / "adb"), "start-server"], env=env, timeout=30, check=False)
    yield
    subprocess.run([str(FAKE_ADB_DIR / "adb"), "kill-server"], env=env, timeout=30, check=False)


@pytest.fixture(scope="module")
def linear_pte(tmp_path_factory) -> Path:
    """A tiny XNNPACK-lowered program, made here so that no other atomkit export code is involved."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    exported = torch.export.export(torch.nn.Linear(8, 4).eval(), (torch.randn(1, 8),))
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    path = tmp_path_factory.mktemp("pte") / "linear.pte"
    path.write_bytes(program.buffer)
    return path


def test_fake_adb_is_found(phone):
    assert Path(device.adb_binary()).parent == FAKE_ADB_DIR


def test_list_devices(phone):
    assert device.list_devices() == [SERIAL]


def test_no_device(phone, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_DEVICES", "0")
    assert device.list_devices() == []
    info = device.device_info(SERIAL)  # every field tolerates the failure
    assert info["model"] is None and info["ram_bytes"] is None and info["thermal"]["status"] is None


def test_unauthorized_is_reported_not_listed(phone, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_ADB_UNAUTHORIZED", "R5CT0000XYZ")
    with caplog.at_level(logging.WARNING, logger="atomkit.deploy.adb"):
        assert device.list_devices() == [SERIAL]
    assert device.device_states() == {SERIAL: "device", "R5CT0000XYZ": "unauthorized"}
    assert "R5CT0000XYZ is unauthorized" in caplog.text and "USB debugging" in caplog.text


def test_device_info(phone):
    info = device.device_info(SERIAL)
    assert info["model"] == "Pixel 8a" and info["manufacturer"] == "Google"
    assert info["soc"] == "Tensor G3" and info["android"] == "15" and info["sdk"] == 35
    assert info["abi"] == "arm64-v8a"
    assert info["ram_bytes"] == 7812340 * 1024
    assert info["thermal"] == {"status": 0, "status_name": "none", "max_temp_c": 41.5,
                               "source": "dumpsys thermalservice"}


def test_push_pull_shell(phone, tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(bytes(range(256)) * 10)
    device.shell("mkdir -p /data/local/tmp/atomkit", SERIAL)
    device.push(src, "/data/local/tmp/atomkit/blob.bin", SERIAL)
    assert (phone / "data/local/tmp/atomkit/blob.bin").read_bytes() == src.read_bytes()
    assert "blob.bin" in device.shell("ls /data/local/tmp/atomkit", SERIAL)
    back = device.pull("/data/local/tmp/atomkit/blob.bin", tmp_path / "back" / "blob.bin", SERIAL)
    assert back.read_bytes() == src.read_bytes()


def test_failing_command_names_command_and_stderr(phone, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_ADB_FAIL", "push")
    src = tmp_path / "x.pte"
    src.write_bytes(b"x")
    with pytest.raises(DeviceError) as e:
        device.push(src, "/data/local/tmp/x.pte", SERIAL)
    msg = str(e.value)
    assert "push" in msg and str(src) in msg and "exit code 1" in msg and "Permission denied" in msg
    assert e.value.returncode == 1 and "Permission denied" in e.value.stderr
    assert isinstance(e.value, AtomkitError)
    with pytest.raises(DeviceError, match="unknown command frobnicate"):
        device.adb("frobnicate")
    with pytest.raises(DeviceError, match="not found"):
        device.shell("true", "NOPE123")


def test_timeout_is_a_device_error(phone):
    with pytest.raises(DeviceError, match="timed out after 0.5 s"):
        device.shell("sleep 5", SERIAL, timeout=0.5)


def test_missing_adb(tmp_path, monkeypatch):
    monkeypatch.delenv("ATOMKIT_ADB", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no adb anywhere
    with pytest.raises(DeviceError, match="platform-tools") as e:
        device.list_devices()
    assert "ATOMKIT_ADB" in str(e.value)
    monkeypatch.setenv("ATOMKIT_ADB", str(tmp_path / "no-such-adb"))
    with pytest.raises(DeviceError, match="ATOMKIT_ADB=.*no-such-adb"):
        device.adb("devices")


ATOMKIT_OUT = "noise\natomkit-time load_ms=12.5\natomkit-time run_ms=4.0\natomkit-time run_ms=4.5\n"
STOCK_OUT = """I 00:00:00.000412 executorch:executor_runner.cpp:283] Model file m.pte is loaded.
I 00:00:00.000420 executorch:executor_runner.cpp:292] Using method forward
I 00:00:00.012001 executorch:executor_runner.cpp:402] Model loaded in 11.250000 ms.
I 00:00:00.016001 executorch:executor_runner.cpp:470] Iteration 1 of 2: 3.500000 ms
I 00:00:00.019001 executorch:executor_runner.cpp:470] Iteration 2 of 2: 2.750000 ms
I 00:00:00.019101 executorch:executor_runner.cpp:480] Model executed successfully 2 time(s) in 6.250000 ms.
OutputX 0: tensor(sizes=[1, 4], [0.1, 0.2, 0.3, 0.4])
"""
STOCK_OLD_OUT = ("I 00:00:00.019101 executorch:executor_runner.cpp:199] "
                 "Model executed successfully 1 time(s) in 5.125 ms.\nOutput 0: tensor(sizes=[1, 4], [...])\n")


def test_parse_runner_output():
    t = parse_runner_output(ATOMKIT_OUT)
    assert (t.format, t.load_ms, t.run_ms) == ("atomkit", 12.5, [4.0, 4.5])
    t = parse_runner_output(STOCK_OUT)
    assert (t.format, t.load_ms, t.run_ms, t.total_runs, t.total_ms) == ("stock", 11.25, [3.5, 2.75], 2, 6.25)
    t = parse_runner_output(STOCK_OLD_OUT)
    assert (t.format, t.load_ms, t.run_ms, t.total_runs, t.total_ms) == ("stock", None, [], 1, 5.125)
    t = parse_runner_output(STOCK_OUT + ATOMKIT_OUT)  # a runner printing both: the contract wins
    assert (t.format, t.run_ms) == ("atomkit", [4.0, 4.5])
    assert parse_runner_output("Output 0: tensor(sizes=[1], [1.])\n").format is None


def _check(result, name, repeats, loads, run_source, load_source):
    comp, load = result["components"][name], result["load"][name]
    assert len(comp["samples"]) == repeats and comp["median"] > 0 and comp["source"] == run_source
    assert len(load["samples"]) == loads and load["median"] > 0 and load["source"] == load_source
    assert result["device"]["model"] == "Pixel 8a"


def test_bench_pte_contract_format(phone, linear_pte, runner):
    result = device.bench_pte(SERIAL, {"linear": linear_pte, "linear/copy": linear_pte}, runner,
                              warmup=2, repeats=4, loads=2)
    for name in ("linear", "linear/copy"):
        _check(result, name, repeats=4, loads=2, run_source="runner", load_source="runner")
    assert result["meta"]["runner_output_format"] == {"linear": "atomkit", "linear/copy": "atomkit"}
    assert os.access(phone / "data/local/tmp/atomkit/executor_runner", os.X_OK)
    assert (phone / "data/local/tmp/atomkit/linear_copy.pte").read_bytes() == linear_pte.read_bytes()


def test_bench_pte_stock_format(phone, linear_pte, runner, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_RUNNER_FORMAT", "stock")
    monkeypatch.setenv("ATOMKIT_RUNNER", str(runner))
    result = device.bench_pte(SERIAL, {"linear": linear_pte}, None, warmup=1, repeats=3, loads=1)
    _check(result, "linear", repeats=3, loads=1, run_source="runner", load_source="runner")
    assert result["meta"]["runner_output_format"] == {"linear": "stock"}


def test_bench_pte_old_stock_runner_falls_back_to_processes(phone, linear_pte, runner, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_RUNNER_FORMAT", "stock-old")  # only "executed successfully N time(s)"
    result = device.bench_pte(SERIAL, {"linear": linear_pte}, runner, warmup=1, repeats=2, loads=1)
    _check(result, "linear", repeats=2, loads=1, run_source="runner_process", load_source="host_wall")


def test_bench_pte_silent_runner_uses_host_wall_clock(phone, linear_pte, runner, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_RUNNER_FORMAT", "silent")  # a Release build without ET_LOG
    result = device.bench_pte(SERIAL, {"linear": linear_pte}, runner, warmup=0, repeats=1, loads=1)
    _check(result, "linear", repeats=1, loads=1, run_source="host_wall", load_source="host_wall")
    assert result["meta"]["adb_shell_overhead"]["median"] > 0


def test_bench_pte_errors(phone, linear_pte, runner, tmp_path):
    with pytest.raises(DeviceError, match="ATOMKIT_RUNNER"):
        device.bench_pte(SERIAL, {"linear": linear_pte}, None)
    with pytest.raises(DeviceError, match="does not exist"):
        device.bench_pte(SERIAL, {"linear": tmp_path / "missing.pte"}, runner)
    device.shell("mkdir -p /data/local/tmp/atomkit", SERIAL)
    device.push(runner, "/data/local/tmp/atomkit/executor_runner", SERIAL)
    with pytest.raises(DeviceError, match="Permission denied"):  # pushed but not chmod'ed
        device._run_runner(SERIAL, "/data/local/tmp/atomkit", "executor_runner", "linear.pte", 1, (), 60)
    device.shell("chmod 755 /data/local/tmp/atomkit/executor_runner", SERIAL)
    with pytest.raises(DeviceError, match="runner failed on the phone.*exit code 134") as e:
        device._run_runner(SERIAL, "/data/local/tmp/atomkit", "executor_runner", "absent.pte", 1, (), 60)
    assert "FileDataLoader" in str(e.value)


def test_cli_device_list_info_bench(phone, linear_pte, runner, tmp_path, capsys):
    """`atomkit device ...` end to end through the fake adb."""
    from atomkit.cli import main

    assert main(["device", "list"]) == 0
    assert capsys.readouterr().out.strip() == SERIAL
    assert main(["device", "info"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "Pixel 8a"
    programs = tmp_path / "programs"
    programs.mkdir()
    (programs / "encoder.pte").write_bytes(linear_pte.read_bytes())
    out = tmp_path / "phone.json"
    assert main(["device", "bench", "--programs", str(programs), "--runner", str(runner), "--repeats", "3",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["components"]["encoder"]["samples"]) == 3 and result["components"]["encoder"]["median"] > 0
    assert "encoder" in capsys.readouterr().out
    assert main(["device", "bench"]) == 2  # no --programs: a typed error, exit 2
