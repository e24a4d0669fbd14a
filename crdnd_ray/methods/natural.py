"""Natural (standard) training: cross-entropy on clean inputs, no attack, no teacher.

The reference point of the robustness literature: the gain of a robust method is read against a
naturally trained student of the same architecture under the same evaluation.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from crdnd_ray.methods.base import Distiller, LossParts, accuracy

__all__ = ["Natural"]


class Natural(Distiller):
    """Minimise the cross-entropy on natural examples."""

    name: ClassVar[str] = "natural"
    needs_teacher: ClassVar[bool] = False

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        logits = self.student(x)
        ce = F.cross_entropy(logits, y)
        return ce, {"ce_nat": ce.detach(), "train_nat_acc": accuracy(logits, y)}
