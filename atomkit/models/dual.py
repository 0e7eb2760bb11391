"""open_clip dual encoders (MobileCLIP, MobileCLIP2) as a fourth resident module: the **retriever**.

Search tools rank images with a CLIP-family dual encoder; atomkit ranks clips with one, per clip: the image tower
embeds each of a clip's frames, the frame vectors are pooled over time (their mean, made unit length again), and the
text tower embeds the query in the same space. Beside a captioner (the default spec's encoder and decoder write the
captions and the script), the retriever is what ranks: the ATOM reuse story with a fourth resident module.

Checkpoints are open_clip's hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``, e.g.
``timm/MobileCLIP2-S0-OpenCLIP``), read offline from ``--weights DIR`` or the Hugging Face cache
(``atomkit.models.hub``) through open_clip's own ``local-dir:`` loader; ``random_weights`` builds the architecture
and writes it once to the cache in that layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Tower:
    """One open_clip dual encoder atomkit offers."""

    repo: str  # its Hugging Face repository (open_clip layout)
    config: str  # open_clip's built-in config of the architecture (for random weights)
    config_json: dict | None = None  # a config of our own instead (the tiny test model)


TOWERS = {
    "mobileclip2-s0": Tower("timm/MobileCLIP2-S0-OpenCLIP", "MobileCLIP2-S0"),
    "mobileclip-s2": Tower("apple/MobileCLIP-S2-OpenCLIP", "MobileCLIP-S2"),
}
TINY = Tower("atomkit/tiny-clip", "atomkit-tiny-clip", {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}})
MOBILECLIP_PREPROCESS = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bilinear",
                         "resize_mode": "shortest"}  # open_clip's pretrained config of the MobileCLIP checkpoints


class DualEncoder(nn.Module):
    """An open_clip model as atomkit's retriever: ``embed_clip(frames)`` -> one unit vector per clip (frame vectors
    pooled over time), ``embed(texts)`` -> unit vectors of queries in the same space.

    ``forward`` is the image tower on normalised frames (T, 3, S, S) -> unit frame vectors (T, D), exportable as it
    is; ``text_forward`` is the text tower on token ids (N, context) -> unit vectors (N, D)."""

    def __init__(self, model: nn.Module, tokenizer, *, image_size: int, mean, std):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.image_size = int(image_size)
        self.mean, self.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (1, 3, T, H, W) -> float (T, 3, S, S): resized (bilinear, antialiased) to the tower's size, scaled
        to 0..1 and normalised with the checkpoint's mean and std."""
        if frames.dtype != torch.uint8 or frames.dim() != 5 or frames.shape[:2] != (1, 3):
            raise ValueError(f"expected uint8 frames of shape (1, 3, T, H, W), got {frames.dtype} {tuple(frames.shape)}")
        x = frames[0].permute(1, 0, 2, 3).float().div_(255.0)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0, 1)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, normalize=True)

    def text_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)

    @torch.inference_mode()
    def frame_vectors(self, frames: torch.Tensor) -> torch.Tensor:
        """Unit vectors (T, D) of a clip's frames."""
        return self(self.preprocess(frames).to(self.device)).float().cpu()

    @torch.inference_mode()
    def embed_clip(self, frames: torch.Tensor) -> torch.Tensor:
        """One unit vector (D,) per clip: the mean of its frame vectors, unit length again (temporal mean pooling)."""
        return pool(self.frame_vectors(frames))

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit vectors (N, D) of texts (queries), in the image tower's space."""
        if not texts:
            return self.embed([""])[:0]
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.text_forward(tokens).float().cpu()


def pool(frame_vectors: torch.Tensor) -> torch.Tensor:
    """Temporal mean pooling: the mean of unit frame vectors (T, D), unit length again."""
    return F.normalize(frame_vectors.float().mean(0), dim=0)


def load(folder: Path) -> DualEncoder:
    """The dual encoder in ``folder`` (open_clip's hub layout), through open_clip's own ``local-dir:`` loader."""
    import open_clip

    folder = Path(folder)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    cfg = json.loads((folder / "open_clip_config.json").read_text()).get("preprocess_cfg", {})
    size = getattr(model.visual, "image_size", None) or cfg.get("size") or 224
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = cfg.get("mean") or getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = cfg.get("std") or getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    enc = DualEncoder(model.eval(), open_clip.get_tokenizer(f"local-dir:{folder}"), image_size=int(size),
                      mean=mean, std=std)
    enc.weight_files = sorted(folder.glob("open_clip_model.*")) or sorted(folder.glob("*.safetensors"))
    enc.folder = folder  # its config gives an exported program's host side the tokenizer
    return enc


def architecture(tower: Tower) -> nn.Module:
    """The tower's architecture without weights, on the meta device (``atomkit.pipeline.budget`` sizes it)."""
    return _build(tower, device="meta")


def _build(tower: Tower, device: str = "cpu") -> nn.Module:
    """A fresh model of ``tower``'s architecture: open_clip's built-in config, or our own (``open_clip.CLIP``).
    (open_clip moves the model it builds with ``.to(device)``, so a meta build names the device instead of
    running under ``torch.device("meta")``.)"""
    import open_clip

    if tower.config_json is not None:
        with torch.device(device):
            return open_clip.CLIP(**tower.config_json)
    return open_clip.create_model(tower.config, pretrained=None, device=device)


def write_random(folder: Path, tower: Tower, *, seed: int = 0) -> Path:
    """``tower``'s architecture with random weights in open_clip's hub layout (``open_clip_config.json`` +
    ``open_clip_model.safetensors``), atomically."""
    import open_clip
    from safetensors.torch import save_file

    from atomkit.io import atomic_dir

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(tower)
    model_cfg = tower.config_json or open_clip.get_model_config(tower.config)
    preprocess = dict(MOBILECLIP_PREPROCESS if tower.config.startswith("MobileCLIP") else
                      {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                       "interpolation": "bicubic", "resize_mode": "shortest"},
                      size=model_cfg["vision_cfg"]["image_size"])
    with atomic_dir(folder) as tmp:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "open_clip_model.safetensors"))
        (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                              indent=2))
        (tmp / "atomkit.json").write_text(json.dumps({"written_by": "atomkit.models.dual.write_random",
                                                      "tower": tower.repo, "seed": seed}))
    return folder


def random_folder(tower: Tower, cache: Path, *, quiet: bool = False) -> Path:
    """Random weights of ``tower`` written once into ``cache`` (keyed by the architecture) and read from disk after."""
    from atomkit.models.weights import random_checkpoint

    return random_checkpoint(tower.repo, [tower.config, tower.config_json], cache,
                             lambda folder: write_random(folder, tower), quiet=quiet)
