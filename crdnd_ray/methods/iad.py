"""IAD-I: Introspective Adversarial Distillation (Zhu et al., ICLR 2022), the ARD-based variant.

Reference code: ZFancy/IAD, ``IAD-I.py``.

* Inner attack: as ARD, PGD-K on ``CE(S(x'), y)``, uniform start, student in train mode
  (``start: uniform``, ``bn_mode: train``).
* Before epoch ``method.iad.begin`` (0-based, set through ``set_epoch``):
  ``L = α · τ² · KL_bm(T^τ(x) ‖ S^τ(x')) + (1 − α) · CE(S(x), y)``.
* From epoch ``begin`` on, with the trust weight ``w_i = p_T(x'_i)[y_i]^β`` (teacher on the
  *adversarial* input, temperature 1, no gradient):
  ``L = α · τ² · KL_bm(T^τ(x) ‖ S^τ(x')) + α · mean_i (1 − w_i) · KL(S(x_i) ‖ S(x'_i))
  + (1 − α) · CE(S(x), y)``.
  The introspection target ``S(x)`` is not detached, as in the reference.
* ``KL_bm``: summed over classes and divided by the batch size (the reference's
  ``(1/len(outputs)) · sum(KLDivLoss(reduce=False)(...).sum(dim=1))``), unlike ARD's element mean.
* Defaults ``τ = 1``, ``α = 1``, ``β = method.iad.beta`` (0.1). The reference calls ``S(x)`` twice
  in train mode (once for the CE, once for the introspection term); here it is called once and
  reused, which differs only in one extra BatchNorm running-statistics update per step.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from crdnd_ray import attacks
from crdnd_ray.methods.base import Distiller, LossParts, accuracy, distillation_kl
from crdnd_ray.methods.compensation import confidence_weights

__all__ = ["IAD"]


class IAD(Distiller):
    """IAD-I: ARD plus trust-weighted introspection ``KL(S(x) ‖ S(x'))`` after a warm-up."""

    name: ClassVar[str] = "iad"
    default_temperature: ClassVar[float] = 1.0
    default_alpha: ClassVar[float] = 1.0
    default_start: ClassVar[str] = "uniform"
    default_bn_mode: ClassVar[str] = "train"

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        teacher_logits, _ = self.teacher_outputs(x)
        x_adv = self.inner_attack(x, attacks.ce_loss(y))
        adv_logits = self.student(x_adv)
        nat_logits = self.student(x)
        target = F.softmax(teacher_logits / self.temperature, dim=1)
        kd_adv = distillation_kl(adv_logits, target, self.temperature, reduction="batchmean")
        ce_nat = F.cross_entropy(nat_logits, y)
        loss = self.alpha * kd_adv + (1.0 - self.alpha) * ce_nat
        parts = {
            "kd_adv": kd_adv.detach(),
            "ce_nat": ce_nat.detach(),
            "teacher_acc": accuracy(teacher_logits, y),
            "adv_acc": accuracy(adv_logits, y),
        }
        if self.epoch >= self.method.iad.begin:
            teacher_adv_logits, _ = self.teacher_outputs(x_adv)
            weights = confidence_weights(F.softmax(teacher_adv_logits, dim=1), y, self.method.iad.beta)
            introspection = (
                (1.0 - weights) * distillation_kl(adv_logits, F.softmax(nat_logits, dim=1), reduction="none")
            ).mean()
            loss = loss + self.alpha * introspection
            parts["introspection"] = introspection.detach()
            parts["weight_mean"] = weights.mean()
            parts["teacher_adv_acc"] = accuracy(teacher_adv_logits, y)
        return loss, parts
