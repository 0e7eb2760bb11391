"""The notebooks, run by papermill in smoke mode, with assertions on what they wrote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAKE_ADB_DIR

pytestmark = pytest.mark.notebook
ROOT = Path(__file__).resolve().parent.parent


def run(name: str, tmp_path: Path, **params) -> Path:
    import papermill

    out_dir = tmp_path / "out"
    papermill.execute_notebook(str(ROOT / "notebooks" / name), str(tmp_path / name),
                               parameters={"smoke": True, "out_dir": str(out_dir), **params},
                               cwd=str(ROOT), kernel_name="python3", progress_bar=False)
    return out_dir


def test_01_modular_pipeline(tmp_path):
    out = run("01_modular_pipeline.ipynb", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] is True and summary["model"] == "default"
    assert len(summary["clips"]) == 2 and all(c["caption"] for c in summary["clips"])
    assert {m: r["loads"] for m, r in summary["load"].items()} == {"encoder": 1, "decoder": 1, "embedder": 1}
    assert (out / "reel.mp4").stat().st_size > 1000 and summary["reel"]["duration_s"] > 0
    assert summary["script"]["entries"] and summary["hits"][0]["rank"] == 1


def test_02_quantization(tmp_path):
    out = run("02_quantization.ipynb", tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "default" and report["scheme"] == "int8"
    for m, r in report["modules"].items():
        assert r["linear_embedding_ratio"] <= 0.30, (m, r)
        assert r["sqnr_db"] is None or r["sqnr_db"] > 10, (m, r)  # None: identical outputs
    assert report["modules"]["encoder"]["sqnr_db"] is None or report["modules"]["encoder"]["sqnr_db"] >= 20
    assert report["pipeline"]["captions"]["n"] == 2 and 0 <= report["pipeline"]["captions"]["bleu4"] <= 1
    sizes = report["sizes"]["decoder"]
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]


def test_03_serialization(tmp_path):
    out = run("03_serialization.ipynb", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny-default" and summary["quant"] == "int8" and summary["checks"]["passed"]
    report = json.loads(Path(summary["report"]).read_text())
    assert set(report["modules"]) == {"encoder", "decoder"}  # smoke: the embedder's export is tested in test_export
    assert report["pipeline"]["load"]["embedder"]["source"] == "eager"
    assert all(report["pipeline"]["load"][m]["source"].endswith(".pte") for m in ("encoder", "decoder"))
    assert set(summary["load_times"]) == {"torchscript", "pte"}  # random weights: no eager registry load
    assert all(v["first_load_s"] > 0 for v in summary["load_times"].values())
    assert report["pipeline"]["clips"] == 2 and Path(report["pipeline"]["reel"]).is_file()


def test_04_latency(tmp_path, phone, runner):
    """Smoke run with the fake adb (tests/fake_adb) on PATH: the phone section runs the pushed programs."""
    import subprocess

    try:
        out = run("04_latency.ipynb", tmp_path, runner=str(runner))
    finally:
        subprocess.run([str(FAKE_ADB_DIR / "adb"), "kill-server"], timeout=30, check=False)
    decode = json.loads((out / "decode.json").read_text())
    assert decode["tok_s"]["hf_generate"] > 0 and decode["tok_s"]["int8"] > 0
    assert (out / "decode.png").read_bytes()[:4] == b"\x89PNG"
    phone = json.loads((out / "phone.json").read_text())
    assert phone["device"]["model"] == "Pixel 8a" and phone["components"]["encoder"]["median"] > 0
    assert phone["load"]["encoder"]["median"] > 0
    result = json.loads((out / "bench.json").read_text())
    assert result["model"] == "tiny-default" and result["random_weights"] is True
    assert set(result["end_to_end"]) == {"retrieval", "assembly"}
    for task in result["end_to_end"].values():
        assert task["reuse"] > 0 and task["no_reuse"] > 0
    assert result["overlap"]["N"] == 2 and result["overlap"]["L_D"] > 0
    assert result["overlap"]["disjoint"]["bound_s"] > 0 and result["components"]["model_unloading"]["reuse"]["total"] > 0
    assert result["outputs_identical"] == {"captions": True, "scripts": True}
    assert Path(result["timeline_png"]).read_bytes()[:4] == b"\x89PNG"


def test_05_interactive_assembly(tmp_path):
    from media import duration

    out = run("05_interactive_assembly.ipynb", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] is True and summary["clips"] == 3 and len(summary["runs"]) == 3
    assert {m: r["loads"] for m, r in summary["load"].items()} == {"encoder": 1, "decoder": 1, "embedder": 1}
    sources = {Path(c["video"]).stem + "#00": Path(c["video"])
               for c in json.loads((out / "reel-1" / "captions.json").read_text())["clips"]}
    for n, run_ in enumerate(summary["runs"], start=1):
        ranked = run_["ranked"]
        assert sorted(ranked) == sorted(sources)  # k=3 of the 3 clips
        kept = ranked[:-1]  # the notebook drops the last-ranked clip, then moves the new last to the front
        script = json.loads((out / f"reel-{n}" / "script.json").read_text())
        assert [e["clip_id"] for e in script["entries"]] == [kept[-1], *kept[:-1]]
        assert script["entries"][0]["narration"] == f"Reel {n}: {run_['prompt']}."
        reel = out / f"reel-{n}" / "reel.mp4"
        assert abs(duration(reel) - sum(duration(sources[i]) for i in kept)) < 0.25


def test_06_library(tmp_path):
    out = run("06_library.ipynb", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] is True and summary["model"] == "default"
    assert summary["counts"] == {"videos": 3, "unreadable": 0, "clips": 3, "configs": 1, "pending": 0}
    ray = summary["ray"]
    assert ray["workers"]["backend"] == "ray" and ray["workers"]["actors"] == 1
    assert [Path(p).name for p in ray["captioned"]] == ["carphone_pristine.mp4"]
    for q, r in summary["queries"].items():
        scores = [h["score"] for h in r["hits"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    top = summary["queries"]["a cartoon animal in the grass"]["hits"][0]
    assert top["id"] == "bigbuckbunny#00", top  # the Big Buck Bunny clip is the cartoon animal
    assert [Path(p).name for p in summary["pruned"]] == ["renamed_bigbuckbunny.mp4"]
    ev = summary["eval"]  # smoke: no bikes video, so 3 of the 4 hand-written queries are scored
    assert ev["queries"] == 3 and ev["dropped_queries"] == 1 and ev["videos"] == 3
    assert ev["video"]["r5"] == 1.0 and ev["video"]["r1"] >= 2 / 3, ev["per_query"]


def test_07_real_model(tmp_path):
    out = run("07_real_model.ipynb", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] is True and summary["model"] == "tiny-smolvlm2"
    assert summary["loads"] == {"encoder": 1, "decoder": 1, "embedder": 1}
    assert len(summary["clips"]) == 2 and len({c["caption"] for c in summary["clips"]}) == 2
    for r in summary["reels"].values():
        assert Path(r["reel"]).stat().st_size > 1000 and r["duration_s"] > 0 and r["order"]
