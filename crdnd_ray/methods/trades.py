"""TRADES (Zhang et al., ICML 2019): a natural loss plus a boundary (smoothness) term, no teacher.

Reference code: yaodongyu/TRADES, ``trades.py``.

* Inner attack: start ``x + 0.001·N(0, 1)``, PGD-K maximising ``Σ_i KL(p_S(x_i) ‖ p_S(x'_i))`` with
  the student in eval mode (``start: gaussian``, ``bn_mode: eval``). The target ``p_S(x)`` is
  computed once, in the same BatchNorm mode as the attack, and held fixed (the reference recomputes
  it every step, with the same value and no gradient with respect to ``x'``).
* Loss: ``CE(S(x), y) + β · KL(p_S(x) ‖ p_S(x'))`` with the KL summed over classes and divided by
  the batch size (``criterion_kl(size_average=False) / batch_size``), ``β = method.trades.beta``
  (6 by default). As in the reference, the natural distribution inside the KL is *not* detached.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from crdnd_ray import attacks
from crdnd_ray.methods.base import Distiller, LossParts, accuracy, distillation_kl

__all__ = ["TRADES"]


class TRADES(Distiller):
    """TRADES: ``CE(S(x), y) + β · KL(S(x) ‖ S(x'))``."""

    name: ClassVar[str] = "trades"
    needs_teacher: ClassVar[bool] = False
    default_start: ClassVar[str] = "gaussian"
    default_bn_mode: ClassVar[str] = "eval"

    def _attack_target(self, x: torch.Tensor) -> torch.Tensor:
        """``p_S(x)`` without gradient, with BatchNorm in the attack's mode."""
        was_training = self.student.training
        if self.attack_bn_mode == "eval":
            self.student.eval()
        with torch.no_grad():
            probs = F.softmax(self.student(x), dim=1)
        self.student.train(was_training)
        return probs

    def attack_phase(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
        """``x'`` maximising ``KL(p_S(x) ‖ p_S(x'))``, with ``p_S(x)`` from :meth:`_attack_target`."""
        return (self.inner_attack(x, attacks.kl_loss(self._attack_target(x))),)

    def loss(self, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        nat_logits = self.student(x)
        adv_logits = self.student(x_adv)
        ce_nat = F.cross_entropy(nat_logits, y)
        robust = distillation_kl(adv_logits, F.softmax(nat_logits, dim=1), reduction="batchmean")
        loss = ce_nat + self.method.trades.beta * robust
        parts = {
            "ce_nat": ce_nat.detach(),
            "kl_robust": robust.detach(),
            "train_nat_acc": accuracy(nat_logits, y),
            "train_adv_acc": accuracy(adv_logits, y),
        }
        return loss, parts
