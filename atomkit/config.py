"""Dataclass configs. Each validates itself on construction."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from atomkit.errors import InputError, UnknownBackend

PENDING = ""  # the caption of a clip indexed search-first, until its caption lands (atomkit.retrieval.deferred)
EXECUTORS = ("auto", "sequential", "pipelined", "pipelined-disjoint", "prefetch")  # executor names (atomkit.pipeline.executor)
# what `atomkit bench --executor` takes (atomkit.bench.reuse): an executor by name, or "measured", chosen by the
# run's overlap measurement
BENCH_EXECUTORS = ("measured", *EXECUTORS)

# The decode engine's backends (atomkit.decode.engine.BACKENDS says what each is; it checks it has these, in order)
BACKEND_NAMES = ("hf", "torch", "fused", "compiled", "bf16", "int8", "int4", "int4-compiled")


def available_backends() -> list[str]:
    """Backend names, plus ``auto`` (``CPU_DEFAULT`` on a CPU, the exact ``torch`` engine on CUDA, ``hf`` for an LM the
    steppers cannot run)."""
    return ["auto", *BACKEND_NAMES]


def check_backend(name: str) -> str:
    if name != "auto" and name not in BACKEND_NAMES:
        raise UnknownBackend(name, available_backends())
    return name


CAPTION_MODES = ("grounded", "free", "raw")


@dataclass(frozen=True)
class WindowConfig:
    """How a video is cut into clips and what each clip is sampled to."""

    length_s: float = 10.0  # window length in seconds (paper: 10 s)
    stride_s: float = 5.0  # hop between window starts (paper: 5 s, so windows overlap by half)
    frames: int = 6  # frames sampled per clip (paper: 6)
    size: int = 224  # frames are resized to size x size: whole (the default) or short side + centre crop
    fit: str = "whole"  # "whole": the whole frame, as a plain classifier pass sees it; "crop": centre crop

    def __post_init__(self):
        if not (self.length_s > 0 and math.isfinite(self.length_s)):
            raise InputError(f"window length must be a finite number of seconds > 0, got {self.length_s}")
        if not (self.stride_s > 0 and math.isfinite(self.stride_s)):
            raise InputError(f"window stride must be a finite number of seconds > 0, got {self.stride_s}")
        if self.frames < 1:
            raise InputError(f"frames per clip must be >= 1, got {self.frames}")
        if self.size < 16:
            raise InputError(f"frame size must be >= 16 px, got {self.size}")
        if self.fit not in ("whole", "crop"):
            raise InputError(f"frame fit must be 'whole' or 'crop', got {self.fit!r}")


@dataclass(frozen=True)
class DecodeConfig:
    """Decoding of captions and scripts by the language decoder."""

    max_new_tokens: int = 23  # paper: captions traced with at most 23 new tokens
    num_beams: int = 4  # paper: beam search with 4 beams
    caption_batch: int = 4  # clips whose captions decode as one batch (4 clips x 4 beams: 16 rows, ~30 % faster than one by one)
    script_max_new_tokens: int = 160  # the assembly script is longer than a caption
    script_num_beams: int = 1  # greedy for the script: JSON is long and beam search is slow
    backend: str = "auto"  # decode engine (atomkit.decode.engine.BACKENDS): auto = engine.CPU_DEFAULT (int4) on a CPU, the
    # exact fp32 `torch` on CUDA, `hf` where no stepper runs; "torch" is the exact reference (--exact)
    # concept-bridge captions: "grounded" (atomkit.decode.grounded); "free" (the paper's beam search, a caption that fails
    # the grounding check takes the grounded form); "raw" (the paper's beam search as it comes, unchecked)
    captions: str = "grounded"

    def __post_init__(self):
        for name in ("max_new_tokens", "num_beams", "caption_batch", "script_max_new_tokens", "script_num_beams"):
            if getattr(self, name) < 1:
                raise InputError(f"DecodeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.captions not in CAPTION_MODES:
            raise InputError(f"DecodeConfig.captions must be one of {', '.join(CAPTION_MODES)}, got {self.captions!r}")
        check_backend(self.backend)


def exact(decode: "DecodeConfig | None" = None) -> "DecodeConfig":
    """``decode`` (default settings when None) on the exact fp32 engine: what a reference run decodes with."""
    from dataclasses import replace

    return replace(decode or DecodeConfig(), backend="torch")


def cache_dir() -> Path:
    """Where converted weights are cached: $ATOMKIT_CACHE, else ~/.cache/atomkit."""
    env = os.environ.get("ATOMKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "atomkit"


def quiet_libraries(offline: bool = True) -> None:
    """Offline (unless ``offline`` is False: ``atomkit fetch``), and no progress bars or warnings from the libraries
    (atomkit shows its own progress): for the CLI and for worker processes it starts."""
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars; atomkit shows its own progress
