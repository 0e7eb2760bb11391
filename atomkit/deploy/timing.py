"""Time exported ``.pte`` programs on this host: one execution of each program on example inputs from its sidecar
(``bench_programs``, the phone benchmark's schema) and a decoder program's decode speed (``decode_speed``)."""
from __future__ import annotations

from pathlib import Path

import torch

from atomkit.deploy.program import load_method, read_sidecar
from atomkit.deploy.runtime import PteDecoder, PteStepper
from atomkit.errors import AtomkitError


def example_inputs(path) -> list[torch.Tensor]:
    """Inputs for timing a program, from its sidecar: random floats, small token ids, a decode step
    (one token at position 0) for a dynamic-length decoder."""
    meta = read_sidecar(path)
    if not meta.get("inputs"):
        raise AtomkitError(f"{Path(path).with_suffix('.json')}: no input shapes in the sidecar")
    gen, out = torch.Generator().manual_seed(0), []
    for name, spec in meta["inputs"].items():
        shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
        if spec["dtype"].startswith("float"):
            out.append(torch.randn(*shape, generator=gen))
        elif name == "attention_mask":
            out.append(torch.ones(*shape, dtype=torch.long))
        elif name == "cache_position":
            out.append(torch.zeros(*shape, dtype=torch.long))
        else:
            out.append(torch.randint(0, 100, shape, generator=gen, dtype=torch.long))
    return out


def decode_speed(decoder: PteDecoder, ids: torch.Tensor, *, new_tokens: int = 128, repeats: int = 3,
                 caption_tokens: int = 23) -> dict:
    """Decode speed of a decoder program on this host, as ``atomkit bench-decode`` measures the engines: greedy,
    one prompt, EOS ignored; decode tok/s = (n - 1) / (total(n) - total(1)) from medians of ``repeats`` after a
    warm-up (raw samples kept); plus one caption's latency with as many beams as the program holds (up to 4, EOS on,
    ``caption_tokens`` at most), as captions run."""
    import statistics
    import time

    from atomkit.decode.engine import Engine

    engine = Engine(PteStepper(decoder), "pte")
    n = max(2, min(new_tokens, decoder.max_seq_len - ids.shape[-1]))

    def timed(fn) -> list[float]:
        fn()  # warm-up
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    def greedy(k):
        with decoder.generation():
            engine.generate(ids.reshape(1, -1), max_new_tokens=k, num_beams=1, eos_token_id=None)
    one, many = timed(lambda: greedy(1)), timed(lambda: greedy(n))
    beams = min(4, decoder.batch)
    caption = timed(lambda: decoder.generate_ids(ids.reshape(1, -1), max_new_tokens=caption_tokens, num_beams=beams))
    t1, tn = statistics.median(one), statistics.median(many)
    return {"prompt_tokens": int(ids.shape[-1]), "new_tokens": n, "threads": torch.get_num_threads(),
            "prefill_s": round(t1, 4), "total_s": round(tn, 4), "tok_s": round((n - 1) / max(tn - t1, 1e-9), 2),
            "caption_beams": beams, "caption_s": round(statistics.median(caption), 4),
            "samples": {"one_token_s": one, "n_tokens_s": many, "caption_s": caption}, "repeats": repeats}


def bench_programs(pte_paths: dict, *, warmup: int = 2, repeats: int = 10, loads: int = 5) -> dict:
    """Time ``.pte`` programs on this host with the ExecuTorch runtime, in ``atomkit.deploy.adb.bench_pte``'s
    schema (seconds): ``load`` = load_program + load_method (median of ``loads``, in this process: the
    file is in the page cache after the first), ``components`` = one execution on the sidecar's example
    inputs (``warmup`` dropped, median of ``repeats``)."""
    import os
    import platform
    import time

    from atomkit.deploy.adb import timing_summary as summary  # the phone benchmark's own summary: one schema

    components, load = {}, {}
    for name, path in pte_paths.items():
        path = Path(path)
        if not path.is_file():
            raise AtomkitError(f"program {name!r}: {path} does not exist")
        samples, method = [], None
        for _ in range(max(loads, 1)):
            t0 = time.perf_counter()
            method = load_method(path)
            samples.append(time.perf_counter() - t0)
        load[name] = summary(samples, "host")
        inputs = example_inputs(path)
        times = []
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            method.execute(inputs)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        components[name] = summary(times, "host")
    info = {"serial": "host", "model": platform.node(), "soc": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "host": True}
    return {"device": info, "components": components, "load": load,
            "meta": {"runner": "executorch.runtime (host)", "warmup": warmup, "repeats": repeats, "loads": loads,
                     "unit": "s"}}
