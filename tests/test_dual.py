"""A dual encoder (open_clip) as the fourth resident module: on a tiny random open_clip model (unit tests only)
written in open_clip's checkpoint layout and loaded through atomkit's loader, a clip's vector is open_clip's
``encode_image`` of its frames pooled over time, a query's is ``encode_text``; the clips are ranked in that space
through caption, retrieve, the library and eval; missing weights say what to fetch."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import atomkit
from atomkit.media.scan import sample_videos
from atomkit.media.video import clips as cut_clips, sample_frames
from atomkit.models import dual
from atomkit.models.registry import LoadOptions, get_spec

DECODE = atomkit.DecodeConfig(max_new_tokens=4, num_beams=1)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return dual.write_random(tmp_path_factory.mktemp("clip") / "tiny-clip", dual.TINY)


@pytest.fixture(scope="module")
def videos():
    return [p for p in sample_videos() if p.name in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")]


def test_vectors_are_open_clips_encode_image_pooled_and_encode_text(tiny_folder, videos):
    import open_clip

    ret = dual.load(tiny_folder)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_folder}")  # open_clip's own path
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_folder}")
    window = atomkit.WindowConfig(frames=4)
    pooled = []
    for video in videos:
        frames = sample_frames(cut_clips(video, window)[0], window)
        x = ret.preprocess(frames)
        assert x.shape == (4, 3, ret.image_size, ret.image_size)
        with torch.no_grad():
            want = F.normalize(F.normalize(model.encode_image(x), dim=-1).mean(0), dim=0)
        got = ret.embed_clip(frames)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        pooled.append(got)
    assert min(float((a - b).norm()) for i, a in enumerate(pooled) for b in pooled[i + 1:]) > 1e-3  # clips differ
    texts = ["a cartoon rabbit", "people ride bikes", "a man talks on the phone"]
    with torch.no_grad():
        want = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    torch.testing.assert_close(ret.embed(texts), want, rtol=0, atol=1e-6)


def test_a_session_ranks_with_the_retriever_through_caption_retrieve_and_the_library(tmp_path, videos):
    from atomkit.retrieval.indexing import load_index, update
    from atomkit.retrieval.library import Library

    with atomkit.Session("tiny-clip", device="cpu", decode=DECODE) as s:
        caps = s.caption(videos)
        assert all(c.vector is not None for c in caps.clips)
        idx = atomkit.index(s, caps)
        assert idx.space == "retriever" and idx.vectors.shape == (len(caps.clips), 32)
        ret = s.get("retriever")
        q = ret.embed(["a cartoon rabbit"])[0]
        hits = s.retrieve(idx, "a cartoon rabbit", k=len(caps.clips))
        assert [h.clip.id for h in hits] == [caps.clips[i].id for i in (idx.vectors @ q).argsort(descending=True)]
        assert s.loaded() == ["encoder", "decoder", "retriever"]  # the embedder is not needed to rank
        assert s.load_report()["retriever"]["loads"] == 1
    with atomkit.Session("tiny-clip", device="cpu", decode=DECODE) as s, Library(tmp_path / "lib.db") as lib:
        update(s, lib, videos)
        stored = load_index(s, lib)
        assert stored.space == "retriever"
        by_id = {c.id: v for c, v in zip(stored.captions.clips, stored.vectors)}
        for c in caps.clips:  # the library holds the pooled frame vectors, not caption embeddings
            torch.testing.assert_close(by_id[c.id], c.vector, rtol=0, atol=1e-6)
    with atomkit.Session("tiny-clip", device="cpu", decode=DECODE) as s, Library(tmp_path / "lib.db") as lib:
        hits = s.retrieve(load_index(s, lib), "people ride bikes", k=2)
        assert len(hits) == 2 and s.loaded() == ["retriever"]  # a query needs only the text tower


def test_cli_index_then_retrieve_on_a_dual_spec_and_eval_views(tmp_path, videos, capsys):
    from atomkit.cli import main

    folder = tmp_path / "v"
    folder.mkdir()
    for v in videos:
        shutil.copy(v, folder / v.name)
    db = tmp_path / "lib.db"
    tiny = ["--models", "tiny-clip", "--device", "cpu", "--max-new-tokens", "4", "--beams", "1", "-q"]
    assert main(["index", str(folder), "--db", str(db), *tiny]) == 0
    capsys.readouterr()
    assert main(["retrieve", "--db", str(db), "--query", "people ride bikes", "-k", "2", "--json", *tiny]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in out["hits"]] == [1, 2] and set(out["load"]) == {"retriever"}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"queries": [{"q": "a cartoon rabbit", "relevant": ["bigbuckbunny"]},
                                           {"q": "people ride bikes", "relevant": ["bikes"]}]}))
    assert main(["eval", str(folder), "--annotations", str(ann), "--views", "--no-meteor", "--json", *tiny]) == 0
    views = json.loads(capsys.readouterr().out)["views"]
    assert {"dual encoder (frames)", "fusion (dual encoder + caption, RRF)", "caption"} <= set(views)


def test_weights_from_the_cache_or_a_folder_and_a_clear_error_without_them(tiny_folder, tmp_path, monkeypatch):
    spec = get_spec("default-mobileclip2-s0")
    assert spec.repo == "timm/MobileCLIP2-S0-OpenCLIP" and "retriever" in spec.modules
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(atomkit.ModelNotFound) as e:
        spec.load("retriever", LoadOptions())
    assert "timm/MobileCLIP2-S0-OpenCLIP" in str(e.value) and "atomkit fetch default-mobileclip2-s0" in str(e.value)
    assert isinstance(spec.load("retriever", LoadOptions(weights=tiny_folder)), dual.DualEncoder)
    rev = "fedcba9876543210fedcba9876543210fedcba98"
    snap = tmp_path / "hub" / "models--timm--MobileCLIP2-S0-OpenCLIP"
    shutil.copytree(tiny_folder, snap / "snapshots" / rev)
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text(rev)
    assert spec.load("retriever", LoadOptions()).weight_files[0].parent.name == rev


def test_the_mobileclip_architectures_build_and_embed():
    """The published towers at full size (random weights, unit test of the shapes only): MobileCLIP2-S0's FastViT
    image tower and its text tower give 512-d unit vectors."""
    import open_clip

    model = dual._build(dual.TOWERS["mobileclip2-s0"]).eval()
    ret = dual.DualEncoder(model, open_clip.get_tokenizer("MobileCLIP2-S0"), image_size=256,
                           mean=dual.MOBILECLIP_PREPROCESS["mean"], std=dual.MOBILECLIP_PREPROCESS["std"])
    v = ret.embed_clip(torch.randint(0, 255, (1, 3, 2, 224, 224), dtype=torch.uint8))
    t = ret.embed(["a dog"])
    assert v.shape == (512,) and t.shape == (1, 512) and abs(float(v.norm()) - 1) < 1e-5


def test_int8_towers_keep_the_ranking_close(videos):
    """torchao int8 of both towers (their Linear layers): clip and query vectors stay close to fp32's."""
    out = {}
    for quant in ("none", "int8"):
        with atomkit.Session("tiny-clip", device="cpu", decode=DECODE, quant=quant) as s:
            caps = s.caption(videos)
            ret = s.get("retriever")
            kinds = {type(m.weight).__name__ for m in ret.modules() if isinstance(m, torch.nn.Linear)}
            assert ("IntxUnpackedToInt8Tensor" in kinds) == (quant == "int8"), kinds  # (the out_proj of
            # nn.MultiheadAttention stays float: MultiheadAttention calls its weight itself, not the Linear)
            out[quant] = (torch.stack([c.vector for c in caps.clips]), ret.embed(["a cartoon rabbit", "bikes"]))
    for a, b in zip(out["none"], out["int8"]):
        cos = (a * b).sum(-1)
        assert float(cos.min()) > 0.9 and not torch.equal(a, b), cos


@pytest.mark.slow
def test_both_towers_export_with_parity_and_rank_on_the_programs(tmp_path, videos):
    """`atomkit export` of the retriever (int8): the image tower and the text tower as two programs, each checked
    against its eager int8 tower; a session on them gives the eager int8 session's clip vectors and ranking."""
    from atomkit.deploy.program import read_sidecar
    from atomkit.deploy.report import export_model

    out = tmp_path / "programs"
    r = export_model("tiny-clip", "int8", out, load_times=False, progress=False, modules=("retriever",))
    assert r["checks"]["passed"], r["checks"]
    par = r["modules"]["retriever"]["parity"]
    assert par["passed"] and par["outputs"]["frame_vectors"]["sqnr_db"] >= 20 and par["text"]["outputs"]["vectors"]["sqnr_db"] >= 20
    assert read_sidecar(out / "retriever.pte")["text_program"] == "retriever-text.pte"
    with atomkit.Session("tiny-clip", device="cpu", decode=DECODE, quant="int8") as s:
        eager = s.caption(videos)
        want = [h.clip.id for h in s.retrieve(eager, "people ride bikes", k=3)]
    with atomkit.Session("tiny-clip", device="cpu", decode=DECODE, programs=out) as s:
        caps = s.caption(videos)
        assert s.load_report()["retriever"]["source"] == "retriever.pte"
        for a, b in zip(eager.clips, caps.clips):
            assert float((a.vector * b.vector).sum()) > 0.999
        assert [h.clip.id for h in s.retrieve(caps, "people ride bikes", k=3)] == want
