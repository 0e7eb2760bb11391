"""The decode engine against transformers generate: tiny random-weight decoders (unit; different prompts give
different tokens) and the real SmolLM2 on the pipeline's own prompts (integration)."""
from __future__ import annotations

import pytest
import torch

import atomkit
from atomkit.decode.engine import Engine, HFEngine, available_backends, get_engine
from atomkit.errors import InputError, UnknownBackend
from atomkit.decode.llama import LlamaStepper
from atomkit.models.registry import LoadOptions, get_spec


@pytest.fixture(scope="module")
def tiny():
    return get_spec("tiny-default").load("decoder", LoadOptions())


@pytest.fixture(scope="module")
def tiny_paper():
    return get_spec("tiny-paper").load("decoder", LoadOptions())


@pytest.fixture
def fresh():
    """A tiny-default decoder of the test's own (the test changes its EOS settings)."""
    return get_spec("tiny-default").load("decoder", LoadOptions())


def _prompt(dec, text="a dog jumps over the fence in a sunny park"):
    return dec._ids(dec.render([{"role": "user", "content": text}]))


def _both(dec, backend="torch", **kw):
    kw.setdefault("pad_token_id", 0)
    hf = get_engine("hf", dec).generate(**kw)
    return hf, get_engine(backend, dec).generate(**kw)


def test_tiny_lm_answers_each_prompt_differently(tiny):
    """The tiny LM's greedy tokens depend on the prompt (what lets the comparisons below fail when rows are mixed)."""
    texts = ("a cat", "a dog jumps over the fence", "sunset over the sea today", "two people talk in a car")
    out = [tuple(get_engine("torch", tiny).generate(_prompt(tiny, t), max_new_tokens=4)[0].tolist()) for t in texts]
    assert len(set(out)) == len(texts), out
    assert len({t[0] for t in out}) > 1  # already the first token


@pytest.mark.parametrize("n", [1, 7, 40])
def test_greedy_equals_generate(tiny, n):
    hf, eng = _both(tiny, input_ids=_prompt(tiny), max_new_tokens=n)
    assert eng.shape == (1, n)
    assert torch.equal(hf, eng)


@pytest.mark.parametrize("beams", [2, 4])
def test_beam_equals_generate(tiny, beams):
    hf, eng = _both(tiny, input_ids=_prompt(tiny), max_new_tokens=12, num_beams=beams)
    assert eng.shape == (1, 12)
    assert torch.equal(hf, eng)


@pytest.mark.parametrize("beams", [1, 3])
def test_eos_stops_like_generate(tiny, beams):
    """A token the model does produce is declared EOS: both stop at it (greedy) or finish beams on it."""
    ids = _prompt(tiny)
    free = get_engine("torch", tiny).generate(ids, max_new_tokens=10, num_beams=beams)[0]
    eos = int(free[3])
    hf, eng = _both(tiny, input_ids=ids, max_new_tokens=10, num_beams=beams, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(hf, eng)
    if beams == 1:
        first = free.tolist().index(eos)
        assert eng[0].tolist() == free[:first + 1].tolist()  # stopped at (and kept) the EOS token


def test_embeddings_prefill(tiny_paper):
    emb = torch.randn(1, 17, tiny_paper.lm.config.hidden_size)
    for beams in (1, 3):
        hf, eng = _both(tiny_paper, inputs_embeds=emb, max_new_tokens=9, num_beams=beams)
        assert torch.equal(hf, eng)


def test_batch_of_prompts(tiny):
    """Prompts of different lengths decode as one left-padded batch, each as it would alone."""
    prompts = [_prompt(tiny, t)[0] for t in ("a cat", "a dog jumps over the fence", "sunset over the sea today")]
    eng = get_engine("torch", tiny)
    batch = eng.generate(prompts, max_new_tokens=8)
    alone = torch.cat([eng.generate(p, max_new_tokens=8) for p in prompts])
    assert batch.shape == (3, 8)
    assert torch.equal(batch, alone)
    assert torch.equal(batch, get_engine("hf", tiny).generate(prompts, max_new_tokens=8))
    same = torch.stack([prompts[1]] * 2)  # equal lengths: no padding at all
    assert torch.equal(eng.generate(same, max_new_tokens=8, num_beams=2),
                       get_engine("hf", tiny).generate(same, max_new_tokens=8, num_beams=2))


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_batch_rows_end_where_each_prompt_alone_ends(fresh, beams):
    """``generate_batch``: every row of a left-padded batch (beam or greedy, stopping at EOS at different steps)
    is the ids that prompt gives alone, without the filling after its stop id."""
    dec = fresh
    prompts = [_prompt(dec, t)[0] for t in ("a cat", "a dog jumps over the fence", "sunset over the sea today")]
    exact = dict(backend="torch")  # padding changes the last bits of arithmetic: exact rows need the exact engine
    stop = int(dec.generate_ids(prompts[1], max_new_tokens=1, num_beams=1, **exact)[0])  # row 1's likeliest token
    dec.lm.generation_config.eos_token_id, dec.stop_at_eos = stop, True
    rows = dec.generate_batch(prompts, max_new_tokens=10, num_beams=beams, **exact)
    alone = [dec.generate_ids(p, max_new_tokens=10, num_beams=beams, **exact) for p in prompts]
    assert len(rows[1]) <= 2 and int(rows[1][-1]) == stop
    assert max(len(r) for r in rows) > len(rows[1])  # rows ended at different steps: the short one was filled
    for r, a in zip(rows, alone):
        assert torch.equal(r, a)


@pytest.mark.parametrize("beams", [1, 2])
def test_generations_from_threads_equal_sequential(tiny, beams):
    """Eight threads generate on one decoder at once (the engine's KV cache is shared): each gets the tokens its
    prompt gets alone. A generation holds ``decoder.generation()`` from prefill to its last step."""
    from conftest import run_threads

    texts = ("a cat", "a dog jumps over the fence", "sunset over the sea today", "two people talk in a car")
    prompts = [_prompt(tiny, t) for t in texts]
    alone = [tiny.generate_ids(p, max_new_tokens=8, num_beams=beams).tolist() for p in prompts]
    assert len({tuple(a) for a in alone}) == 4
    counter = iter(range(8))

    def worker():
        i = next(counter) % 4
        return i, tiny.generate_ids(prompts[i], max_new_tokens=8, num_beams=beams).tolist()

    for i, got in run_threads(8, worker):
        assert got == alone[i], texts[i]


def test_until_stop():
    from atomkit.models.decoder import until_stop

    ids = torch.tensor([5, 7, 2, 9, 2])
    assert until_stop(ids, [2]).tolist() == [5, 7, 2]
    assert until_stop(ids, [9, 7]).tolist() == [5, 7]
    assert until_stop(ids, []).tolist() == ids.tolist()
    assert until_stop(ids, [3]).tolist() == ids.tolist()


# SQNR (dB) of each fast backend's logits against the exact engine's, teacher-forced on the exact tokens; measured
# on the tiny LM: fused inf, bf16 36.6, int8 30.1, int4 7.9. Below the floor the backend computes something else;
# above the ceiling it did not use the weights it names.
FAST = {"fused": (80, None), "bf16": (25, 60), "int8": (20, 60), "int4": (4, 20)}


@pytest.mark.parametrize("backend", sorted(FAST))
def test_fast_backends_near_the_exact_engine(tiny, backend):
    from atomkit.deploy.quant import sqnr_db

    ids = _prompt(tiny)
    exact = get_engine("torch", tiny).generate(ids, max_new_tokens=11, num_beams=2)
    eng = get_engine(backend, tiny)
    out = eng.generate(ids, max_new_tokens=11, num_beams=2)
    assert out.shape == (1, 11)
    if backend == "fused":  # the same values up to the order of additions
        assert torch.equal(out, exact)

    @torch.inference_mode()
    def along(stepper):
        stepper.reset(1, ids.shape[1] + 11)
        return torch.stack([stepper.prefill(ids)] + [stepper.step(exact[0, t:t + 1], ids.shape[1] + t) for t in range(10)])

    db = sqnr_db(along(get_engine("torch", tiny).stepper), along(eng.stepper))
    lo, hi = FAST[backend]
    assert db > lo and (hi is None or db < hi), db


@pytest.fixture(scope="module")
def padded(tiny):
    """Three prompts of different lengths (a left-padded batch) and the exact engine's beam-2 tokens for them."""
    prompts = [_prompt(tiny, t)[0] for t in ("a cat", "a dog jumps over the fence", "sunset over the sea today")]
    return prompts, get_engine("torch", tiny).generate(prompts, max_new_tokens=10, num_beams=2)


@torch.inference_mode()
def _logits_along(stepper, prompts, tokens):
    """A stepper's logits (B, T, V) for the left-padded prefill of ``prompts`` (each twice: the batch shape beam 2
    gave the step) and then each of ``tokens`` (B, T) fed in: the compiled step sees the shape it was compiled for."""
    from atomkit.decode.engine import _as_batch

    ids, pad = _as_batch([p for p in prompts for _ in range(2)], 0)
    tokens = tokens.repeat_interleave(2, 0)
    stepper.reset(ids.shape[0], ids.shape[1] + tokens.shape[1])
    out = [stepper.prefill(ids, pad=pad)]
    for t in range(tokens.shape[1] - 1):
        out.append(stepper.step(tokens[:, t], ids.shape[1] + t))
    return torch.stack(out, 1)


def test_compiled_equals_the_exact_engine(tiny, padded):
    """``compiled`` (the one-token step under torch.compile, attention over the whole static cache with a mask):
    the exact fp32 engine's beam tokens for a padded batch (cache rows reordered in place under the compiled
    graph), and its logits along the way to fp32 rounding (measured 124 dB; a wrong mask, position or reorder
    gives other tokens). One batch shape: one compilation (about 30 s cold on 2 cores, most of it warm-up)."""
    from atomkit.deploy.quant import sqnr_db

    prompts, exact = padded
    eng = get_engine("compiled", tiny)
    assert eng.stepper.compiled and eng.stepper.kind == "fp32"
    assert torch.equal(eng.generate(prompts, max_new_tokens=10, num_beams=2), exact)
    assert len({tuple(r) for r in exact.tolist()}) == 3  # the rows differ: a row mixed up would show
    ref = _logits_along(get_engine("torch", tiny).stepper, prompts, exact)
    assert sqnr_db(ref, _logits_along(eng.stepper, prompts, exact)) > 80


def test_int4_compiled_equals_int4(tiny, padded):
    """``int4-compiled`` is ``int4``'s arithmetic under torch.compile: its tokens and logits (measured: bit-equal),
    not the fp32 engine's (int4 on the tiny LM agrees with fp32 on few tokens)."""
    from atomkit.deploy.quant import sqnr_db

    prompts, exact = padded
    int4, comp = get_engine("int4", tiny), get_engine("int4-compiled", tiny)
    assert comp.stepper.compiled and comp.stepper.kind == "int4"
    want = int4.generate(prompts, max_new_tokens=10, num_beams=2)
    assert torch.equal(comp.generate(prompts, max_new_tokens=10, num_beams=2), want)
    assert not torch.equal(want, exact)  # so the equality above says something about the int4 weights
    assert sqnr_db(_logits_along(int4.stepper, prompts, want), _logits_along(comp.stepper, prompts, want)) > 80


def _shared_batch(tiny):
    """Three prompts that start with the same 12 tokens and then differ, of three lengths (a left-padded batch)."""
    g = torch.Generator().manual_seed(3)
    head = torch.randint(5, tiny.lm.config.vocab_size, (12,), generator=g)
    return [torch.cat([head, torch.randint(5, tiny.lm.config.vocab_size, (n,), generator=g)]) for n in (3, 9, 6)]


@pytest.mark.parametrize("backend", ["fused", "compiled", "int4"])
def test_a_shared_prefix_is_prefilled_once_with_the_same_result(tiny, backend):
    """Rows that share their first tokens: the prefix runs once and is copied to every row, the padding moves
    behind it. Tokens (greedy and beam 2) and logits equal the same stepper prefilling every row in full."""
    from atomkit.deploy.quant import sqnr_db

    prompts = _shared_batch(tiny)
    eng = get_engine(backend, tiny)
    st = eng.stepper
    outs = {}
    for share in (False, True):
        st.share_prefix = share
        outs[share] = [eng.generate(prompts, max_new_tokens=8, num_beams=beams) for beams in (1, 2)]
        assert st.shared_last == (12 if share else 0)
        outs[share, "logits"] = _logits_along(st, prompts, outs[share][1])
    for beams in (0, 1):
        assert torch.equal(outs[True][beams], outs[False][beams])
    assert len({tuple(r) for r in outs[True][0].tolist()}) == 3  # the rows differ: a row mixed up would show
    assert sqnr_db(outs[False, "logits"], outs[True, "logits"]) > 90


def test_extend_equals_steps(tiny, padded):
    """``extend`` (several tokens per row in one pass, after a padded prefill) gives the logits of feeding them one
    ``step`` at a time."""
    from atomkit.decode.engine import _as_batch
    from atomkit.deploy.quant import sqnr_db

    prompts, exact = padded
    ids, pad = _as_batch(prompts, 0)
    tokens = exact[:, :5]  # (3, 5): the tokens beam search gave each prompt
    st = get_engine("torch", tiny).stepper
    st.reset(3, ids.shape[1] + 5)
    first = st.prefill(ids, pad=pad)
    stepped = [st.step(tokens[:, t], ids.shape[1] + t) for t in range(4)]
    st.reset(3, ids.shape[1] + 5)
    assert torch.equal(st.prefill(ids, pad=pad), first)
    chunk = st.extend(tokens[:, :4], ids.shape[1])
    assert chunk.shape == (3, 4, tiny.lm.config.vocab_size)
    assert sqnr_db(torch.stack(stepped, 1), chunk) > 90
    assert not torch.allclose(chunk[0], chunk[1])


@pytest.mark.gpu
def test_exact_engine_on_cuda_equals_cpu(tiny, padded):
    """The exact engine on a CUDA GPU: the CPU's beam tokens for a padded batch, and its logits to fp32 rounding
    (cuBLAS and the CPU add in other orders; matmuls stay fp32, TF32 is off for them by default)."""
    from atomkit.deploy.quant import sqnr_db

    prompts, exact = padded
    gpu = get_spec("tiny-default").load("decoder", LoadOptions(device="cuda"))
    eng = get_engine("torch", gpu)
    assert eng.stepper.device.type == "cuda"
    assert torch.equal(eng.generate(prompts, max_new_tokens=10, num_beams=2), exact)
    ref = _logits_along(get_engine("torch", tiny).stepper, prompts, exact)
    assert sqnr_db(ref, _logits_along(eng.stepper, prompts, exact).cpu()) > 60


def test_unknown_backend_lists_valid_names(tiny):
    with pytest.raises(UnknownBackend, match="available backends: auto, hf, torch"):
        get_engine("nope", tiny)
    with pytest.raises(UnknownBackend):
        atomkit.DecodeConfig(backend="nope")
    assert "hf" in available_backends() and "torch" in available_backends()


def test_prompt_longer_than_cache(tiny):
    eng = Engine(LlamaStepper(tiny.lm, max_seq_len=16), "torch")
    with pytest.raises(InputError, match="max_seq_len 16"):
        eng.generate(_prompt(tiny), max_new_tokens=4)


def test_single_row_stepper(tiny):
    """A stepper that holds one row (as a batch-1 program would): batches go row by row, beams are refused."""
    st = LlamaStepper(tiny.lm)
    st.max_batch_size = 1
    eng = Engine(st, "one-row")
    prompts = [_prompt(tiny, "a cat")[0], _prompt(tiny, "a dog jumps")[0]]
    assert torch.equal(eng.generate(prompts, max_new_tokens=5), get_engine("torch", tiny).generate(prompts, max_new_tokens=5))
    with pytest.raises(InputError, match="beam search"):
        eng.generate(prompts[0], max_new_tokens=5, num_beams=2)


def test_single_row_stepper_embeddings(tiny_paper):
    st = LlamaStepper(tiny_paper.lm)
    st.max_batch_size = 1
    emb = torch.randn(2, 9, tiny_paper.lm.config.hidden_size)
    assert torch.equal(Engine(st, "one-row").generate(inputs_embeds=emb, max_new_tokens=4),
                       get_engine("torch", tiny_paper).generate(inputs_embeds=emb, max_new_tokens=4))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_decoder_routes_through_backend(tiny, monkeypatch, native_bf16):
    monkeypatch.setattr("atomkit.decode.llama.native_bf16", lambda: native_bf16)
    ids = _prompt(tiny)
    # the measured CPU default: int4 on either kind of CPU (prefilling with bf16 copies or with the fp32 matrices)
    default = "int4"
    assert tiny.engine("auto").name == default
    assert isinstance(tiny.engine("hf"), HFEngine)
    a = tiny.generate_ids(ids, max_new_tokens=6, num_beams=2, backend="hf")
    b = tiny.generate_ids(ids, max_new_tokens=6, num_beams=2, backend="torch")
    assert a.shape == (6,) and torch.equal(a, b)
    c = tiny.generate_ids(ids, max_new_tokens=6, num_beams=2)
    assert torch.equal(c, tiny.generate_ids(ids, max_new_tokens=6, num_beams=2, backend=default))


def test_prefill_weights_follow_the_cpu(tiny, monkeypatch):
    """A quantized stepper prefills (more than PACKED_MAX_ROWS rows) with bf16 copies of its matrices only where the
    CPU multiplies bf16 natively; elsewhere (AVX2: bf16 emulated, slower) with the model's fp32 matrices, which
    it then keeps (nothing may be released) and whose logits are nearer the exact engine's."""
    from atomkit.decode.llama import PACKED_MAX_ROWS

    ids = _prompt(tiny, "a dog jumps over the fence in a sunny park while two children on bicycles ride past the "
                        "old red barn at noon")
    assert ids.shape[1] > PACKED_MAX_ROWS
    exact = LlamaStepper(tiny.lm)
    exact.reset(1, 64)
    ref = exact.prefill(ids)
    err = {}
    for native in (True, False):
        monkeypatch.setattr("atomkit.decode.llama.native_bf16", lambda: native)
        st = LlamaStepper(tiny.lm, weights="int4", fuse=True)
        kind = "bf16" if native else "fp32"
        assert st.prefill_weights == kind
        layer0 = tiny.lm.model.layers[0]
        if native:
            assert st.layers[0]["o"].rows_w.dtype == torch.bfloat16 and st.layers[0]["o"].full is None
        else:
            o, qkv = st.layers[0]["o"], st.layers[0]["qkv"]
            assert o.rows_w is None and o.full[0].data_ptr() == layer0.self_attn.o_proj.weight.data_ptr()  # no copy
            a = layer0.self_attn  # a fused Linear prefills with the model's own q, k and v: no concatenated copy
            assert [w.data_ptr() for w in qkv.full] == [a.q_proj.weight.data_ptr(), a.k_proj.weight.data_ptr(),
                                                         a.v_proj.weight.data_ptr()]
            assert qkv.held_bytes() == qkv.nbytes()  # the packed int4 matrix and its scales, nothing in fp32
        assert st.needs_model_matrices() is (not native)
        st.reset(1, 64)
        err[kind] = (st.prefill(ids) - ref).abs().max().item()
    assert err["fp32"] < err["bf16"] * 0.75, err  # measured 0.055 vs 0.115 (the int8 head is in both)
    with pytest.raises(ValueError, match="'bf16' or 'fp32'"):
        LlamaStepper(tiny.lm, weights="int4", prefill="fp16")


# -- the real SmolLM2-135M-Instruct ---------------------------------------------------------------
@pytest.fixture(scope="module")
def real_prompts(samples):
    """The caption prompt the pipeline builds for the first clip of each sample video, and the script prompt."""
    from atomkit.bench.decode import script_ids
    from atomkit.media.video import clips, sample_frames

    with atomkit.Session("default", decode=atomkit.config.exact()) as s:  # hf and torch need the float matrices
        dec = s.decoder
        caps = []
        for path in sorted(samples.values())[:3]:
            enc = s.encoder.encode(sample_frames(clips(path, s.window)[0], s.window))
            caps.append(dec._ids(dec.render(dec.caption_messages(enc))))
        yield dec, caps, script_ids(dec)


@pytest.mark.integration
def test_real_greedy_and_beam_equal_generate(real_prompts):
    dec, caps, script = real_prompts
    for ids in caps:
        for beams in (1, 4):
            a = dec.generate_ids(ids, max_new_tokens=23, num_beams=beams, backend="hf")
            b = dec.generate_ids(ids, max_new_tokens=23, num_beams=beams, backend="torch")
            assert a.tolist() == b.tolist(), (dec.decode_ids(a), dec.decode_ids(b))
    a = dec.generate_ids(script, max_new_tokens=160, num_beams=1, backend="hf")
    b = dec.generate_ids(script, max_new_tokens=160, num_beams=1, backend="torch")
    assert a.tolist() == b.tolist()


@pytest.mark.integration
def test_bench_decode_smoke(tmp_path):
    import json

    from atomkit.cli import main

    out = tmp_path / "d.json"
    assert main(["bench-decode", "--backends", "torch", "--new-tokens", "3,5", "--repeats", "1", "--out", str(out),
                 "--caption-tokens", "4", "--script-tokens", "4", "--batch", "2", "-q"]) == 0
    r = json.loads(out.read_text())
    assert r["threads"] == 2 and r["new_tokens"] == [3, 5]
    for name in ("hf_generate", "torch"):
        assert r["tok_s"][name] > 0 and r["prefill_s"][name] > 0 and r["caption_latency_beam4_s"][name] > 0
        assert r["greedy_agreement_with_hf"][name]["equal"]
    assert "llama_cpp" in r["tok_s"]
    assert r["tok_s"]["llama_cpp"] is not None or r["llama_cpp_reason"]
    assert r["profile"]["ms_per_token"]["matmul"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    # the pipeline's decoder work on the stepper backends (generate has no stepper for the structured script)
    assert r["grounded_clips_per_s"]["torch"] > 0 and r["structured_script_s"]["torch"] > 0
    assert "hf_generate" not in r["structured_script_s"]
    assert r["auto"] == "int4"
