"""``atomkit bench-decode``: decode speed of every backend and of llama.cpp, in one run, as JSON.

Every contender decodes the same prompt (the caption prompt the pipeline builds), the same number
of new tokens (EOS ignored, so each makes exactly that many), on the same thread count. Per backend
and length: the total time of ``n`` new tokens and of one new token (the prefill), medians of the
repeats after one unmeasured warm-up; decode tokens/s = (n - 1) / (total(n) - total(1)). The
headline ``tok_s`` is greedy, batch 1, the longest length (128). Also: beam-4 caption latency (EOS
on, as captions run), batch-4 greedy throughput, token agreement with ``generate`` (the caption
prompt, and the script prompt with EOS on), and a per-token profile of the fastest backend.
"""
from __future__ import annotations

import importlib.util
import platform
import statistics
import time
from pathlib import Path

import torch

from atomkit.decode.engine import BACKENDS, get_engine, resolve_backend
from atomkit.errors import UnknownBackend
from atomkit.decode.grounded import captions as grounded_captions
from atomkit.decode.llama import native_bf16
from atomkit.decode.prompts import CONCEPTS, caption_ids  # noqa: F401 (used here and by the benchmark's callers)
from atomkit.decode.structured import script_json

SCRIPT_CLIPS = [("bikes-0", "A group of cyclists ride mountain bikes down a dirt trail."),
                ("bunny-0", "A large white rabbit stands in a green meadow."),
                ("carphone-0", "A man talks on a phone while driving a car."),
                ("bikes-1", "A cyclist jumps over a small ramp on a forest path.")]


def script_ids(decoder) -> torch.Tensor:
    from atomkit.decode.script import SCRIPT_ANSWER_PREFIX, script_messages

    return decoder._ids(decoder.render(script_messages("make a highlight reel", SCRIPT_CLIPS)) + SCRIPT_ANSWER_PREFIX)


def llama_cpp_model(threads: int, n_ctx: int = 1024):
    """(Llama, None) for the default decoder's own GGUF file, or (None, reason)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None, ("llama_cpp is not importable: run `make peer` (builds llama-cpp-python from source, "
                      "5-15 min) and rerun")
    import llama_cpp

    from atomkit.models.weights import smollm2_gguf

    llm = llama_cpp.Llama(str(smollm2_gguf()), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                          n_batch=512, verbose=False, seed=0)
    return llm, None


def _llama_cpp_generate(llm, ids: list[int], n: int) -> list[int]:
    """Greedy (top_k=1, temp 0), exactly n tokens (EOS ignored), from an empty cache."""
    llm.reset()
    out = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def _median_time(fn, repeats: int) -> tuple[float, list[float], object]:
    fn()  # warm-up, not measured
    samples, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples, result


def _sample_concepts(spec) -> list:
    """The encoder's concepts of the first clip of each sample video (the input of grounded captions)."""
    from atomkit.models.registry import LoadOptions
    from atomkit.media.video import clips, sample_frames
    from atomkit.media.scan import sample_videos

    encoder = spec.load("encoder", LoadOptions(device="cpu"))
    with torch.inference_mode():
        return [encoder.encode(sample_frames(clips(p)[0])).concepts for p in sorted(sample_videos())]


def _agreement(ref: list[int], got: list[int]) -> dict:
    prefix = 0
    for a, b in zip(ref, got):
        if a != b:
            break
        prefix += 1
    same = sum(a == b for a, b in zip(ref, got))
    return {"equal": ref == got, "common_prefix": prefix, "positions_equal": same, "of": max(len(ref), len(got))}


def _profile(engine, ids: torch.Tensor, steps: int = 32) -> dict:
    """Where one new token's time goes: matmuls, attention, other ops, and the rest (Python, dispatch)."""
    from torch.profiler import ProfilerActivity, profile

    st = engine.stepper
    n = ids.shape[-1]
    with torch.inference_mode():
        st.reset(1, n + steps + 8)
        st.prefill(ids)
        tok = torch.zeros(1, dtype=torch.long)
        for i in range(4):  # warm
            st.step(tok, n + i)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for i in range(steps):
                st.step(tok, n + 4 + i)
            wall = time.perf_counter() - t0
    buckets = {"matmul": 0.0, "attention": 0.0, "other_ops": 0.0}
    top = []
    for ev in prof.key_averages():
        if ev.key.startswith("Torch-Compiled Region") or ev.key.startswith("## "):
            continue
        us = ev.self_cpu_time_total
        name = ev.key.lower()
        if any(k in name for k in ("mm", "linear", "matmul", "int8pack", "int4pack", "gemm")):
            buckets["matmul"] += us
        elif any(k in name for k in ("attention", "sdpa", "flash")):
            buckets["attention"] += us
        else:
            buckets["other_ops"] += us
        top.append((us, ev.key, ev.count))
    per_tok = {k: v / 1e6 / steps for k, v in buckets.items()}
    wall_tok = wall / steps
    per_tok["python_dispatch_rest"] = max(0.0, wall_tok - sum(per_tok.values()))
    top.sort(reverse=True)
    return {"backend": engine.name, "steps": steps, "wall_ms_per_token": round(wall_tok * 1e3, 3),
            "ms_per_token": {k: round(v * 1e3, 3) for k, v in per_tok.items()},
            "share": {k: round(v / wall_tok, 3) for k, v in per_tok.items()},
            "top_ops": [{"op": k, "ms_per_token": round(us / 1e3 / steps, 3), "calls_per_token": c / steps}
                        for us, k, c in top[:12]],
            "note": "self CPU time of profiled ops per token; the rest of the wall time is Python, dispatch and "
                    "profiler overhead (the profiler adds some per op)"}


def bench_decode(model: str = "default", *, backends: list[str] | None = None, threads: int = 2,
                 new_tokens: tuple[int, ...] = (23, 128), repeats: int = 3, llama_cpp: bool = True,
                 batch: int = 4, beams: int = 4, caption_tokens: int = 23, script_tokens: int = 160,
                 profile_steps: int = 32, progress: bool = True, programs: list | None = None) -> dict:
    """Run the decode benchmark; returns the JSON-ready result (see the module docstring).

    ``programs``: decoder ``.pte`` programs (files, or ``atomkit export`` folders holding ``decoder.pte``) to time
    beside the engine backends, each as contender ``pte-<quant>`` run by the ExecuTorch runtime
    (``atomkit.deploy.runtime.PteDecoder``)."""
    from atomkit.models.registry import LoadOptions, get_spec

    import os

    load_start = os.getloadavg()
    torch.set_num_threads(threads)
    say = print if progress else (lambda *a, **k: None)
    spec = get_spec(model)
    t0 = time.perf_counter()
    decoder = spec.load("decoder", LoadOptions(device="cpu"))
    load_s = time.perf_counter() - t0
    tok = decoder.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    eos = decoder.lm.generation_config.eos_token_id if decoder.stop_at_eos else None
    ids = caption_ids(decoder)
    sids = script_ids(decoder)
    names = backends or list(BACKENDS)
    for n in names:
        if n not in BACKENDS:
            raise UnknownBackend(n, list(BACKENDS))
    names = ["hf", *[n for n in names if n != "hf"]]  # the reference first: the others compare to it
    contenders = {n: (BACKENDS[n][0], decoder, lambda n=n: get_engine(n, decoder)) for n in names}
    contenders.update(_program_contenders(programs or [], decoder))
    lengths = sorted(set(new_tokens))
    longest = lengths[-1]
    res: dict = {
        "model": model, "random_weights": spec.is_random(LoadOptions()), "threads": threads,
        "new_tokens": lengths, "repeats": repeats, "prompt_tokens": int(ids.shape[-1]),
        "script_prompt_tokens": int(sids.shape[-1]),
        "method": "median of repeats after one warm-up; EOS ignored so every contender makes exactly n tokens; "
                  "decode tok/s = (n - 1) / (total(n) - total(1)); tok_s = greedy, batch 1, n = "
                  f"{longest}; caption latency = beam {beams}, {caption_tokens} new tokens max, EOS on (as captions run); "
                  f"batch{batch}_tok_s = the caption prompts of {batch} sample clips, greedy, {caption_tokens} tokens each, "
                  "tokens of all rows / s",
        "backends": {n: c[0] for n, c in contenders.items()},
        "tok_s": {}, "tok_s_by_new_tokens": {}, "prefill_s": {}, "total_s": {}, "samples_s": {},
        "caption_latency_beam4_s": {}, "caption_beam4_tokens": {}, "caption_beam4_equal_hf": {},
        "caption_tokens": caption_tokens, "script_tokens": script_tokens, "beams": beams, "batch": batch,
        f"batch{batch}_tok_s": {}, "greedy_agreement_with_hf": {}, "script_greedy_equal_hf": {},
        "compile_or_warmup_s": {}, "decoder_load_s": round(load_s, 2),
        "cpu_native_bf16": native_bf16(), "auto": resolve_backend("auto", decoder),
        "pipeline_method": "the decoder work of one prompt of the pipeline, median of repeats after a warm-up: "
                           "grounded captions of the first clip of each sample video (one batch) and the structured "
                           "script over those captions (order, then one narration line per clip)",
        "grounded_captions_s": {}, "grounded_clips_per_s": {}, "structured_script_s": {},
    }
    concept_lists = _sample_concepts(spec)
    # the batch: the caption prompts of the sample clips (different prompts, as a caption group is; identical rows
    # would share their whole prompt in the prefill)
    batch_prompts = [caption_ids(decoder, concept_lists[i % len(concept_lists)])[0] for i in range(batch)]
    ref_tokens: dict[str, list[int]] = {}
    engines = {}
    for name, (what, dec, make) in contenders.items():
        say(f"[bench-decode] {name}: {what}", flush=True)
        t0 = time.perf_counter()
        eng = make()
        eng.generate(ids, max_new_tokens=2, pad_token_id=pad)  # builds and (for compiled) compiles
        res["compile_or_warmup_s"][name] = round(time.perf_counter() - t0, 2)
        engines[name] = eng
        totals, samples, outs = {}, {}, {}
        for n in [1, *lengths]:
            med, smp, out = _median_time(lambda: eng.generate(ids, max_new_tokens=n, pad_token_id=pad), repeats)
            totals[n], samples[n], outs[n] = med, smp, out[0].tolist()
            if len(outs[n]) != n:
                raise RuntimeError(f"backend {name} made {len(outs[n])} tokens, asked for {n}")
        res["prefill_s"][name] = round(totals[1], 5)
        res["total_s"][name] = {str(n): round(totals[n], 4) for n in lengths}
        res["samples_s"][name] = {str(n): [round(s, 5) for s in samples[n]] for n in [1, *lengths]}
        res["tok_s_by_new_tokens"][name] = {str(n): round((n - 1) / max(totals[n] - totals[1], 1e-9), 2)
                                            for n in lengths}
        res["tok_s"][name] = res["tok_s_by_new_tokens"][name][str(longest)]
        ref_tokens[name] = outs[longest]
        res["greedy_agreement_with_hf"][name] = _agreement(ref_tokens["hf"], outs[longest])
        # the caption as the pipeline runs it: beam 4, 23 tokens at most, EOS on
        med, smp, out = _median_time(lambda: eng.generate(ids, max_new_tokens=caption_tokens, num_beams=beams, eos_token_id=eos,
                                                          pad_token_id=pad), repeats)
        res["caption_latency_beam4_s"][name] = round(med, 4)
        res["caption_beam4_tokens"][name] = len(out[0])
        cap = out[0].tolist()
        ref_tokens[name + ":caption"] = cap
        res["caption_beam4_equal_hf"][name] = cap == ref_tokens["hf:caption"]
        # several prompts at once (greedy): the same prompt batch times, tokens/s of the whole batch
        if dec is decoder:  # a program prefills one prompt at a time: its rows are one prompt's beams
            med_b, _, _ = _median_time(lambda: eng.generate(batch_prompts, max_new_tokens=caption_tokens,
                                                            pad_token_id=pad), max(1, repeats - 1))
            res[f"batch{batch}_tok_s"][name] = round(batch * caption_tokens / med_b, 2)
        else:
            res[f"batch{batch}_tok_s"][name] = None
        # the script prompt, greedy, EOS on (what `assemble` runs)
        script = eng.generate(sids, max_new_tokens=script_tokens, eos_token_id=eos, pad_token_id=pad)[0].tolist()
        ref_tokens[name + ":script"] = script
        res["script_greedy_equal_hf"][name] = script == ref_tokens["hf:script"]
        if getattr(eng, "stepper", None) is not None:  # the pipeline's decoder work (the structured script needs a stepper)
            backend = name if dec is decoder else "auto"  # a program decoder runs its own program

            def script(caps):
                with torch.inference_mode():
                    return script_json(dec, eng.stepper, "make a highlight reel", caps, backend)

            med_c, _, caps = _median_time(lambda: grounded_captions(dec, concept_lists, backend), repeats)
            med_s, _, _ = _median_time(lambda: script(caps), repeats)
            res["grounded_captions_s"][name] = round(med_c, 4)
            res["grounded_clips_per_s"][name] = round(len(concept_lists) / med_c, 2)
            res["structured_script_s"][name] = round(med_s, 4)
            say(f"  pipeline: {len(concept_lists)} grounded captions {med_c:.3f} s, structured script {med_s:.3f} s",
                flush=True)
        say(f"  tok/s {res['tok_s_by_new_tokens'][name]}  prefill {totals[1] * 1e3:.0f} ms  caption beam{beams} "
            f"{med:.3f} s  batch{batch} {res[f'batch{batch}_tok_s'][name]} tok/s  equal to hf: greedy "
            f"{res['greedy_agreement_with_hf'][name]['equal']}, caption {res['caption_beam4_equal_hf'][name]}, "
            f"script {res['script_greedy_equal_hf'][name]}", flush=True)
    res["caption_text"] = {n: decoder.decode_ids(torch.tensor(ref_tokens[n + ":caption"])) for n in contenders}
    res["llama_cpp"] = None
    if llama_cpp:
        res["tok_s"]["llama_cpp"] = None
        llm, reason = llama_cpp_model(threads)
        if llm is None:
            res["llama_cpp_reason"] = reason
            res["tok_s_by_new_tokens"]["llama_cpp"] = None
            say(f"[bench-decode] llama_cpp: {reason}")
        else:
            import llama_cpp as lc

            say(f"[bench-decode] llama_cpp {lc.__version__} on the model's own GGUF (Q4_1)", flush=True)
            plist = ids[0].tolist()
            totals, samples, outs = {}, {}, {}
            for n in [1, *lengths]:
                med, smp, out = _median_time(lambda: _llama_cpp_generate(llm, plist, n), repeats)
                totals[n], samples[n], outs[n] = med, smp, out
            res["prefill_s"]["llama_cpp"] = round(totals[1], 5)
            res["total_s"]["llama_cpp"] = {str(n): round(totals[n], 4) for n in lengths}
            res["samples_s"]["llama_cpp"] = {str(n): [round(s, 5) for s in samples[n]] for n in [1, *lengths]}
            res["tok_s_by_new_tokens"]["llama_cpp"] = {str(n): round((n - 1) / max(totals[n] - totals[1], 1e-9), 2)
                                                       for n in lengths}
            res["tok_s"]["llama_cpp"] = res["tok_s_by_new_tokens"]["llama_cpp"][str(longest)]
            res["greedy_agreement_with_hf"]["llama_cpp"] = _agreement(ref_tokens["hf"], outs[longest])
            res["caption_latency_beam4_s"]["llama_cpp"] = None
            res["llama_cpp"] = {"version": lc.__version__, "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                                "weights": "Q4_1 (the package's file); the torch backends dequantize it to fp32",
                                "beam_search": "not offered by llama-cpp-python: no caption latency at beam 4"}
            say(f"  tok/s {res['tok_s_by_new_tokens']['llama_cpp']}  prefill {totals[1] * 1e3:.0f} ms", flush=True)
    stepper_names = [n for n in names if n != "hf"]  # torch steppers: a program's ops are not torch's to profile
    if stepper_names and profile_steps:
        fastest = max(stepper_names, key=lambda n: res["tok_s"][n])
        res["profile"] = _profile(engines[fastest], ids, profile_steps)
        res["profile_torch"] = _profile(engines["torch"], ids, profile_steps) if "torch" in engines and fastest != "torch" else None
    res["device"] = {"cpu": _cpu_name(), "cores": _cores(), "torch": torch.__version__,
                     "python": platform.python_version(), "machine": platform.machine(),
                     "loadavg_start": [round(x, 2) for x in load_start],
                     "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                     "note": "load averages show other work on the machine during the run"}
    return _named_for_json(res)


def _program_contenders(programs: list, decoder) -> dict:
    """name -> (what it is, decoder, engine factory) for decoder programs (``bench_decode(programs=...)``)."""
    from atomkit.decode.engine import Engine
    from atomkit.errors import InputError
    from atomkit.deploy.program import read_sidecar
    from atomkit.deploy.runtime import PteDecoder, PteStepper

    out: dict = {}
    for p in programs:
        path = Path(p) / "decoder.pte" if Path(p).is_dir() else Path(p)
        if not path.is_file():
            raise InputError(f"{path}: no decoder program there; write one with `atomkit export --only decoder`")
        meta = read_sidecar(path)
        if meta.get("module") not in (None, "decoder"):
            raise InputError(f"{path} is the {meta['module']} program; give the decoder's (decoder.pte)")
        name = f"pte-{meta.get('quant', 'none')}"
        while name in out:
            name += "'"
        pd = PteDecoder(path, like=decoder)
        what = (f"ExecuTorch program {path.name} (XNNPACK, {meta.get('quant', 'none')}, {pd.batch} rows, "
                f"{meta.get('program_kind', 'static-cache')}) on the host runtime")
        out[name] = (what, pd, lambda pd=pd, name=name: Engine(PteStepper(pd), name))
    return out


def _named_for_json(res: dict) -> dict:
    """The engine calls generate's backend ``hf``; the result names it ``hf_generate`` (the JSON schema)."""
    for value in res.values():
        if isinstance(value, dict) and "hf" in value:
            value["hf_generate"] = value.pop("hf")
            for k in list(value):  # keep the reference first
                if k != "hf_generate":
                    value[k] = value.pop(k)
    return res


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def plot(result: dict, path: str | Path) -> Path:
    """Bar chart of greedy decode tokens/s by backend (batch 1, longest length), llama.cpp included."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(k, v) for k, v in result["tok_s"].items() if v is not None]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colors = ["#888888" if k == "hf_generate" else "#c0504d" if k == "llama_cpp" else "#9bbb59" if k.startswith("pte-")
              else "#4f81bd" for k, _ in items]
    bars = ax.bar([k for k, _ in items], [v for _, v in items], color=colors)
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_ylabel("decode tokens/s")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.set_title(f"{result['model']}: greedy, batch 1, {result['new_tokens'][-1]} new tokens, "
                 f"{result['threads']} threads", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
