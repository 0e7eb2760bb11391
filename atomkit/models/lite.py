"""EfficientNet-Lite with its BatchNorms folded away: the inference net the default encoder runs.

The same layers, parameter names and arithmetic as the ``efficientnet_lite_pytorch`` net after
``encoder.fold_batchnorm`` (TensorFlow "SAME" padding fixed for the model's input size, ReLU6, a skip
where a block keeps its shape), so it loads the folded weights file as it is and gives the same
outputs (tested). It only leaves out what inference never runs: the 49 BatchNorms (folded), dropout,
drop-connect and the swish variants. That is what makes loading it cheap: the package's constructor
builds 185 modules (about 16 ms on 2 cores, more than reading the 18 MiB of weights); this builds 68.
The architecture numbers (widths, depths, kernels, strides) come from the package's own tables.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _relu6(x: torch.Tensor) -> torch.Tensor:
    return F.hardtanh(x, 0.0, 6.0)  # what the package's nn.ReLU6 runs (and what exporters lower)


class SameConv(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding for inputs of ``size`` x ``size`` (as the package's
    ``Conv2dStaticSamePadding``: output side ``ceil(size / stride)``, the odd pixel of padding at the end)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=True)
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        self.pad = (total // 2, total - total // 2) * 2 if total else None  # (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


class Block(nn.Module):
    """Inverted bottleneck (MBConv without squeeze-excitation): expand 1x1, depthwise k x k, project 1x1."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, size: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv(cin, mid, 1, 1, size)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, size, groups=mid)
        self._project_conv = SameConv(mid, cout, 1, 1, math.ceil(size / stride))
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _relu6(self._expand_conv(x)) if self.expand else x
        y = self._project_conv(_relu6(self._depthwise_conv(y)))
        return y + x if self.skip else y


class LiteNet(nn.Module):
    """EfficientNet-Lite ``variant`` ("lite0" ... "lite4"), BatchNorm folded: ``extract_features`` gives the
    head's ReLU6 feature map and ``_fc`` the ImageNet classifier, as on the package's net."""

    def __init__(self, variant: str = "lite0"):
        super().__init__()
        from efficientnet_lite_pytorch.utils import get_model_params, round_filters, round_repeats

        stages, g = get_model_params(f"efficientnet-{variant}", {})
        size = g.image_size
        self.input_image_size = size
        self._conv_stem = SameConv(3, round_filters(32, g, g.fix_head_stem), 3, 2, size)
        size = math.ceil(size / 2)
        blocks = []
        for i, a in enumerate(stages):
            cin, cout = round_filters(a.input_filters, g), round_filters(a.output_filters, g)
            ends = g.fix_head_stem and i in (0, len(stages) - 1)  # first and last stage: depth not scaled
            repeats = a.num_repeat if ends else round_repeats(a.num_repeat, g)
            if g.fix_head_stem and i == 0:
                cin = 32  # the stem's width, which fix_head_stem keeps
            stride = a.stride[0] if isinstance(a.stride, (list, tuple)) else a.stride
            for r in range(repeats):
                blocks.append(Block(cin if r == 0 else cout, cout, a.expand_ratio, a.kernel_size,
                                    stride if r == 0 else 1, size))
                if r == 0:
                    size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)
        head = round_filters(1280, g, g.fix_head_stem)
        self._conv_head = SameConv(cout, head, 1, 1, size)
        self._fc = nn.Linear(head, g.num_classes)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        x = _relu6(self._conv_stem(x))
        for block in self._blocks:
            x = block(x)
        return _relu6(self._conv_head(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.extract_features(x).mean(dim=(2, 3)))
