"""A small convolutional network for tiny images such as the 8x8 sklearn digits."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three-convolution network with adaptive pooling, fast enough for CPU search.

    The layout is conv(32)-BN-ReLU, conv(64)-BN-ReLU, 2x2 max-pool,
    conv(128)-BN-ReLU, global average pool, then a linear classifier. Because
    the final pooling is adaptive, any input of at least 2x2 pixels and any
    channel count works; the default target is 1x8x8 sklearn digits.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input image channels (pass 1 for digits; the
            default of 3 matches the other architectures).
        width: Channel count of the first convolution; the later ones use
            twice and four times this value.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            _conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(kernel_size=2),
            _conv_bn_relu(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim: int = 4 * width
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return logits, or ``(logits, features)`` when ``return_features`` is true."""
        features = self.features(x)
        logits = self.fc(features)
        if return_features:
            return logits, features
        return logits
