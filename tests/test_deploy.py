"""`atomkit export` (deploy.export_model) and the pipeline on .pte programs, with the tiny test models."""
from __future__ import annotations

import json

import pytest

from atomkit import Session
from atomkit.config import DecodeConfig, exact
from atomkit.deploy.report import export_model, pipeline_check
from atomkit.errors import AtomkitError
from atomkit.deploy.runtime import PteDecoder, PteEmbedder, PteEncoder, open_program
from atomkit.deploy.timing import bench_programs
from atomkit.pipeline.tasks import caption
from atomkit.media.scan import sample_videos

pytestmark = pytest.mark.slow  # make test-fast leaves these out (see pyproject.toml)

MODEL = "tiny-default"


@pytest.fixture(scope="module")
def fp32_programs(tmp_path_factory):
    """All three tiny modules exported without quantization (no load-time probe, no pipeline run)."""
    out = tmp_path_factory.mktemp("programs-fp32")
    report = export_model(MODEL, "none", out, max_seq_len=768, load_times=False, progress=False)
    return out, report


@pytest.fixture(scope="module")
def two_videos():
    return [v for v in sample_videos() if v.name in ("carphone_pristine.mp4", "bigbuckbunny.mp4")]


def test_export_writes_programs_sidecars_tokenizers_and_report(fp32_programs):
    out, report = fp32_programs
    for m in ("encoder", "decoder", "embedder"):
        assert (out / f"{m}.pte").stat().st_size > 1000
        side = json.loads((out / f"{m}.json").read_text())
        assert side["module"] == m and side["model"] == MODEL and side["quant"] == "none"
        assert set(side["versions"]) >= {"torch", "torchao", "executorch"}
        assert report["modules"][m]["parity"]["passed"], report["modules"][m]["parity"]
        assert report["modules"][m]["pte_sqnr_db_vs_fp32"] >= 40  # fp32 program vs fp32 eager, real inputs
    assert (out / "decoder.tokenizer").is_dir() and (out / "embedder.tokenizer").is_dir()
    dec = report["modules"]["decoder"]  # the compact program: 4 rows (beam 4), its export time and pieces
    assert dec["batch"] == 4 and dec["program_kind"] == "llama-custom-ops" and dec["export_seconds"] > 0
    assert dec["delegation"]["pieces_per_layer"] <= 2.5
    assert set(dec["delegation"]["methods"]) == {"forward", "step", "prefill", "reorder", "clear"}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["checks"]["passed"] and on_disk["checks"]["parity"] == {"encoder": True, "decoder": True,
                                                                           "embedder": True}
    assert not list(out.glob(".*tmp*")), "no temp files left behind"


def test_open_program_needs_no_eager_model(fp32_programs):
    out, _ = fp32_programs
    assert isinstance(open_program(out / "encoder.pte"), PteEncoder)
    assert isinstance(open_program(out / "embedder.pte"), PteEmbedder)
    dec = open_program(out / "decoder.pte")
    assert isinstance(dec, PteDecoder) and dec.lm is None and dec.stop_at_eos is False  # random LM: no EOS
    with pytest.raises(AtomkitError, match="no such .pte"):
        open_program(out / "nothing.pte")


def test_an_encoder_program_whose_sidecar_names_the_detector_runs_it_on_the_host(fp32_programs, two_videos, tmp_path):
    """The default encoder's program: its sidecar records the detector (OpenCV, not in the program), and the host runs
    it next to the program. Here the tiny encoder's program with the sidecar field set: the man in the car is seen."""
    import shutil

    from atomkit.config import WindowConfig
    from atomkit.media.video import clips, sample_frames

    out, _ = fp32_programs
    shutil.copy(out / "encoder.pte", tmp_path / "encoder.pte")
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["detector"] is None  # tiny-default has none
    (tmp_path / "encoder.json").write_text(json.dumps({**meta, "detector": "ssd-mobilenet-v2-coco"}))
    enc = open_program(tmp_path / "encoder.pte")
    car = next(v for v in two_videos if v.stem == "carphone_pristine")
    frames = sample_frames(clips(car, WindowConfig())[0])
    assert enc.detector is not None and "person" in dict(enc.encode(frames).concepts)
    assert "person" not in dict(open_program(out / "encoder.pte").encode(frames).concepts)


@pytest.mark.parametrize("captions", ["grounded", "raw"])
def test_session_on_programs_captions_like_eager(fp32_programs, two_videos, captions):
    """fp32 programs, greedy: the same captions as the eager session on the exact engine (the same quantization:
    none), grounded (the program scores the subjects) and raw free captions (the program writes the tokens); the two clips'
    captions differ."""
    out, _ = fp32_programs
    decode = DecodeConfig(max_new_tokens=6, num_beams=1, captions=captions)
    with Session(MODEL, decode=exact(decode)) as eager, Session(MODEL, decode=decode, programs=out) as pte:
        a, b = caption(eager, two_videos), caption(pte, two_videos)
        assert [c.caption for c in a.clips] == [c.caption for c in b.clips]
        assert len({c.caption for c in a.clips}) == 2
        assert [c.concepts for c in a.clips] == [c.concepts for c in b.clips]
        report = pte.load_report()
        assert {m: r["source"] for m, r in report.items()} == {"encoder": "encoder.pte", "decoder": "decoder.pte"}
        assert "programs=" in repr(pte)


def test_session_on_programs_beam4_captions_like_eager(fp32_programs, two_videos):
    """Free captions with beam 4 on the decoder program (its rows are the beams): the exact eager engine's captions."""
    out, _ = fp32_programs
    decode = DecodeConfig(max_new_tokens=6, num_beams=4, captions="raw")
    with Session(MODEL, decode=exact(decode)) as eager, Session(MODEL, decode=decode, programs=out) as pte:
        a, b = caption(eager, two_videos), caption(pte, two_videos)
        assert [c.caption for c in a.clips] == [c.caption for c in b.clips]
        assert len({c.caption for c in a.clips}) == 2
        assert pte.get("decoder").greedy_fallbacks == 0


def test_session_programs_errors(fp32_programs, tmp_path):
    out, _ = fp32_programs
    with pytest.raises(AtomkitError, match="no such folder"):
        Session(MODEL, programs=tmp_path / "missing")
    with pytest.raises(AtomkitError, match="atomkit export"):
        Session(MODEL, programs=tmp_path)  # exists, but holds no program
    with pytest.raises(AtomkitError, match="own quantization"):
        Session(MODEL, programs=out, quant="int8")
    with pytest.raises(AtomkitError, match="exported from model 'tiny-default'"):
        Session("tiny-paper", programs=out)


def test_pipeline_check_assembles_on_programs(fp32_programs, two_videos, tmp_path):
    out, _ = fp32_programs
    res = pipeline_check(MODEL, out, two_videos, tmp_path / "reel",
                         decode=DecodeConfig(max_new_tokens=5, num_beams=1, script_max_new_tokens=8))
    assert res["clips"] == 2 and res["captions"]["identical_share"] == 1.0  # fp32 programs, same decoding
    assert (tmp_path / "reel" / "reel.mp4").stat().st_size > 1000
    assert all(r["source"].endswith(".pte") for r in res["load"].values())


def test_bench_programs_on_host_has_device_bench_schema(fp32_programs):
    out, _ = fp32_programs
    res = bench_programs({m: out / f"{m}.pte" for m in ("encoder", "decoder", "embedder")}, warmup=1, repeats=2,
                         loads=1)
    assert set(res) == {"device", "components", "load", "meta"}
    for m in ("encoder", "decoder", "embedder"):
        assert len(res["components"][m]["samples"]) == 2 and res["components"][m]["median"] > 0
        assert res["load"][m]["median"] > 0


def test_cli_export_int8_encoder(tmp_path, capsys):
    from atomkit.cli import main

    code = main(["export", "--models", MODEL, "--quant", "int8", "--only", "encoder", "--no-load-times",
                 "--out", str(tmp_path), "-q"])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0 and "checks passed" in printed
    ratio = report["checks"]["int8_linear_embedding_ratio"]
    assert ratio["passed"] and ratio["values"]["encoder"] <= 0.30
    assert report["checks"]["encoder_sqnr_db"]["passed"]
    assert report["modules"]["encoder"]["parity"]["sqnr_min_db"] == 20.0
