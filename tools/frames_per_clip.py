"""What a SmolVLM2 clip costs per frame count: encoding, the caption prompt's length, its KV cache and the caption's
latency, on one real 10 s clip, with the spec at full size (random weights unless you have fetched the real ones;
speed and memory do not depend on the values). The spec's frame count (``atomkit.models.smolvlm.FRAMES``) is chosen
from this table (docs/models.md).

    .venv/bin/python tools/frames_per_clip.py --models smolvlm2-256m --random-weights --out results/smolvlm2-frames.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smolvlm2-256m")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--frames", type=int, nargs="+", default=[2, 4, 6, 8, 10, 12, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--out", default="results/smolvlm2-frames.json")
    args = p.parse_args()

    import atomkit
    from atomkit.bench.record import with_record
    from atomkit.io import write_json_atomic
    from atomkit.media.video import clips, frame_times, sample_frames

    video = next(v for v in atomkit.sample_videos() if v.name == "bikes.mp4")  # 10 s: one whole window
    decode = atomkit.DecodeConfig(num_beams=args.beams)
    rows = []
    with atomkit.Session(args.models, random_weights=args.random_weights, decode=decode, device="cpu") as s:
        enc, dec = s.get("encoder"), s.get("decoder")
        cfg = dec.lm.config
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * getattr(cfg, "head_dim", 64) * 4  # K+V fp32
        for n in args.frames:
            window = replace(s.window, frames=n)
            clip = clips(video, window)[0]
            frames = sample_frames(clip, window)
            encode, caption = [], []
            for _ in range(args.repeats + 1):  # the first run warms up
                t0 = time.perf_counter()
                e = enc.encode(frames)
                t1 = time.perf_counter()
                e.times, e.duration_s = [t - clip.start_s for t in frame_times(clip, n)], clip.duration_s
                dec.captions([e], decode)
                t2 = time.perf_counter()
                encode.append(t1 - t0)
                caption.append(t2 - t1)
            tokens = int(dec._ids(dec.video_prompt(e)).shape[1])
            row = {"frames": n, "prompt_tokens": tokens, "image_tokens": int(e.features.shape[0] * e.features.shape[1]),
                   "encode_s": round(statistics.median(encode[1:]), 3),
                   "caption_s": round(statistics.median(caption[1:]), 3),
                   "kv_cache_mib": round(tokens * per_token * args.beams / 2**20, 1)}
            row["clip_s"] = round(row["encode_s"] + row["caption_s"], 3)
            rows.append(row)
            print(row, flush=True)
        result = {"model": s.model, "random_weights": s.random_weights, "video": video.name, "beams": args.beams,
                  "backend": s.get("decoder").engine(decode.backend).__class__.__name__, "repeats": args.repeats,
                  "frame_px": s.window.size, "rows": rows}
    write_json_atomic(ROOT / args.out if not Path(args.out).is_absolute() else args.out, with_record(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
