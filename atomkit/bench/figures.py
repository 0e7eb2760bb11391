"""The reuse benchmark shown: the comparison in the layout of the paper's Table 3, and the encoder/decoder
timeline of both paths as a PNG."""
from __future__ import annotations

from pathlib import Path

from atomkit.bench.reuse import STAGES


def table(result: dict) -> str:
    """The comparison in the layout of the paper's Table 3 (seconds; totals over all prompts)."""
    c, e = result["components"], result["end_to_end"]
    rows = [("Model loading", c["model_loading"]), ("Model unloading", c["model_unloading"]),
            ("Video encoding", c["video_encoding"]),
            ("Caption generation", c["caption_generation"]), ("Indexing", c["indexing"]),
            ("Script generation", c["script_generation"])]
    runs = result.get("repeats", 1)
    head = "Component (s, total)" if runs == 1 else f"Component (s/run, {runs} runs)"
    lines = [f"{head:28s} {'w/o reuse':>10s} {'ATOM':>10s} {'change':>8s}", "-" * 60]
    for label, d in rows:
        a, b = d["no_reuse"]["total"], d["reuse"]["total"]
        lines.append(f"{label:28s} {a:10.2f} {b:10.2f} {_pct(a, b):>8s}")
    lines.append("-" * 60)
    for task in ("retrieval", "assembly"):
        a, b = e[task]["no_reuse"], e[task]["reuse"]
        per_run = e[task].get("ratio_per_run")
        spread = f"  ratio per repeat {', '.join(f'{x:.3f}' for x in per_run)}" if per_run else ""
        lines.append(f"{'End-to-end ' + task:28s} {a:10.2f} {b:10.2f} {_pct(a, b):>8s}{spread}")
    o = result["overlap"]
    lines.append(f"overlap: N={o['N']} L_E={o['L_E']:.3f}s L_D={o['L_D']:.3f}s seq={o['sequential_s']:.2f}s "
                 f"par={o['pipelined_s']:.2f}s ideal={o['ideal_s']:.2f}s eta={o['eta']}")
    d = o.get("disjoint")
    if d:
        lines.append(f"stages on disjoint cores (threads {d['threads']}): L_E={d['L_E']:.3f}s L_D={d['L_D']:.3f}s "
                     f"par={d['pipelined_s']:.2f}s, no schedule of the two beats N*max={d['bound_s']:.2f}s")
    if o.get("prefetch"):
        lines.append(f"frames decoded ahead (prefetch): {o['prefetch']['pipelined_s']:.2f}s")
    lines.append(f"best captioning here {o['best_s']:.2f}s (eta {o['best_eta']}); reuse path ran {result['reuse_executor']}")
    m = result["memory"]
    lines.append(f"peak memory (MiB): w/o reuse {m['no_reuse']['peak_mib']}, ATOM {m['reuse']['peak_mib']}")
    if "gc" in result:  # all repeats together
        g = result["gc"]
        lines.append(f"garbage collection (s, all repeats): w/o reuse {g['no_reuse']['seconds']:.2f} "
                     f"({g['no_reuse']['collections']}), ATOM {g['reuse']['seconds']:.2f} ({g['reuse']['collections']}); "
                     f"CPU steal: {result['cpu_steal_s']['no_reuse']:.2f}, {result['cpu_steal_s']['reuse']:.2f}")
    if result.get("cpu_s"):  # benchmarks written before it have none
        c = result["cpu_s"]
        lines.append(f"process CPU time per run (both tasks): w/o reuse {c['no_reuse']['cpu_s']:.2f} s, "
                     f"ATOM {c['reuse']['cpu_s']:.2f} s, ratio {c['ratio']}")
    return "\n".join(lines)


def _pct(a: float, b: float) -> str:
    return f"{(b - a) / a * 100:+.1f}%" if a else "n/a"


def plot_timeline(result: dict, path: str | Path) -> Path:
    """PNG of encoder/decoder busy intervals over time, sequential above pipelined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from atomkit.io import atomic_path

    o = result["overlap"]
    colors = {0: "#9ecae1", 1: "#3182bd", 2: "#e6550d"}
    fig, axes = plt.subplots(2, 1, figsize=(11, 4.2), sharex=True)
    for ax, name in zip(axes, ("sequential", "pipelined")):
        trace = o["timeline"][name] or []
        for s in range(3):
            spans = [(a, b - a) for st, _, a, b in trace if st == s]
            ax.broken_barh(spans, (2 - s - 0.4, 0.8), facecolors=colors[s], edgecolor="white", linewidth=0.5)
        ax.set_yticks([2, 1, 0], list(STAGES))
        wall = o[f"{name}_s"]
        ax.set_title(f"{name}: {wall:.2f} s for {o['N']} clips", fontsize=10, loc="left")
    axes[-1].set_xlabel("seconds")
    fig.suptitle(f"{result['model']}: L_E={o['L_E']:.2f}s  L_D={o['L_D']:.2f}s  ideal N·max={o['ideal_s']:.2f}s  "
                 f"eta={o['eta']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
