"""SmolVLM2 split into a resident encoder and a resident decoder is still the model: on a tiny random-weight
SmolVLM2 (unit tests only: its text is noise) written to disk with ``save_pretrained`` in the checkpoint layout and
loaded through atomkit's loader, the split captioning gives the tokens transformers'
``SmolVLMForConditionalGeneration.generate`` gives on the same frames and prompt, greedy and beam 4. The tiny
model's answers differ from clip to clip, so the comparison can fail. Weights come only from a folder or the
Hugging Face cache, offline; a missing model says what to fetch and how."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import atomkit
from atomkit.media.scan import sample_videos
from atomkit.media.video import clips as cut_clips, frame_times, sample_frames
from atomkit.models import smolvlm
from atomkit.models.registry import LoadOptions, get_spec


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny SmolVLM2 in the checkpoint layout (config.json, model.safetensors, processor and tokenizer files)."""
    return smolvlm.write_random(tmp_path_factory.mktemp("ckpt") / "tiny-smolvlm2", smolvlm.TINY)


@pytest.fixture(scope="module")
def clips_frames():
    """The first clip of each sample video: (frames uint8 (1, 3, T, S, S), frame times in the clip, clip length)."""
    window = atomkit.WindowConfig(frames=4, size=smolvlm.TINY.frame_px)
    out = []
    for video in sample_videos():
        clip = cut_clips(video, window)[0]
        times = [t - clip.start_s for t in frame_times(clip, window.frames)]
        out.append((sample_frames(clip, window), times, clip.duration_s))
    return out


def _reference(folder):
    from transformers import AutoProcessor, SmolVLMForConditionalGeneration

    return (SmolVLMForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval(),
            AutoProcessor.from_pretrained(folder, local_files_only=True))


def _generate(model, processor, frames, times, duration, beams: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own path: the processor's chat template and video expansion, then ``generate``."""
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": smolvlm.CAPTION_REQUEST}]}], add_generation_prompt=True)
    inputs = processor(text=[text], videos=[smolvlm.frames_array(frames)], do_sample_frames=False,
                       video_metadata=[smolvlm.video_metadata(times, duration, frames.shape[2])], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, num_beams=beams, do_sample=False, early_stopping=True,
                             eos_token_id=[], pad_token_id=processor.tokenizer.pad_token_id)
    return inputs["input_ids"][0], out[0, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("beams", [1, 4])
def test_split_captioning_gives_generates_tokens(tiny_folder, clips_frames, beams):
    model, processor = _reference(tiny_folder)
    enc, dec = smolvlm.load_encoder(tiny_folder), smolvlm.load_decoder(tiny_folder, stop_at_eos=False)
    answers = []
    for frames, times, duration in clips_frames:
        want_prompt, want = _generate(model, processor, frames, times, duration, beams)
        e = enc.encode(frames)
        e.times, e.duration_s = times, duration
        assert torch.equal(dec._ids(dec.video_prompt(e))[0], want_prompt)  # the model's own prompt, token for token
        (got,) = dec.generate_batch(embeds=[dec.clip_embeds(e)], max_new_tokens=8, num_beams=beams, backend="torch")
        assert got.tolist() == want.tolist()
        answers.append(tuple(want.tolist()))
    assert len(set(answers)) >= 3, "the tiny model must answer differently for different clips"


def test_the_encoder_is_the_models_vision_tower_and_connector(tiny_folder, clips_frames):
    model, processor = _reference(tiny_folder)
    enc = smolvlm.load_encoder(tiny_folder)
    frames, _, _ = clips_frames[0]
    pixels = processor.video_processor(videos=[smolvlm.frames_array(frames)], do_sample_frames=False,
                                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = model.model.get_image_features(pixels).pooler_output[0]
    got = enc.encode(frames).features
    assert got.shape == (frames.shape[2], processor.image_seq_len, model.config.text_config.hidden_size)
    torch.testing.assert_close(got.reshape(want.shape), want, rtol=0, atol=0)
    assert enc.labels is None and enc.encode(frames).concepts == []


def test_a_session_loads_each_module_once_across_caption_retrieve_assemble_and_prompts(tmp_path):
    """tiny-smolvlm2 through the whole product: caption, two prompts of retrieve and assemble, one load per module."""
    videos = [p for p in sample_videos() if p.name in ("bigbuckbunny.mp4", "carphone_pristine.mp4")]
    decode = atomkit.DecodeConfig(max_new_tokens=6, num_beams=1, script_max_new_tokens=24)
    with atomkit.Session("tiny-smolvlm2", device="cpu", decode=decode) as s:
        assert (s.window.frames, s.window.size) == (smolvlm.FRAMES, smolvlm.TINY.frame_px)  # the model's own
        caps = s.caption(videos)
        assert len(caps.clips) == 2 and len({c.caption for c in caps.clips}) == 2
        for i, prompt in enumerate(("a cartoon rabbit", "a man on the phone")):
            assert len(s.retrieve(caps, prompt, k=2)) == 2
            reel = s.assemble(caps, prompt, tmp_path / f"reel{i}", k=2)
            assert reel.reel.is_file() and reel.reel_info["n_clips"] >= 1
        loads = s.load_report()
        assert {m: loads[m]["loads"] for m in ("encoder", "decoder", "embedder")} == \
            {"encoder": 1, "decoder": 1, "embedder": 1}


def test_weights_come_from_the_hugging_face_cache_offline(tiny_folder, tmp_path, monkeypatch):
    """A snapshot in the cache layout (models--OWNER--NAME/snapshots/REV + refs/main) is found offline under the
    real spec's repository id; without it, the error names the repository, the folder and the fetch command."""
    repo = smolvlm.SIZES["256m"].repo
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    spec = get_spec("smolvlm2-256m")
    with pytest.raises(atomkit.ModelNotFound) as e:
        spec.load("decoder", LoadOptions())
    msg = str(e.value)
    assert repo in msg and str(cache / "models--HuggingFaceTB--SmolVLM2-256M-Video-Instruct") in msg
    assert "atomkit fetch smolvlm2-256m" in msg and "--weights DIR" in msg
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--HuggingFaceTB--SmolVLM2-256M-Video-Instruct"
    shutil.copytree(tiny_folder, snap / "snapshots" / rev)
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text(rev)
    dec = spec.load("decoder", LoadOptions())
    assert isinstance(dec, smolvlm.SmolVLMDecoder) and dec.weight_files[0].parent.name == rev
    with pytest.raises(atomkit.ModelNotFound, match="no-such-folder"):
        spec.load("encoder", LoadOptions(weights=tmp_path / "no-such-folder"))
    assert isinstance(spec.load("encoder", LoadOptions(weights=tiny_folder)), smolvlm.SmolVLMEncoder)


def test_fetch_offline_says_so_in_one_line(tmp_path):
    """This machine reaches no model hub: `atomkit fetch` says so plainly, in one line, exit 2."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = subprocess.run([sys.executable, "-m", "atomkit.cli", "fetch", "smolvlm2-256m"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot download HuggingFaceTB/SmolVLM2-256M-Video-Instruct" in lines[0]
    assert "not reachable" in lines[0] and "--weights DIR" in lines[0]
    r = subprocess.run([sys.executable, "-m", "atomkit.cli", "fetch", "default"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2 and "nothing to fetch" in r.stderr


def test_quantized_and_through_the_library(tmp_path):
    """The tiny SmolVLM2 quantized with torchao (int8: both modules' Linear layers) still captions, and its clips go
    through the library like any spec's (stored once, read back without loading the encoder or decoder)."""
    from atomkit.retrieval.indexing import load_index, update
    from atomkit.retrieval.library import Library

    video = [p for p in sample_videos() if p.name == "carphone_pristine.mp4"]
    decode = atomkit.DecodeConfig(max_new_tokens=6, num_beams=1)
    with atomkit.Session("tiny-smolvlm2", device="cpu", decode=decode, quant="int8") as s:
        caps = s.caption(video)
        assert caps.clips and caps.clips[0].caption
        for module in (s.get("encoder"), s.get("decoder")):  # every Linear holds torchao's int8 weights
            kinds = {type(m.weight).__name__ for m in module.modules() if isinstance(m, torch.nn.Linear)}
            assert kinds == {"IntxUnpackedToInt8Tensor"}, kinds
    with atomkit.Session("tiny-smolvlm2", device="cpu", decode=decode) as s, Library(tmp_path / "lib.db") as lib:
        first = update(s, lib, video)
        assert len(first.captioned) == 1
    with atomkit.Session("tiny-smolvlm2", device="cpu", decode=decode) as s, Library(tmp_path / "lib.db") as lib:
        assert update(s, lib, video).captioned == []
        idx = load_index(s, lib)
        assert len(idx.captions.clips) == 1 and s.retrieve(idx, "a man on the phone", k=1)
        assert s.loaded() == ["embedder"]


@pytest.mark.slow
def test_export_int8_programs_with_parity_and_captions_on_them(tmp_path):
    """`atomkit export` of the tiny SmolVLM2 (int8): the vision tower + connector as a program, the LM as the compact
    decode program with the two methods a video-language prompt needs (token_embeddings, prefill_embeds), each
    checked against its eager module; then a session on the programs captions clips from their frames."""
    from atomkit.deploy.program import read_sidecar
    from atomkit.deploy.report import export_model

    out = tmp_path / "programs"
    r = export_model("tiny-smolvlm2", "int8", out, load_times=False, progress=False,
                     decode=atomkit.DecodeConfig(max_new_tokens=6, num_beams=1))
    assert r["checks"]["passed"], r["checks"]
    dec = r["modules"]["decoder"]
    assert {"token_embeddings", "prefill_embeds", "prefill", "forward", "step"} <= set(dec["methods"])
    assert dec["parity"]["passed"] and dec["parity"]["embeds"]["passed"]
    assert dec["parity"]["embeds"]["outputs"]["prefill_logits"]["sqnr_db"] >= 20
    assert read_sidecar(out / "encoder.pte")["frames"] == smolvlm.FRAMES and (out / "decoder.processor").is_dir()
    videos = [p for p in sample_videos() if p.name in ("bigbuckbunny.mp4", "carphone_pristine.mp4")]
    with atomkit.Session("tiny-smolvlm2", programs=out, decode=atomkit.DecodeConfig(max_new_tokens=6, num_beams=4)) as s:
        caps = s.caption(videos)
        assert len(caps.clips) == 2 and len({c.caption for c in caps.clips}) == 2 and all(c.caption for c in caps.clips)
        report = s.load_report()
        assert report["encoder"]["source"] == "encoder.pte" and report["decoder"]["source"] == "decoder.pte"
