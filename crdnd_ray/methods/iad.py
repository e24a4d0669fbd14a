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

from crdnd_ray.methods.ard import ARD
from crdnd_ray.methods.base import LossParts, accuracy, distillation_kl
from crdnd_ray.methods.compensation import confidence_weights

__all__ = ["IAD"]


class IAD(ARD):
    """IAD-I: ARD plus trust-weighted introspection ``KL(S(x) ‖ S(x'))`` after a warm-up."""

    name: ClassVar[str] = "iad"
    default_temperature: ClassVar[float] = 1.0
    kd_reduction: ClassVar[str] = "batchmean"

    def loss(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor,
             x_adv: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        loss, parts, (adv_logits, nat_logits) = self.ard_loss(x, y, teacher_logits, x_adv)
        if self.epoch >= self.method.iad.begin:
            teacher_adv_logits, _ = self.teacher_outputs(x_adv)
            weights = confidence_weights(F.softmax(teacher_adv_logits, dim=1), y, self.method.iad.beta)
            introspection = (
                (1.0 - weights) * distillation_kl(adv_logits, F.softmax(nat_logits, dim=1), reduction="none")
            ).mean()
            loss = loss + self.alpha * introspection
            parts["introspection"] = introspection.detach()
            parts["weight_mean"] = weights.mean()
            parts["train_teacher_adv_acc"] = accuracy(teacher_adv_logits, y)
        return loss, parts
