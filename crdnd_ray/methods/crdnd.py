"""CRDND: contrastive relationship denoise distillation, as reconstructed in DESIGN.md section 1.

Only the abstract of the paper (Wang et al., ICASSP 2023, arXiv 2302.08764) is public, so this is a
documented reconstruction on the RSLAD backbone in which every reading of the abstract is a switch:

* **Inner attack** (shared with RSLAD): ``x'`` maximises ``KL(p_T(x) ‖ p_S(x'))`` at temperature 1,
  teacher on the natural input, ``start: gaussian`` (``x + 0.001·N(0, 1)``), ``bn_mode: eval``.
* **Distillation**: ``L_kd = α · KL(p̃_T ‖ p_S^τ(x')) + (1 − α) · KL(p̃_T ‖ p_S^τ(x))`` with
  ``α = 5/6``, batch-mean KL multiplied by ``τ²`` (so the gradient scale does not shrink as the
  searched temperature grows; at ``τ = 1`` the factor is 1), and ``p̃_T`` the compensated target.
* **Compensation** (``method.compensation.kind``), see :mod:`crdnd_ray.methods.compensation`:

  - ``none``: ``p̃_T = p_T^τ(x)``.
  - ``confidence``: ``p̃_T = w · p_T^τ(x) + (1 − w) · q`` with ``w = p_T(x)[y]^β`` (temperature 1;
    with ``on_adversarial`` the minimum with ``p_T(x')[y]^β``) and ``q`` the one-hot label or the
    student's detached ``p_S^τ(x)`` (``fallback``).
  - ``transition``: each KL term becomes ``w · KL(p_T^τ ‖ p_S^τ) + (1 − w) · KL(p_T^τ ‖ Mᵀ p_S^τ)``
    per sample (forward correction on the samples the teacher gets wrong) plus
    ``penalty · ‖M − I‖_F``; ``M`` is an extra module in its own optimiser group without weight
    decay (and with ``compensation.lr`` when set), unused at test time.

* **Contrast** (``method.contrastive``), see :mod:`crdnd_ray.methods.contrastive`: ``infonce`` or
  ``relation`` on projected penultimate features, anchor ``z_S(x')``, teacher side ``z_T(x)``,
  negatives from the global batch, weighted by the same ``w`` when ``denoise`` is on. When
  compensation is ``none`` but denoising is on, ``w`` is still computed with
  ``compensation.beta`` and ``compensation.on_adversarial``.
* **Total**: ``L = RSLAD_LOSS_SCALE · (L_kd + λ_c · L_contrast + λ_M · ‖M − I‖_F)``. The common factor
  ``RSLAD_LOSS_SCALE = 0.1`` is RSLAD's effective scale (see :mod:`crdnd_ray.methods.rslad`); applying
  it to the whole objective keeps DESIGN.md's relative weights (``λ_c`` against a batch-mean KL) and
  makes CRDND with compensation ``none`` and contrast ``none`` *equal* to RSLAD on the same batch
  and the same adversarial examples. ``parts`` report every term unscaled.

Only modules used on every step are created: no projection heads when the contrast kind is ``none``
or its weight is 0, no transition matrix unless ``kind: transition`` (DDP with
``find_unused_parameters=False`` would fail on a parameter without a gradient).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from crdnd_ray.config import AttackConfig, MethodConfig
from crdnd_ray.methods.base import Distiller, LossParts, accuracy, kl_divergence
from crdnd_ray.methods.compensation import (
    TransitionMatrix,
    compensated_target,
    confidence_weights,
    fallback_distribution,
)
from crdnd_ray.methods.contrastive import ContrastiveRelation
from crdnd_ray.methods.rslad import RSLAD_LOSS_SCALE, rslad_attack_target, rslad_terms

__all__ = ["CRDND"]


def _feature_dim(model: nn.Module, role: str) -> int:
    dim = getattr(model, "feature_dim", None)
    if dim is None:
        raise ValueError(
            f"The contrastive loss needs the {role}'s penultimate feature width, but the {role} model "
            f"({type(model).__name__}) has no 'feature_dim' attribute. Use a model from crdnd_ray.models, "
            "or set method.contrastive.kind: none."
        )
    return int(dim)


class CRDND(Distiller):
    """RSLAD backbone + adaptive compensation + contrastive relationship loss (see the module docstring)."""

    name: ClassVar[str] = "crdnd"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        method: MethodConfig,
        attack: AttackConfig,
        num_classes: int,
    ) -> None:
        super().__init__(student, teacher, method, attack, num_classes)
        self.compensation = method.compensation
        self.contrastive = method.contrastive
        if self.compensation.kind == "transition":
            self.extras["transition"] = TransitionMatrix(num_classes)
        if self.uses_contrast:
            self.extras["contrast"] = ContrastiveRelation.from_config(
                self.contrastive, _feature_dim(student, "student"), _feature_dim(self.teacher, "teacher")
            )

    @property
    def uses_contrast(self) -> bool:
        """Whether the contrastive term is part of the loss (kind not ``none`` and weight > 0)."""
        return self.contrastive.kind != "none" and self.contrastive.weight > 0

    @property
    def uses_weights(self) -> bool:
        """Whether the teacher-trust weights ``w`` are needed (compensation, or denoised contrast)."""
        return self.compensation.kind != "none" or (self.uses_contrast and self.contrastive.denoise)

    def extra_parameter_groups(self, weight_decay: float) -> list[dict]:
        """As the base, but the transition matrix gets no weight decay and ``compensation.lr`` if set.

        Weight decay would pull ``W`` towards 0, i.e. ``M`` towards the uniform matrix, fighting the
        near-identity initialisation; the ``‖M − I‖`` penalty is the intended regulariser.
        """
        groups = super().extra_parameter_groups(weight_decay)
        for group in groups:
            if group["name"] == "transition":
                group["weight_decay"] = 0.0
                if self.compensation.lr is not None:
                    group["lr"] = self.compensation.lr
        return groups

    def attack_phase(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RSLAD's attack: the teacher's logits and features on ``x`` and ``x'`` (:func:`rslad_attack_target`)."""
        return rslad_attack_target(self, x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor, teacher_features: torch.Tensor,
             x_adv: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        if self.uses_contrast:
            adv_logits, adv_features = self.student(x_adv, return_features=True)
        else:
            adv_logits = self.student(x_adv)
        nat_logits = self.student(x)
        tau = self.temperature
        soft_teacher = F.softmax(teacher_logits / tau, dim=1)
        parts: LossParts = {"train_teacher_acc": accuracy(teacher_logits, y), "train_adv_acc": accuracy(adv_logits, y)}

        weights = self._trust_weights(teacher_logits, x_adv, y, parts) if self.uses_weights else None
        target = soft_teacher
        if self.compensation.kind == "confidence":
            fallback = fallback_distribution(
                self.compensation.fallback, y, self.num_classes, F.softmax(nat_logits.detach() / tau, dim=1)
            )
            target = compensated_target(soft_teacher, weights, fallback)
        kd_adv, kd_nat = rslad_terms(adv_logits, nat_logits, target, tau)
        penalty = None
        if self.compensation.kind == "transition":
            kd_adv, kd_nat, penalty = self._transition_terms(
                adv_logits, nat_logits, soft_teacher, weights, kd_adv, kd_nat, parts
            )

        kd_adv, kd_nat = kd_adv.mean(), kd_nat.mean()
        objective = self.alpha * kd_adv + (1.0 - self.alpha) * kd_nat
        parts["kd_adv"] = kd_adv.detach()
        parts["kd_nat"] = kd_nat.detach()
        if penalty is not None:
            objective = objective + self.compensation.penalty * penalty
        if self.uses_contrast:
            contrast = self.extras["contrast"](
                adv_features, teacher_features, weights if self.contrastive.denoise else None
            )
            objective = objective + self.contrastive.weight * contrast
            parts["contrast"] = contrast.detach()
        return RSLAD_LOSS_SCALE * objective, parts

    def _trust_weights(
        self, teacher_logits: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, parts: LossParts
    ) -> torch.Tensor:
        adv_probs = None
        if self.compensation.on_adversarial:
            teacher_adv_logits, _ = self.teacher_outputs(x_adv)
            adv_probs = F.softmax(teacher_adv_logits, dim=1)
            parts["train_teacher_adv_acc"] = accuracy(teacher_adv_logits, y)
        weights = confidence_weights(F.softmax(teacher_logits, dim=1), y, self.compensation.beta, adv_probs)
        parts["weight_mean"] = weights.mean()
        parts["weight_min"] = weights.min()
        return weights

    def _transition_terms(
        self,
        adv_logits: torch.Tensor,
        nat_logits: torch.Tensor,
        soft_teacher: torch.Tensor,
        weights: torch.Tensor,
        kd_adv: torch.Tensor,
        kd_nat: torch.Tensor,
        parts: LossParts,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate each per-sample KL between the direct and the noise-channel (``Mᵀ p_S``) fit.

        Returns the gated per-sample adversarial and natural terms and ``‖M − I‖_F``.
        """
        transition: TransitionMatrix = self.extras["transition"]
        tau = self.temperature

        def through_channel(logits: torch.Tensor) -> torch.Tensor:
            noisy_log_probs = transition(F.log_softmax(logits / tau, dim=1))
            return tau**2 * kl_divergence(soft_teacher, noisy_log_probs, reduction="none")

        noisy_adv, noisy_nat = through_channel(adv_logits), through_channel(nat_logits)
        distrust = 1.0 - weights
        fit = (distrust * (self.alpha * noisy_adv + (1.0 - self.alpha) * noisy_nat)).mean()
        penalty = transition.penalty()
        parts["transition_fit"] = fit.detach()
        parts["transition_penalty"] = penalty.detach()
        parts["transition_diag"] = transition.diagonal_mass()
        gated_adv = weights * kd_adv + distrust * noisy_adv
        gated_nat = weights * kd_nat + distrust * noisy_nat
        return gated_adv, gated_nat, penalty
