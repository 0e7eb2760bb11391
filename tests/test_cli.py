"""The `atomkit` CLI, in process, with tiny random-weight models (fast)."""
from __future__ import annotations

import json

import pytest

from atomkit.cli import build_parser, main

TINY = ["--models", "tiny-default", "--device", "cpu", "--max-new-tokens", "4", "--beams", "1", "-q"]


def test_help_lists_commands_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("caption", "retrieve", "assemble", "models", "samples"):
        assert cmd in out
    assert "examples:" in out and "ATOMKIT_PAPER_WEIGHTS" in out
    sub = build_parser()._subparsers._group_actions[0].choices["assemble"].format_help()
    assert "--prompt" in sub and "--out" in sub and "--models" in sub


def test_models_and_samples(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("default") and "tiny-paper" in out
    assert main(["samples"]) == 0
    assert "bikes.mp4" in capsys.readouterr().out


def test_assemble_folder_with_corrupt_file(mixed_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["assemble", str(mixed_folder), "--prompt", "make a highlight reel", "--out", str(out), "--json", *TINY])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "broken.mp4" in captured.err  # reported by name, with its reason
    assert [s["path"] for s in result["skipped"]] == [str(mixed_folder / "broken.mp4")]
    assert sorted(p.name for p in out.iterdir()) == [".atomkit", "captions.json", "reel.mp4", "script.json"]
    assert {o.split("#")[0] for o in result["order"]} == {"bunny", "carphone"}
    assert all(r["loads"] == 1 for r in result["load"].values())


def test_caption_and_retrieve_json(samples, tmp_path, capsys):
    video = str(samples["carphone_pristine.mp4"])
    assert main(["caption", video, "--json", "--out", str(tmp_path), *TINY]) == 0
    caps = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in caps["clips"]] == ["carphone_pristine#00"]
    assert json.loads((tmp_path / "captions.json").read_text())["clips"][0]["id"] == "carphone_pristine#00"
    assert main(["retrieve", video, "--query", "a man in a car", "-k", "3", "--json", *TINY]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 1 and hits[0]["rank"] == 1


def test_all_inputs_bad_exits_nonzero(tmp_path, capsys):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"")
    assert main(["caption", str(bad), *TINY]) == 1
    err = capsys.readouterr().err
    assert "x.mp4" in err and "empty file" in err


def test_typed_errors_exit_2(samples, capsys):
    assert main(["caption", str(samples["bikes.mp4"]), "--models", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "default" in err
    assert main(["assemble", str(samples["bikes.mp4"]), "--prompt", "  ", *TINY]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["caption", str(samples["bikes.mp4"]), "--window", "0", *TINY]) == 2


def test_quantize_writes_report(samples, tmp_path, capsys):
    assert main(["quantize", str(samples["carphone_pristine.mp4"]), str(samples["bikes.mp4"]),
                 "--models", "tiny-default", "--quant", "int8", "--beams", "1", "--out", str(tmp_path), "-q"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["scheme"] == "int8" and set(report["modules"]) == {"encoder", "decoder", "embedder"}
    assert all(m["linear_embedding_ratio"] <= 0.30 for m in report["modules"].values())
    assert "SQNR" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["--models", "nope"], "available models: default"),
    (["-k", "0"], "-k must be >= 1"),
    (["--max-pages", "0"], "--max-pages must be >= 1"),
    (["--backend", "int3"], "available backends"),
    (["--window", "-1"], "window length must be a finite number of seconds > 0"),
])
def test_app_rejects_bad_settings_before_serving(argv, says, capsys, monkeypatch):
    import atomkit.app.serve as serve

    monkeypatch.setattr(serve, "serve", lambda *a, **k: pytest.fail("served despite a bad setting"))
    assert main(["app", *argv]) == 2
    assert says in capsys.readouterr().err


def test_app_page_settings_are_absolute(tmp_path, monkeypatch):
    from atomkit.app.serve import page_settings

    monkeypatch.chdir(tmp_path)
    s = page_settings(["videos", "a.mp4"], out_dir="out/app", weights=None)
    assert s["paths"] == [str(tmp_path / "videos"), str(tmp_path / "a.mp4")]
    assert s["out_dir"] == str(tmp_path / "out" / "app") and s["weights"] is None


@pytest.mark.parametrize("argv, says", [
    (["assemble", "{video}", "--prompt", ""], "prompt is empty"),
    (["assemble", "{video}", "--prompt", " \t "], "prompt is empty"),
    (["retrieve", "{video}", "--query", "   "], "query is empty"),
    (["retrieve", "{video}", "--query", "a dog", "-k", "0"], "-k must be >= 1, got 0"),
    (["assemble", "{video}", "--prompt", "a reel", "-k", "-3"], "-k must be >= 1, got -3"),
    (["caption", "{video}", "--window", "0"], "window length must be a finite number of seconds > 0, got 0.0"),
    (["caption", "{video}", "--stride", "-1"], "window stride must be a finite number of seconds > 0, got -1.0"),
    (["caption", "{video}", "--window", "inf"], "window length must be a finite number of seconds > 0, got inf"),
    (["caption", "{video}", "--stride", "nan"], "window stride must be a finite number"),
    (["index", "{video}", "--db", "{tmp}/lib.db", "--window", "0"], "window length must be"),
    (["caption", "{video}", "--device", "tpu"], "unknown device 'tpu'"),
    (["caption", "{video}", "--models", "nope"], "unknown model 'nope'; available models: default"),
    (["caption", "{video}", "--backend", "int3"], "unknown decode backend 'int3'; available backends"),
    (["caption", "{video}", "--beams", "0"], "num_beams must be >= 1"),
    (["caption", "{video}", "--programs", "{tmp}/empty"], "none of encoder.pte, decoder.pte, embedder.pte is there"),
    (["assemble", "{video}", "--prompt", "a reel", "--out", "{file}"], "is a file; give a folder"),
    (["caption", "{video}", "--out", "{file}/sub"], "cannot write in"),
    (["eval", "{video}"], "give --annotations FILE (or --devset)"),
    (["bench", "--random-weights", "--repeats", "0"], "--repeats must be >= 1"),
    (["bench-decode", "--new-tokens", "1"], "--new-tokens must be >= 2"),
    (["bench-library", "--copies", "0"], "must be >= 1"),
    (["app", "--models", "nope"], "available models: default"),
])
def test_bad_arguments_fail_before_any_model_loads(argv, says, tmp_path, samples, capsys, monkeypatch):
    import atomkit.app.serve
    import atomkit.pipeline.session

    monkeypatch.setattr(atomkit.pipeline.session.Session, "get", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(atomkit.app.serve, "serve", lambda *a, **k: pytest.fail("the app was served"))
    (tmp_path / "taken").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    argv = [a.format(video=samples["bikes.mp4"], file=tmp_path / "taken", tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert err.startswith("atomkit: error: ") and err.count("\n") == 1  # one line


def test_os_and_value_errors_are_one_line_errors(samples, tmp_path, capsys, monkeypatch):
    import atomkit.pipeline.tasks

    def full(*a, **k):
        raise OSError(5, "Input/output error")  # a full disk has its own message (tests/test_abuse.py)

    monkeypatch.setattr(atomkit.pipeline.tasks, "stitch", full)
    argv = ["assemble", str(samples["carphone_pristine.mp4"]), "--prompt", "a reel", "--out", str(tmp_path / "o"), *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "atomkit: error: [Errno 5] Input/output error (OSError; ATOMKIT_DEBUG=1 shows where)" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "reel.mp4").exists()
    monkeypatch.setenv("ATOMKIT_DEBUG", "1")
    with pytest.raises(OSError, match="Input/output error"):
        main(argv)
