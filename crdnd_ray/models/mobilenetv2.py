"""CIFAR MobileNetV2 following kuangliu/pytorch-cifar."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1) block with a stride-1 shortcut.

    As in kuangliu/pytorch-cifar, every stride-1 block adds a shortcut: the
    identity when the channel counts match, otherwise a 1x1 convolution with
    batch norm. Stride-2 blocks have no shortcut.
    """

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, kernel_size=3, stride=stride, padding=1, groups=planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the inverted residual block."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 1:
            out = out + self.shortcut(x)
        return out


class MobileNetV2(nn.Module):
    """MobileNetV2 adapted to 32x32 images (stride-1 stem and second stage).

    Parameter names match kuangliu/pytorch-cifar (``conv1``, ``bn1``,
    ``layers``, ``conv2``, ``bn2``, ``linear``). The final pooling is
    adaptive, so inputs other than 32x32 also work; at 32x32 it equals the
    original 4x4 average pool.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
    """

    cfg: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.layers = self._make_layers(in_planes=32)
        self.conv2 = nn.Conv2d(320, 1280, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.feature_dim: int = 1280
        self.linear = nn.Linear(self.feature_dim, num_classes)

    def _make_layers(self, in_planes: int) -> nn.Sequential:
        layers = []
        for expansion, out_planes, num_blocks, stride in self.cfg:
            for block_stride in [stride] + [1] * (num_blocks - 1):
                layers.append(InvertedResidual(in_planes, out_planes, expansion, block_stride))
                in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return logits, or ``(logits, features)`` when ``return_features`` is true."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        features = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        logits = self.linear(features)
        if return_features:
            return logits, features
        return logits
