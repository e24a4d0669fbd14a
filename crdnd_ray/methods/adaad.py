"""AdaAD: Adaptive Adversarial Distillation (Huang et al., CVPR 2023).

Reference code: boyellow/AdaAD, ``AT_helper.py`` (``adaad_inner_loss``) and ``main.py``.

* Inner attack: start ``x + 0.001·N(0, 1)``, PGD-K maximising ``Σ_i KL(p_T(x'_i) ‖ p_S(x'_i))``:
  the teacher is queried on the *adversarial* point at every step and, as in the reference (its
  teacher output is not detached), the input gradient flows through both networks. Student
  BatchNorm in eval mode (``start: gaussian``, ``bn_mode: eval``).
* Loss: ``α · KL(p_T(x') ‖ p_S(x')) + (1 − α) · KL(p_T(x) ‖ p_S(x))``, teacher without gradient,
  default ``α = 1`` (adversarial term only; the natural forward still runs, as in the reference).
* Reduction, as the reference scripts: ``nn.KLDivLoss()`` element mean (per-sample KL ÷ C) in the
  CIFAR-10 script, sum ÷ B (batch mean) in the CIFAR-100 one. Here: batch mean when the task has at
  least ``batchmean_from_classes`` (100) classes, element mean otherwise (CIFAR-10, digits).
* ``τ = 1`` by default; a configured temperature softens both sides and multiplies by ``τ²``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from crdnd_ray import attacks
from crdnd_ray.methods.base import Distiller, LossParts, Reduction, accuracy, distillation_kl

__all__ = ["AdaAD"]


class _SideBySide(nn.Module):
    """``x ↦ [S(x) | T(x)]``: lets the PGD loss see both networks' logits on the same ``x'``."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.student(x), self.teacher(x)], dim=1)


def _adaptive_kl_loss(num_classes: int) -> attacks.LossFn:
    """``Σ_i KL(p_T(x'_i) ‖ p_S(x'_i))`` from side-by-side logits, differentiable through both halves."""

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        student_logits, teacher_logits = logits[:, :num_classes], logits[:, num_classes:]
        return F.kl_div(
            F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1), reduction="sum"
        )

    return loss_fn


class AdaAD(Distiller):
    """AdaAD: distil the teacher's prediction *at the student's adversarial point*."""

    name: ClassVar[str] = "adaad"
    default_temperature: ClassVar[float] = 1.0
    default_alpha: ClassVar[float] = 1.0
    default_start: ClassVar[str] = "gaussian"
    default_bn_mode: ClassVar[str] = "eval"
    batchmean_from_classes: ClassVar[int] = 100

    @property
    def reduction(self) -> Reduction:
        """``batchmean`` for 100+ classes (reference CIFAR-100 script), else ``elementmean`` (CIFAR-10)."""
        return "batchmean" if self.num_classes >= self.batchmean_from_classes else "elementmean"

    def attack_phase(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x'`` from the side-by-side attack, then the teacher's logits on ``x'`` and on ``x``."""
        x_adv = self.inner_attack(
            x, _adaptive_kl_loss(self.num_classes), model=_SideBySide(self.student, self.teacher)
        )
        teacher_adv_logits, _ = self.teacher_outputs(x_adv)
        teacher_logits, _ = self.teacher_outputs(x)
        return x_adv, teacher_adv_logits, teacher_logits

    def loss(self, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, teacher_adv_logits: torch.Tensor,
             teacher_logits: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        adv_logits = self.student(x_adv)
        nat_logits = self.student(x)
        tau = self.temperature
        kd_adv = distillation_kl(adv_logits, F.softmax(teacher_adv_logits / tau, dim=1), tau, self.reduction)
        kd_nat = distillation_kl(nat_logits, F.softmax(teacher_logits / tau, dim=1), tau, self.reduction)
        loss = self.alpha * kd_adv + (1.0 - self.alpha) * kd_nat
        parts = {
            "kd_adv": kd_adv.detach(),
            "kd_nat": kd_nat.detach(),
            "train_teacher_acc": accuracy(teacher_logits, y),
            "train_teacher_adv_acc": accuracy(teacher_adv_logits, y),
            "train_adv_acc": accuracy(adv_logits, y),
        }
        return loss, parts
