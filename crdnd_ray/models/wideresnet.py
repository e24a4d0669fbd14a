"""WideResNet with the TRADES / RobustBench parameter layout.

Module and parameter names (``conv1``, ``block1.layer.0.bn1``,
``block2.layer.0.convShortcut``, ``bn1``, ``fc`` ...) follow
yaodongyu/TRADES and ``robustbench.model_zoo.architectures.wide_resnet`` so
that published robust checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WideBasicBlock(nn.Module):
    """Pre-activation residual block (BN-ReLU-conv twice) with an optional 1x1 shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut: nn.Conv2d | None = None
        if not self.equalInOut:
            self.convShortcut = nn.Conv2d(
                in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block; when the widths differ the shortcut sees the pre-activated input."""
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        out = self.conv2(out)
        if self.convShortcut is None:
            return x + out
        return self.convShortcut(activated) + out


class NetworkBlock(nn.Module):
    """A stage of ``nb_layers`` blocks stored under ``layer`` as in TRADES."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply every block of the stage."""
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k of Zagoruyko & Komodakis in the TRADES / RobustBench form (no dropout).

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
        depth: Total depth; ``(depth - 4)`` must be divisible by 6.
        widen_factor: Width multiplier ``k`` of the three stages (16k, 32k, 64k).
        sub_block1: Create the unused ``sub_block1`` stage so that checkpoints
            saved from the original TRADES code (which contain it) load
            strictly. It never takes part in ``forward``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        depth: int = 34,
        widen_factor: int = 10,
        sub_block1: bool = False,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}."
            )
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be a positive integer, got {widen_factor}.")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        if sub_block1:
            self.sub_block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.feature_dim: int = channels[3]
        self.fc = nn.Linear(channels[3], num_classes)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return logits, or ``(logits, features)`` when ``return_features`` is true."""
        out = self.conv1(x)
        out = self.block1(out)
        out = self.block2(out)
        out = self.block3(out)
        out = self.relu(self.bn1(out))
        features = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        logits = self.fc(features)
        if return_features:
            return logits, features
        return logits
