"""Real default models (EfficientNet-Lite0, SmolLM2-135M-Instruct, all-MiniLM-L6-v2) on the real sample videos."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

import atomkit
from atomkit.models.concepts import grounding

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def real_captions(real_session):
    return real_session.caption(atomkit.sample_videos())


def test_real_captions_describe_what_the_encoder_saw(real_session, real_captions):
    assert real_captions.skipped == [] and len(real_captions.clips) == 4
    tok = real_session.decoder.tokenizer
    for c in real_captions.clips:
        words = c.caption.split()
        assert len(words) >= 3, c.caption
        assert len(tok(c.caption, add_special_tokens=False)["input_ids"]) <= real_session.decode.max_new_tokens
        assert c.concepts[0][1] > 0.05  # a trained classifier is confident about something
        g = grounding(c.caption, c.concepts)
        assert g["named"] and g["grounded"], (c.caption, g)  # every word it adds is supported, no number
        first = c.caption.split(",")[0].split(" (")[0].split(" with ")[0].removesuffix(".")  # "An academic gown"
        top = [lbl.lower() for lbl, _ in c.concepts[:5]]
        assert first.lower() in top or first.split(" ", 1)[1].lower() in top, c.caption  # the subject comes first
    # people: the detector names the man in the car and the walker in the street (ImageNet has no class for them)
    for cid in ("bikes#00", "carphone_pristine#00", "carphone_distorted#00"):
        words = set(real_captions.by_id()[cid].caption.lower().replace(",", " ").replace(".", " ").split())
        assert words & {"person", "people"}, real_captions.by_id()[cid].caption
    # the carphone clips show a man in a suit and tie: the concept bridge must carry that into the caption
    carphone = real_captions.by_id()["carphone_pristine#00"]
    assert "tie" in " ".join(l for l, _ in carphone.concepts[:3])
    assert "tie" in carphone.caption.lower()


def test_real_retrieval_and_reuse(real_session, real_captions, tmp_path):
    hits = real_session.retrieve(real_captions, "a man wearing a tie", k=4)
    assert hits[0].clip.id.startswith("carphone")
    for i, prompt in enumerate(["make a highlight reel", "find the man in the car"]):
        asm = real_session.assemble(real_captions, prompt, tmp_path / str(i), k=2)
        assert asm.reel.is_file() and asm.reel_info["duration_s"] > 0
        assert set(asm.script.order) <= {h.clip.id for h in asm.hits}
        if prompt == "make a highlight reel":  # what `make demo` writes: every caption passes the grounding check
            written = json.loads(asm.outputs["captions"].read_text())["clips"]
            assert len(written) == 4 and all(grounding(c["caption"], [(x["label"], x["p"]) for x in c["concepts"]])
                                             ["grounded"] for c in written), written
            assert all(grounding(e.narration, real_captions.by_id()[e.clip_id].concepts)["grounded"]
                       for e in asm.script.entries)  # and so does every narration line the reel shows
    assert all(r["loads"] == 1 for r in real_session.load_report().values())


def test_cli_assemble_folder_with_corrupt_file(mixed_folder, tmp_path):
    """The issue's acceptance check, as a user runs it: two good videos and a corrupt one."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "atomkit.cli", "assemble", str(mixed_folder), "--prompt",
                           "make a highlight reel", "--out", str(out), "-q"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "broken.mp4" in proc.stderr
    script = json.loads((out / "script.json").read_text())
    assert {e["clip_id"].split("#")[0] for e in script["entries"]} <= {"bunny", "carphone"}
    with av.open(str(out / "reel.mp4")) as c:
        assert c.duration and c.duration > 0
        assert sum(1 for _ in c.decode(video=0)) > 30
    clips = json.loads((out / "captions.json").read_text())["clips"]
    assert len(clips) == 2
    for c in clips:  # what a person reads: no numbers, nothing the encoder did not report, no word it does not support
        g = grounding(c["caption"], [(x["label"], x["p"]) for x in c["concepts"]])
        assert g["grounded"], (c["caption"], g)


def test_converted_decoder_cache_is_reused(real_session):
    from atomkit.models.weights import smollm2_converted

    folder = smollm2_converted(real_session.options.cache)
    assert (folder / "model.safetensors").is_file() and (folder / "atomkit.json").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert smollm2_converted(real_session.options.cache) == folder
    assert (folder / "model.safetensors").stat().st_mtime == mtime  # not rebuilt


def test_the_decoder_loads_what_from_pretrained_loads(real_session):
    """``llama_from_safetensors`` (meta build + the files' tensors, no random init) gives the model
    ``from_pretrained`` gives: every tensor and buffer, the tied head, the generation config, the attention
    implementation, and so the same beam-search tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from atomkit.models.registry import llama_from_safetensors
    from atomkit.models.weights import smollm2_converted

    folder = smollm2_converted(real_session.options.cache)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    lm = llama_from_safetensors(folder)
    want, got = ref.state_dict(), lm.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    bufs = dict(lm.named_buffers())
    assert all(torch.equal(bufs[k], b) for k, b in ref.named_buffers()) and bufs  # rotary tables, not meta
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert lm.generation_config.to_dict() == ref.generation_config.to_dict()
    assert lm.config._attn_implementation == ref.config._attn_implementation and not lm.training
    ids = real_session.decoder._ids("A dog jumps over a fence.")
    with torch.inference_mode():
        assert torch.equal(lm.generate(ids, max_new_tokens=6, num_beams=2),
                           ref.generate(ids, max_new_tokens=6, num_beams=2))


def test_the_fast_tokenizer_is_the_one_from_pretrained_gives(real_session):
    """``fast_tokenizer`` (built from tokenizer.json directly) against ``AutoTokenizer.from_pretrained`` on the
    converted SmolLM2 folder: the same vocabulary, special tokens and chat template, and the same ids for text
    with special tokens, non-ASCII text and a padded batch."""
    from transformers import AutoTokenizer

    from atomkit.models.weights import fast_tokenizer
    from atomkit.models.weights import smollm2_converted

    folder = smollm2_converted(real_session.options.cache)
    ref, tok = AutoTokenizer.from_pretrained(folder, local_files_only=True), fast_tokenizer(folder)
    assert tok.get_vocab() == ref.get_vocab() and len(tok) == len(ref) == 49152
    assert tok.special_tokens_map == ref.special_tokens_map and tok.all_special_ids == ref.all_special_ids
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (ref.eos_token_id, ref.pad_token_id, ref.bos_token_id)
    assert tok.chat_template == ref.chat_template and tok.model_max_length == ref.model_max_length
    assert tok.padding_side == ref.padding_side
    msgs = [{"role": "system", "content": "You write one-line captions."},
            {"role": "user", "content": "A dog jumps over a log <|im_end|> near a café 😀"}]
    text = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == text
    want = ref.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"] == want and len(want) > 20
    texts = ["hello world", "a longer text, with  two spaces and <|endoftext|> inside"]
    assert tok(texts, padding=True)["input_ids"] == ref(texts, padding=True)["input_ids"]
    assert tok.decode(want) == ref.decode(want) and tok.decode(want, skip_special_tokens=True) == ref.decode(
        want, skip_special_tokens=True)


def test_the_converted_decoder_is_hashed_only_when_its_source_moved(real_session, monkeypatch):
    """While the GGUF's path, size and mtime are the recorded ones, a load reads nothing of it; a stamp without them
    (an older cache, another checkout's path) is checked by content once and then recorded."""
    import atomkit.models.weights as W

    folder = W.smollm2_converted(real_session.options.cache)
    meta = folder / "atomkit.json"
    info = json.loads(meta.read_text())
    assert info["source"]["path"] == str(W.smollm2_gguf())
    hashed = []
    real_hash = W.sha256_file
    monkeypatch.setattr(W, "sha256_file", lambda p: hashed.append(p) or real_hash(p))
    assert W.smollm2_converted(real_session.options.cache) == folder and hashed == []
    meta.write_text(json.dumps({k: v for k, v in info.items() if k != "source"}))
    try:
        assert W.smollm2_converted(real_session.options.cache) == folder and len(hashed) == 1
        assert json.loads(meta.read_text())["source"] == info["source"]
        assert W.smollm2_converted(real_session.options.cache) == folder and len(hashed) == 1
    finally:
        meta.write_text(json.dumps(info))


def test_int4_captions_identical_on_any_executor():
    """The int4 decoder (int4 steps, the CPU's prefill weights) on one thread (disjoint cores) writes the captions it writes
    on two: the thread count must not change the arithmetic the reuse path's executor choice depends on."""
    from atomkit.pipeline.executor import PipelinedExecutor, SequentialExecutor

    with atomkit.Session("default", decode=atomkit.DecodeConfig(backend="int4")) as s:
        seq = s.caption(atomkit.sample_videos(), executor=SequentialExecutor())
        dis = s.caption(atomkit.sample_videos(), executor=PipelinedExecutor(threads=[1, 1, 1]))
    assert len(seq.clips) == 4
    assert [c.caption for c in dis.clips] == [c.caption for c in seq.clips]
