"""RSLAD: Robust Soft Label Adversarial Distillation (Zi et al., ICCV 2021), the CRDND backbone.

Reference code: zibojia/RSLAD, ``rslad_loss.py`` and ``resnet18_rslad_cifar{10,100}.py``.

* Inner attack: start ``x + 0.001·N(0, 1)``, ``K`` sign steps maximising
  ``Σ_i KL(p_T(x_i) ‖ p_S(x'_i))`` with the teacher on the *natural* input and the student in eval
  mode (``start: gaussian``, ``bn_mode: eval``).
* Loss: ``5/6 · KL(p_T(x) ‖ p_S(x')) + 1/6 · KL(p_T(x) ‖ p_S(x))``, no cross-entropy, ``τ = 1``.

Reduction. The reference KL is hand-written, ``−a·b + b·log(b + 1e-5)``, and averaged over all
``B·C`` elements; the CIFAR-100 script multiplies it by 10 "to keep consistent with CIFAR-10". Either
way the optimised quantity is the per-sample KL divided by 10, so here the loss is
``RSLAD_LOSS_SCALE · (α · KL_batchmean(adv) + (1 − α) · KL_batchmean(nat))`` with
``RSLAD_LOSS_SCALE = 0.1`` for every number of classes. The exact KL replaces the ``+1e-5``
smoothing: the gradient with respect to the student is identical and the value differs by
``O(1e-5 · C)``. The 1/10 matters beyond the logged value: with SGD and weight decay it acts like
a 10× smaller learning rate with 10× stronger relative weight decay, which is what the published
schedule was tuned with.

A non-default ``method.temperature`` softens both sides and multiplies by ``τ²`` (Hinton); the
default ``τ = 1`` is RSLAD exactly. The helpers :func:`rslad_attack_target` and
:func:`rslad_terms` are shared with CRDND, which reduces to this method when compensation and
contrast are off.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from crdnd_ray import attacks
from crdnd_ray.methods.base import Distiller, LossParts, accuracy, distillation_kl

__all__ = ["RSLAD", "RSLAD_LOSS_SCALE", "rslad_attack_target", "rslad_terms"]

RSLAD_LOSS_SCALE = 0.1
"""RSLAD's effective loss scale: element-mean KL over 10 classes (or ×10 over 100) = batch-mean KL / 10."""


def rslad_attack_target(distiller: Distiller, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's natural outputs and RSLAD's adversarial example.

    Returns ``(teacher_logits, teacher_features, x_adv)`` where ``x_adv`` maximises
    ``KL(p_T(x) ‖ p_S(x'))`` at temperature 1 (as in ``rslad_inner_loss``), with the distiller's
    attack settings.
    """
    teacher_logits, teacher_features = distiller.teacher_outputs(x)
    x_adv = distiller.inner_attack(x, attacks.kl_loss(F.softmax(teacher_logits, dim=1)))
    return teacher_logits, teacher_features, x_adv


def rslad_terms(
    adv_logits: torch.Tensor, nat_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``τ² · KL(target ‖ p_S^τ(x'))`` and ``τ² · KL(target ‖ p_S^τ(x))``, each ``(B,)``."""
    adv = distillation_kl(adv_logits, target_probs, temperature, reduction="none")
    nat = distillation_kl(nat_logits, target_probs, temperature, reduction="none")
    return adv, nat


class RSLAD(Distiller):
    """RSLAD with the reference code's attack, weights (α = 5/6) and loss scale."""

    name: ClassVar[str] = "rslad"
    default_temperature: ClassVar[float] = 1.0
    default_alpha: ClassVar[float] = 5.0 / 6.0
    default_start: ClassVar[str] = "gaussian"
    default_bn_mode: ClassVar[str] = "eval"

    def attack_phase(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's logits and features on ``x`` and ``x'`` (:func:`rslad_attack_target`)."""
        return rslad_attack_target(self, x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor, teacher_features: torch.Tensor,
             x_adv: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        adv_logits = self.student(x_adv)
        nat_logits = self.student(x)
        target = F.softmax(teacher_logits / self.temperature, dim=1)
        kd_adv, kd_nat = (term.mean() for term in rslad_terms(adv_logits, nat_logits, target, self.temperature))
        loss = RSLAD_LOSS_SCALE * (self.alpha * kd_adv + (1.0 - self.alpha) * kd_nat)
        parts = {
            "kd_adv": kd_adv.detach(),
            "kd_nat": kd_nat.detach(),
            "train_teacher_acc": accuracy(teacher_logits, y),
            "train_adv_acc": accuracy(adv_logits, y),
        }
        return loss, parts
