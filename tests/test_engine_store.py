"""The engine store: packed decoder weights written once, read back with mmap, equal to packing again."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaForCausalLM

from atomkit.decode.store import stepper
from atomkit.models.registry import _stand_in_tokenizer, tiny_llama_config
from atomkit.models.decoder import TextDecoder


@pytest.fixture
def saved_lm(tmp_path):
    """A tiny random Llama saved to a folder and loaded from it, as real weights are (unit tests only)."""
    torch.manual_seed(0)
    config = tiny_llama_config(len(_stand_in_tokenizer()))
    config.initializer_range = 0.2  # logits that differ per input
    LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    return tmp_path / "lm"


def decoder(folder, store):
    dec = TextDecoder(LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), None)
    dec.store = store
    return dec


def run(st, ids):
    st.reset(2, 32)
    out = [st.prefill(ids)]
    for t in range(4):
        out.append(st.step(out[-1].argmax(-1), ids.shape[1] + t))
    return torch.stack(out)


@pytest.mark.parametrize("settings", [dict(weights="int4", fuse=True), dict(weights="int8", fuse=True),
                                      dict(weights="bf16", fuse=False), dict(weights="fp32", fuse=True)])
def test_a_stored_stepper_equals_a_packed_one(saved_lm, tmp_path, settings):
    store = tmp_path / "engines"
    ids = torch.tensor([[11, 12, 13, 14, 15, 16], [40, 41, 42, 43, 44, 45]])
    store.mkdir()
    (store / "llama-int4-0123456789abcdef.pt").write_bytes(b"an entry of STORE_VERSION 2 (torch.save)")
    first = stepper(decoder(saved_lm, store), **settings)
    assert first.loaded_from is None  # packed, then written once; the old-format entry is gone
    assert [p.suffix for p in store.iterdir()] == [".safetensors"]
    again = stepper(decoder(saved_lm, store), **settings)
    assert again.loaded_from == next(store.iterdir())
    a, b = run(first, ids), run(again, ids)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 0], a[:, 1])  # the two prompts give different logits: the check can see a mix-up
    assert again.held_bytes() == first.held_bytes()


def test_a_changed_source_or_setting_gets_its_own_entry(saved_lm, tmp_path):
    store = tmp_path / "engines"
    stepper(decoder(saved_lm, store), weights="int4", fuse=True)
    stepper(decoder(saved_lm, store), weights="int8", fuse=True)
    assert len(list(store.iterdir())) == 2
    weights = saved_lm / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a new file version
    assert stepper(decoder(saved_lm, store), weights="int4", fuse=True).loaded_from is None
    assert len(list(store.iterdir())) == 3


def test_the_prefill_weights_are_part_of_the_key(saved_lm, tmp_path):
    """bf16 prefill copies (CPUs with native bf16) and fp32 prefills (AVX2) are stored apart: an entry written on
    one kind of CPU is never read as the other's."""
    store = tmp_path / "engines"
    bf16 = stepper(decoder(saved_lm, store), weights="int4", fuse=True, prefill="bf16")
    fp32 = stepper(decoder(saved_lm, store), weights="int4", fuse=True, prefill="fp32")
    assert bf16.loaded_from is None and fp32.loaded_from is None and len(list(store.iterdir())) == 2
    again = stepper(decoder(saved_lm, store), weights="int4", fuse=True, prefill="fp32")
    assert again.loaded_from is not None and again.prefill_weights == "fp32"
    assert all(L["o"].rows_w is None for L in again.layers) and all(L["o"].rows_w is not None for L in bf16.layers)


def test_a_damaged_entry_is_packed_again(saved_lm, tmp_path):
    store = tmp_path / "engines"
    stepper(decoder(saved_lm, store), weights="int4", fuse=True)
    entry = next(store.iterdir())
    entry.write_bytes(entry.read_bytes()[:1000])  # cut short
    again = stepper(decoder(saved_lm, store), weights="int4", fuse=True)
    assert again.loaded_from is None
    assert stepper(decoder(saved_lm, store), weights="int4", fuse=True).loaded_from == entry  # rewritten whole


def test_random_weights_are_not_stored(tmp_path):
    torch.manual_seed(0)
    dec = TextDecoder(LlamaForCausalLM(tiny_llama_config(1000)).eval(), None)
    dec.store = tmp_path / "engines"
    assert stepper(dec, weights="int4", fuse=True).loaded_from is None
    assert not (tmp_path / "engines").exists()
