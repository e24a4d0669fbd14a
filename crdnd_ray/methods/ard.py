"""ARD: Adversarially Robust Distillation (Goldblum et al., AAAI 2020).

Reference code: goldblum/AdversariallyRobustDistillation, ``main.py``.

* Inner attack: PGD-K on ``CE(S(x'), y)`` from a uniform random start, run inside the student's
  forward while it is in train mode (``start: uniform``, ``bn_mode: train``: BatchNorm uses and
  updates batch statistics during the attack, as in the reference).
* Loss: ``α · τ² · KLDivLoss()(log_softmax(S(x') / τ), softmax(T(x) / τ)) + (1 − α) · CE(S(x), y)``,
  teacher on the natural input. ``nn.KLDivLoss()`` with its default reduction averages over all
  ``B·C`` elements, i.e. the per-sample KL divided by ``C`` (reduction ``elementmean`` here).
* Defaults ``τ = 30``, ``α = 1``. The natural forward ``S(x)`` is always run, as in the reference
  (it updates BatchNorm statistics even when ``α = 1`` gives its cross-entropy zero weight).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from crdnd_ray import attacks
from crdnd_ray.methods.base import Distiller, LossParts, accuracy, distillation_kl

__all__ = ["ARD"]


class ARD(Distiller):
    """ARD: temperature-softened KL to the teacher on PGD-CE examples, plus natural CE."""

    name: ClassVar[str] = "ard"
    default_temperature: ClassVar[float] = 30.0
    default_alpha: ClassVar[float] = 1.0
    default_start: ClassVar[str] = "uniform"
    default_bn_mode: ClassVar[str] = "train"
    kd_reduction: ClassVar[str] = "elementmean"

    def attack_phase(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits on ``x`` and ``x'`` from PGD on the student's cross-entropy."""
        teacher_logits, _ = self.teacher_outputs(x)
        return teacher_logits, self.inner_attack(x, attacks.ce_loss(y))

    def loss(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor,
             x_adv: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        loss, parts, _ = self.ard_loss(x, y, teacher_logits, x_adv)
        return loss, parts

    def ard_loss(
        self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor, x_adv: torch.Tensor
    ) -> tuple[torch.Tensor, LossParts, tuple[torch.Tensor, torch.Tensor]]:
        """ARD's objective and parts, plus ``(adv_logits, nat_logits)`` for methods built on it."""
        adv_logits = self.student(x_adv)
        nat_logits = self.student(x)
        target = F.softmax(teacher_logits / self.temperature, dim=1)
        kd_adv = distillation_kl(adv_logits, target, self.temperature, reduction=self.kd_reduction)
        ce_nat = F.cross_entropy(nat_logits, y)
        loss = self.alpha * kd_adv + (1.0 - self.alpha) * ce_nat
        parts = {
            "kd_adv": kd_adv.detach(),
            "ce_nat": ce_nat.detach(),
            "train_teacher_acc": accuracy(teacher_logits, y),
            "train_adv_acc": accuracy(adv_logits, y),
        }
        return loss, parts, (adv_logits, nat_logits)
