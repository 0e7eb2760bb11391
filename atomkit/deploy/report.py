"""``atomkit export``: a model's three modules -> quantized ``.pte`` programs + one ``report.json``.

The report answers, by numbers, whether the deployed pipeline is still the pipeline:

* per module: bytes of Linear + Embedding weights before and after quantization (eager torchao
  modules), output SQNR against fp32 on real inputs of the eager quantized module and of the
  ``.pte`` program, parity of the program against the eager module of the same quantization
  (tolerance stated), what XNNPACK delegated and what stayed outside, file size, export time;
* ``checks``: the acceptance thresholds (Linear+Embedding <= 0.30 x fp32 for int8, encoder SQNR
  >= 20 dB, parity) and whether each holds;
* ``load_times``: the encoder as eager, TorchScript (the paper's deprecated ``torch.jit.trace`` path)
  and ``.pte``, load + first inference, each in a fresh process (``cold``: page cache dropped first);
* ``pipeline`` (optional): the whole pipeline run on the programs (``Session(programs=DIR)``)
  assembling the videos, its captions scored against the fp32 eager captions of the same decoding.
"""
from __future__ import annotations

from pathlib import Path

import torch

from atomkit.config import DecodeConfig, exact
from atomkit.io import write_json_atomic

# real text inputs for the embedder and decoder checks (the encoder gets real video frames)
TEXTS = ["a man rides a bike down a city street", "a cartoon rabbit stands in a green forest",
         "a person talks on the phone in a car", "people walk past parked cars on a sunny day"]
INT8_RATIO_MAX = 0.30
ENCODER_SQNR_MIN_DB = 20.0


def _frames(videos, window):
    """The uint8 frames (the window's count and size) of the first clip of the first readable video."""
    from atomkit.errors import VideoError
    from atomkit.media.video import clips, sample_frames

    for v in videos:
        try:
            return sample_frames(clips(v, window)[0], window)
        except VideoError:
            continue
    raise VideoError(str(videos[0]) if videos else "(no videos)", "no readable video to take test frames from")


@torch.inference_mode()
def program_outputs(ref, programs: dict, frames: torch.Tensor) -> dict:
    """fp32 eager outputs and ``.pte`` outputs on the same real inputs, per module: (ref, test)."""
    from atomkit.deploy.runtime import PteStepper, open_program

    out = {}
    if "encoder" in programs:
        enc, pte = ref.get("encoder"), open_program(programs["encoder"], "encoder")
        x = enc.preprocess(frames)
        a, b = enc(x), pte(x)
        out["encoder"] = (a[-1] if isinstance(a, tuple) else a, b[-1] if isinstance(b, tuple) else b)
    if "embedder" in programs:
        out["embedder"] = (ref.get("embedder").embed(TEXTS), open_program(programs["embedder"], "embedder").embed(TEXTS))
    if "retriever" in programs:  # frame vectors of the real frames and vectors of real texts, side by side
        ret, pte = ref.get("retriever"), open_program(programs["retriever"], "retriever")
        out["retriever"] = (torch.cat([ret.frame_vectors(frames), ret.embed(TEXTS)]),
                            torch.cat([pte.frame_vectors(frames), pte.embed(TEXTS)]))
    if "decoder" in programs:
        dec, pte = ref.get("decoder"), open_program(programs["decoder"], "decoder")
        ids = dec._ids(dec.render([{"role": "user", "content": "Describe a clip: " + TEXTS[0]}]))
        out["decoder"] = (dec.lm(input_ids=ids).logits[0, -1].float(), PteStepper(pte).prefill(ids)[0])
    return out


def export_model(model: str = "default", quant: str = "int8", out_dir: str | Path = "export", *,
                 weights=None, random_weights: bool = False, modules=None,
                 max_seq_len: int = 512, decoder_batch: int = 4, embed_seq_len: int = 128, videos=None,
                 load_times: bool = True,
                 cold: bool = False, pipeline: bool = False, decode: DecodeConfig | None = None, progress: bool = True) -> dict:
    """Export, check and report; writes ``<module>.pte`` + sidecars + ``report.json`` into ``out_dir``.

    ``decoder_batch``: rows of the decoder program's KV cache, the most beams it searches with (a Llama LM)."""
    from atomkit.deploy import export as X
    from atomkit.deploy.loads import load_times as probe_load_times, trace_encoder_torchscript
    from atomkit.evaluation.parity import compare_modules
    from atomkit.deploy.program import read_sidecar
    from atomkit.deploy.quant import _check_scheme, finite_sqnr_db
    from atomkit.pipeline.session import Session
    from atomkit.media.scan import sample_videos

    _check_scheme(quant)
    if modules is None:  # every module the spec has (a retriever too)
        from atomkit.models.registry import get_spec

        modules = get_spec(model).modules
    out = Path(out_dir)
    videos = [Path(v) for v in (videos or sample_videos())]
    bar = _Progress(len(modules) + 2 + int(load_times) + int(pipeline), progress)
    report: dict = {"model": model, "quant": quant, "out": str(out), "random_weights": False, "modules": {}}
    with Session(model, device="cpu", weights=weights, random_weights=random_weights, decode=exact()) as ref:
        report["random_weights"] = ref.random_weights
        frames = _frames(videos, ref.window)
        bar.step("eager quantized modules vs fp32")
        if quant != "none":
            with Session(model, device="cpu", weights=weights, random_weights=random_weights, quant=quant) as q:
                eager = compare_modules(ref, q, frames, TEXTS)
        else:
            eager = {}
        exporters = {
            "encoder": lambda m: X.export_encoder(m, out, name="encoder", quant=quant, model=model,
                                                  frames=ref.window.frames, size=ref.window.size),
            "decoder": lambda m: X.export_decoder(m, out, name="decoder", quant=quant, max_seq_len=max_seq_len,
                                                  batch=decoder_batch, model=model),
            "embedder": lambda m: X.export_embedder(m, out, name="embedder", quant=quant, seq_len=embed_seq_len,
                                                    model=model),
            "retriever": lambda m: X.export_retriever(m, out, name="retriever", quant=quant,
                                                      frames=ref.window.frames, model=model),
        }
        programs = {}
        for m in modules:
            bar.step(f"export {m}")
            res = exporters[m](ref.get(m))
            programs[m] = res.path
            side = read_sidecar(res.path)
            report["modules"][m] = {
                "program": res.path.name, "file_bytes": res.path.stat().st_size,
                "export_seconds": round(res.seconds, 2), "weights": eager.get(m),
                "parity": res.parity,
                "delegation": {k: v for k, v in res.delegation.items() if k != "inside_ops"},
                **({k: side.get(k) for k in ("program_kind", "methods", "batch", "prefill", "max_seq_len")}
                   if m == "decoder" else {}),
            }
        if "decoder" in programs:  # the program's own decode speed: greedy tok/s and a beam caption
            from atomkit.decode.prompts import caption_ids
            from atomkit.deploy.runtime import open_program
            from atomkit.deploy.timing import decode_speed

            report["modules"]["decoder"]["decode"] = decode_speed(open_program(programs["decoder"], "decoder"),
                                                                  caption_ids(ref.get("decoder")))
        bar.step("programs vs fp32 on real inputs")
        for m, (a, b) in program_outputs(ref, programs, frames).items():
            report["modules"][m]["pte_sqnr_db_vs_fp32"] = round(finite_sqnr_db(a, b), 2)
        if load_times and "encoder" in programs:
            bar.step("load times: eager / TorchScript / .pte")
            ts = trace_encoder_torchscript(ref.get("encoder"), out / "encoder.torchscript.pt")
            report["load_times"] = {"module": "encoder", "torchscript_note": "torch.jit.trace, the paper's PyTorch "
                                    "Mobile path: deprecated, fp32 only here",
                                    **probe_load_times(pte=programs["encoder"], torchscript=ts,
                                                   eager=model if not ref.random_weights else None, cold=cold)}
    report["checks"] = checks(report)
    if pipeline:
        bar.step("pipeline on the programs vs fp32")
        report["pipeline"] = pipeline_check(model, out, videos, out / "pipeline", decode=decode,
                                            weights=weights, random_weights=random_weights, progress=progress)
    bar.close()
    report["report"] = str(write_json_atomic(out / "report.json", report))
    return report


def checks(report: dict) -> dict:
    """The acceptance thresholds and whether each holds (None where it does not apply)."""
    mods = report["modules"]
    res: dict = {}
    if report["quant"] == "int8":
        ratios = {m: (r.get("weights") or {}).get("linear_embedding_ratio") for m, r in mods.items()}
        res["int8_linear_embedding_ratio"] = {"max": INT8_RATIO_MAX, "values": ratios,
                                              "passed": all(v is not None and v <= INT8_RATIO_MAX
                                                            for v in ratios.values())}
    if "encoder" in mods:
        enc = mods["encoder"]
        values = {"eager": (enc.get("weights") or {}).get("sqnr_db"), "pte": enc.get("pte_sqnr_db_vs_fp32")}
        # None from compare_modules means identical outputs (infinite SQNR)
        res["encoder_sqnr_db"] = {"min": ENCODER_SQNR_MIN_DB, "values": values,
                                  "passed": all(v is None or v >= ENCODER_SQNR_MIN_DB for v in values.values())}
    res["parity"] = {m: r["parity"]["passed"] for m, r in mods.items()}
    res["passed"] = all(v["passed"] for k, v in res.items() if isinstance(v, dict) and "passed" in v) \
        and all(res["parity"].values())
    return res


def pipeline_check(model: str, programs: Path, videos, out_dir: Path, *, decode: DecodeConfig | None = None,
                   weights=None, random_weights: bool = False, prompt: str = "make a highlight reel",
                   progress: bool = False) -> dict:
    """Assemble ``videos`` with the ``.pte`` programs; score its captions against fp32 eager captions.

    Both sides decode alike (``decode``: greedy by default; a compact decoder program searches with as many
    beams as its rows), so the scores measure quantization + export, not a change of decoding."""
    from atomkit.evaluation.parity import compare_pipelines
    from atomkit.pipeline.session import Session
    from atomkit.pipeline.tasks import assemble, caption

    decode = decode or DecodeConfig(num_beams=1, script_num_beams=1)
    with Session(model, device="cpu", decode=exact(decode), weights=weights, random_weights=random_weights) as ref, \
            Session(model, device="cpu", decode=decode, programs=programs, weights=weights,
                    random_weights=random_weights) as test:
        ref_caps = caption(ref, videos, progress=progress)
        test_caps = caption(test, videos, progress=progress)
        asm = assemble(test, test_caps, prompt, out_dir, progress=progress)
        result = compare_pipelines(ref, test, ref_caps, test_caps)
        result.update(decoding={"num_beams": decode.num_beams, "max_new_tokens": decode.max_new_tokens},
                      reel=str(asm.reel), reel_duration_s=asm.reel_info["duration_s"],
                      script_source=asm.script.source, clips=len(test_caps.clips),
                      captions_seconds={"fp32_eager": round(ref_caps.seconds, 2), "pte": round(test_caps.seconds, 2)},
                      load=test.load_report(), skipped=[s.to_dict() for s in test_caps.skipped])
    return result


class _Progress:
    """A tqdm bar over the export stages (silent when ``enabled`` is False)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="export", disable=not enabled, unit="stage")

    def step(self, what: str) -> None:
        self.bar.set_postfix_str(what)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
