"""Input normalisation wrapper for models trained on standardised inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalized(nn.Module):
    """Wrap ``model`` so that it accepts inputs in ``[0, 1]`` and standardises them itself.

    The forward pass computes ``model((x - mean) / std, return_features=...)``
    with per-channel ``mean`` and ``std``. Attacks and distillation losses can
    then work in raw pixel space while the wrapped teacher still sees the
    statistics it was trained with.

    The statistics are registered as non-persistent buffers: they follow
    ``.to()`` / ``.double()`` but stay out of ``state_dict()``, so the
    wrapper's state dict is exactly the wrapped model's with a ``model.``
    prefix.

    Args:
        model: Network taking ``(x, return_features)`` and exposing ``feature_dim``.
        mean: Per-channel mean, one value per input channel.
        std: Per-channel standard deviation, one strictly positive value per channel.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() == 0 or mean_t.numel() != std_t.numel():
            raise ValueError(
                "mean and std must be non-empty and of equal length, "
                f"got {mean_t.numel()} and {std_t.numel()} values."
            )
        if not bool(torch.all(std_t > 0)):
            raise ValueError(f"Every std value must be strictly positive, got {std_t.tolist()}.")
        self.model = model
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        """Width of the wrapped model's penultimate feature vector."""
        return int(self.model.feature_dim)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalise ``x`` and run the wrapped model."""
        return self.model((x - self.mean) / self.std, return_features=return_features)
