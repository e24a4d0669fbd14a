"""SAT / PGD-AT (Madry et al., ICLR 2018): adversarial training without a teacher.

* Inner attack: PGD-K on ``CE(S(x'), y)`` from a uniform random start in the ε-ball
  (``start: uniform``). The student's BatchNorm runs in eval mode during the attack
  (``bn_mode: eval``), as in the common PyTorch PGD-AT code (e.g. AdaAD's ``Madry_PGD``,
  ``BN_eval=True``).
* Loss: ``CE(S(x'), y)`` averaged over the batch; no natural term.

Used to train teachers (``crdnd-ray teacher``) and as the no-distillation baseline.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from crdnd_ray import attacks
from crdnd_ray.methods.base import Distiller, LossParts, accuracy

__all__ = ["SAT"]


class SAT(Distiller):
    """Madry PGD adversarial training: minimise the cross-entropy on PGD examples."""

    name: ClassVar[str] = "sat"
    needs_teacher: ClassVar[bool] = False
    default_start: ClassVar[str] = "uniform"
    default_bn_mode: ClassVar[str] = "eval"

    def attack_phase(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
        """``x'`` from PGD on the student's cross-entropy."""
        return (self.inner_attack(x, attacks.ce_loss(y)),)

    def loss(self, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        adv_logits = self.student(x_adv)
        ce_adv = F.cross_entropy(adv_logits, y)
        return ce_adv, {"ce_adv": ce_adv.detach(), "train_adv_acc": accuracy(adv_logits, y)}
