"""Student and teacher architectures, a name registry and small helpers.

Every model takes ``(num_classes, in_channels=3, **arch_kwargs)``, exposes
an integer ``feature_dim`` and implements ``forward(x, return_features=False)``
returning logits, or ``(logits, features)`` where ``features`` is the pooled
penultimate vector of width ``feature_dim``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from crdnd_ray.models.cifar_resnet import ResNet18
from crdnd_ray.models.mobilenetv2 import MobileNetV2
from crdnd_ray.models.normalize import Normalized
from crdnd_ray.models.small_cnn import SmallCNN
from crdnd_ray.models.wideresnet import WideResNet

MODELS: dict[str, type[nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "mobilenetv2": MobileNetV2,
    "wideresnet": WideResNet,
}


def build_model(arch: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Instantiate the registered architecture ``arch``.

    Args:
        arch: A key of :data:`MODELS`.
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
        **kwargs: Architecture-specific options, e.g. ``depth`` and
            ``widen_factor`` for ``"wideresnet"`` or ``width`` for ``"small_cnn"``.

    Raises:
        ValueError: If ``arch`` is not registered.
    """
    try:
        model_cls = MODELS[arch]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ValueError(
            f"Unknown model architecture {arch!r}; the known architectures are: {known}."
        ) from None
    return model_cls(num_classes=num_classes, in_channels=in_channels, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Return the number of parameter elements of ``model`` (buffers excluded).

    Args:
        model: Any module.
        trainable_only: Count only parameters with ``requires_grad`` set.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "MODELS",
    "MobileNetV2",
    "Normalized",
    "ResNet18",
    "SmallCNN",
    "WideResNet",
    "build_model",
    "count_parameters",
]
