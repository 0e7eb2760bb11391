"""The notebooks, run by papermill in smoke mode, with assertions on what they wrote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_04_latency(tmp_path):
    out = run("04_latency.ipynb", tmp_path)
    result = json.loads((out / "bench.json").read_text())
    assert result["model"] == "tiny-default" and result["random_weights"] is True
    assert set(result["end_to_end"]) == {"retrieval", "assembly"}
    for task in result["end_to_end"].values():
        assert task["reuse"] > 0 and task["no_reuse"] > 0
    assert result["overlap"]["N"] == 2 and result["overlap"]["L_D"] > 0
    assert result["outputs_identical"] == {"captions": True, "scripts": True}
    assert Path(result["timeline_png"]).read_bytes()[:4] == b"\x89PNG"
