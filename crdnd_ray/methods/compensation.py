"""Adaptive compensation of an unreliable teacher (CRDND's first component, a reconstruction).

The CRDND abstract says only that an "adaptive compensation module" models the teacher's
instability. DESIGN.md section 1 turns that into two switchable readings, implemented here as
building blocks that :class:`crdnd_ray.methods.crdnd.CRDND` (and IAD, for its trust weights) use:

* ``confidence`` (parameter-free): per-sample trust weights :func:`confidence_weights` and the
  compensated target :func:`compensated_target`, a convex mix of the teacher's soft labels and a
  fallback distribution.
* ``transition`` (learnable): a row-stochastic class-transition matrix :class:`TransitionMatrix`
  that models the teacher as a noisy channel on the clean label distribution; the student's
  prediction pushed through the channel (``Mᵀ p_S``) is fitted to the teacher on the samples the
  teacher gets wrong (forward loss correction, as in learning with noisy labels).

Every quantity that decides *how much* to trust the teacher is computed from the frozen teacher
only, so it carries no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TransitionMatrix", "compensated_target", "confidence_weights", "fallback_distribution"]


def confidence_weights(
    teacher_probs: torch.Tensor,
    y: torch.Tensor,
    beta: float,
    teacher_probs_adv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample trust in the teacher, ``w_i = p_T(x_i)[y_i] ** β`` in ``[0, 1]``.

    Args:
        teacher_probs: The teacher's probabilities at temperature 1 on the natural inputs, ``(B, C)``.
            The distillation temperature is deliberately not used: the weight measures how much the
            teacher itself believes the true class, not how soft the transferred target is.
        y: True labels, ``(B,)``.
        beta: Sharpness ``β ≥ 0``. ``β = 0`` trusts every sample fully; small values such as IAD's 0.1
            keep weights near 1 unless the teacher's true-class probability is tiny; ``β = 1`` uses the
            probability itself.
        teacher_probs_adv: Optional teacher probabilities on the adversarial inputs. When given, the
            weight is ``min(p_T(x_i)[y_i], p_T(x'_i)[y_i]) ** β`` (the power is monotone, so this is
            the minimum of the two weights): a teacher that is right on ``x_i`` but flips under the
            student's attack counts as unstable. IAD uses the adversarial probability alone; CRDND's
            ``on_adversarial`` switch uses this minimum.

    Returns:
        Detached weights of shape ``(B,)``. A teacher that is confidently right gets ``w ≈ 1``; one
        that puts little mass on the true class gets a small weight.
    """
    index = y.view(-1, 1)
    true_prob = teacher_probs.detach().gather(1, index).squeeze(1)
    if teacher_probs_adv is not None:
        true_prob = torch.minimum(true_prob, teacher_probs_adv.detach().gather(1, index).squeeze(1))
    return true_prob.clamp(0.0, 1.0).pow(beta)


def compensated_target(
    teacher_probs: torch.Tensor, weights: torch.Tensor, fallback_probs: torch.Tensor
) -> torch.Tensor:
    """The compensated teacher target ``p̃_T = w · p_T + (1 − w) · q``, row by row.

    Args:
        teacher_probs: The teacher's soft labels at the distillation temperature, ``(B, C)``.
        weights: Trust weights ``w`` from :func:`confidence_weights`, ``(B,)``.
        fallback_probs: The distribution ``q`` that replaces the teacher where it is not trusted:
            ``F.one_hot(y, C)`` (``fallback: onehot``) or the student's own detached natural
            prediction at the same temperature (``fallback: student``, a self-distillation fallback
            in the spirit of IAD's ``KL(S(x) ‖ S(x'))`` term).

    Returns:
        A detached ``(B, C)`` tensor whose rows are probability distributions (a convex mixture of
        two distributions). With ``w = 1`` it is exactly ``teacher_probs``.
    """
    w = weights.detach().unsqueeze(1)
    return (w * teacher_probs + (1.0 - w) * fallback_probs.to(teacher_probs.dtype)).detach()


def fallback_distribution(
    kind: str, y: torch.Tensor, num_classes: int, student_probs: torch.Tensor | None = None
) -> torch.Tensor:
    """The fallback ``q`` of :func:`compensated_target` for ``compensation.fallback`` = ``kind``.

    ``"onehot"`` is the label itself; ``"student"`` is ``student_probs`` detached (the caller passes
    the student's natural prediction at the distillation temperature).
    """
    if kind == "onehot":
        return F.one_hot(y, num_classes).float()
    if kind == "student":
        if student_probs is None:
            raise ValueError("The 'student' fallback needs the student's natural probabilities.")
        return student_probs.detach()
    raise ValueError(f"Unknown compensation fallback {kind!r}; use 'onehot' or 'student'.")


class TransitionMatrix(nn.Module):
    """A learnable ``C × C`` row-stochastic noise channel ``M = softmax_rows(W)``.

    Reading of the abstract's learnable compensation: the teacher's soft label is modelled as a
    noisy view of the clean class distribution, ``p_T ≈ Mᵀ p_clean`` with ``M[i, j]`` the
    probability that the teacher reports class ``j`` when the truth is ``i``. The student is the
    estimate of ``p_clean``; on the samples the teacher gets wrong, CRDND fits ``Mᵀ p_S`` (the
    student's *noisy-label view*) to the teacher instead of ``p_S`` itself, so the student does not
    have to copy the teacher's mistake (forward loss correction). Both the student and ``W`` receive
    gradients from that term.

    ``W`` starts at ``init_scale · I`` (5 by default, so each row puts about
    ``e⁵ / (e⁵ + C − 1)`` of its mass on the diagonal: 0.94 for 10 classes, 0.60 for 100), and
    :meth:`penalty` ``‖M − I‖_F`` keeps it close to the identity, which removes the trivial
    solution where ``M`` alone explains the teacher. The softmax parameterisation keeps ``M``
    row-stochastic after any optimiser step. The module is used only for training; the student is
    evaluated on its own.
    """

    def __init__(self, num_classes: int, init_scale: float = 5.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.logits = nn.Parameter(init_scale * torch.eye(num_classes))

    def matrix(self) -> torch.Tensor:
        """``M = softmax_rows(W)``, shape ``(C, C)``, each row a distribution."""
        return F.softmax(self.logits, dim=1)

    def forward(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of ``Mᵀ p`` from the log-probabilities of ``p``, rows = samples.

        ``(Mᵀ p)_j = Σ_i p_i M_ij``, computed as ``logsumexp_i(log p_i + log M_ij)`` so that small
        probabilities neither underflow nor produce ``log 0``.
        """
        log_matrix = F.log_softmax(self.logits, dim=1)
        return torch.logsumexp(log_probs.unsqueeze(2) + log_matrix.unsqueeze(0), dim=1)

    def penalty(self) -> torch.Tensor:
        """The Frobenius distance ``‖M − I‖_F`` (not squared)."""
        identity = torch.eye(self.num_classes, device=self.logits.device, dtype=self.logits.dtype)
        return torch.linalg.matrix_norm(self.matrix() - identity)

    def diagonal_mass(self) -> torch.Tensor:
        """Mean diagonal entry of ``M`` (1 for the identity), a detached monitoring scalar."""
        return self.matrix().detach().diagonal().mean()
