"""Contrastive relationship losses among the examples of the global batch (CRDND's second component).

The CRDND abstract says robustness knowledge is transferred "among several examples" rather than by
one-to-one imitation. DESIGN.md section 1 reads that as a contrastive term on penultimate features,
with two switchable forms (``contrastive.kind``):

* ``infonce``: CRD-style InfoNCE with in-batch negatives. The anchor is the student's embedding of
  the adversarial example ``z_S(x'_i)``, the positive the teacher's embedding of the natural example
  ``z_T(x_i)``, the negatives the teacher embeddings of the other examples. ``symmetric`` adds the
  teacher-anchored direction (anchor ``z_T(x_i)``, positive ``z_S(x'_i)``, negatives the other
  student embeddings) and averages the two directions.
* ``relation``: relational distillation. Row ``i`` of ``softmax(Z_S(x') Z_T(x)ᵀ / τ_c)`` (how the
  student's adversarial view of example ``i`` relates to every teacher embedding) is matched by KL to
  row ``i`` of ``softmax(Z_T(x) Z_T(x)ᵀ / τ_c)`` (how the teacher relates the examples). The
  teacher-side target is detached: with it attached, the trainable teacher head could zero the loss
  by collapsing every embedding onto one point. Detached, the loss is a soft-label InfoNCE whose
  labels are the teacher's similarity structure.

Embeddings are ``g(f) = normalize(Linear(f))`` (CRD's ``Embed``: no hidden layer, width
``contrastive.dim``), one head for the student and one for the teacher; the teacher head is trained
(the teacher's features are not).

**Denoising.** Each anchor ``i`` carries a weight ``w_i`` (the teacher-trust weight of
:mod:`crdnd_ray.methods.compensation`), and the loss is the weighted mean
``Σ_i w_i ℓ_i / Σ_i w_i`` over the *global* batch, so pairs whose teacher is wrong count less.

**Global batch under DDP.** When ``torch.distributed`` is initialised with more than one rank, keys
and negatives come from every rank through :func:`torch.distributed.nn.functional.all_gather`, which
keeps the gradient (its backward sums the gradients of each gathered block back onto the rank that
owns it). The positive of local anchor ``i`` on rank ``r`` is global index ``r·B + i``, so every rank
must hold the same local batch size ``B`` (DistributedSampler guarantees it). Rank ``r`` returns
``N · Σ_{i local} w_i ℓ_i / Σ_{all} w_i``: the mean of these values over the ``N`` ranks is the
full-batch loss, and because DDP averages gradients over ranks, ``N`` workers with batch ``B``
produce exactly the gradient of one worker with batch ``N·B``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from crdnd_ray.config import ContrastiveConfig
from crdnd_ray.methods.base import kl_divergence

__all__ = [
    "ContrastiveRelation",
    "ProjectionHead",
    "gather_with_grad",
    "infonce_loss",
    "relation_loss",
    "weighted_global_mean",
    "world",
]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` outside distributed runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the autograd graph.

    With one rank it returns ``tensor`` itself. Every rank must pass the same shape.
    """
    _, size = world()
    if size == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def _gather_detached(tensor: torch.Tensor) -> torch.Tensor:
    _, size = world()
    if size == 1:
        return tensor.detach()
    chunks = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(chunks, tensor.detach().contiguous())
    return torch.cat(chunks, dim=0)


def weighted_global_mean(per_anchor: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of ``Σ_i w_i ℓ_i / Σ_i w_i`` over the global batch (see the module docstring).

    ``weights`` are treated as constants (detached); ``None`` means all ones. The result is
    ``world_size · Σ_{local} w_i ℓ_i / Σ_{global} w_i``, which is the plain weighted mean with one
    rank. If every weight is zero the loss is zero.
    """
    _, size = world()
    if weights is None:
        weights = torch.ones_like(per_anchor)
    weights = weights.detach().to(per_anchor.dtype)
    total = _gather_detached(weights).sum().clamp_min(torch.finfo(per_anchor.dtype).tiny)
    return size * (weights * per_anchor).sum() / total


def _positive_index(batch: int, device: torch.device) -> torch.Tensor:
    rank, _ = world()
    return rank * batch + torch.arange(batch, device=device)


def infonce_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    temperature: float,
    symmetric: bool = True,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE between L2-normalised rows: ``anchors[i]`` must pick ``positives[i]`` among all positives.

    Args:
        anchors: Local student embeddings ``z_S(x')``, ``(B, d)``, unit rows.
        positives: Local teacher embeddings ``z_T(x)``, ``(B, d)``, unit rows.
        temperature: ``τ_c``; logits are cosine similarities divided by it.
        symmetric: Also score the teacher-anchored direction (anchor ``positives[i]``, candidates all
            anchors of the global batch) and average the two per-pair losses.
        weights: Optional per-pair weights ``(B,)`` (denoising).

    Returns:
        This rank's share of the weighted mean over the global batch (the weighted mean itself with
        one process).
    """
    keys = gather_with_grad(positives)
    target = _positive_index(anchors.shape[0], anchors.device)
    per_pair = F.cross_entropy(anchors @ keys.t() / temperature, target, reduction="none")
    if symmetric:
        reverse_keys = gather_with_grad(anchors)
        reverse = F.cross_entropy(positives @ reverse_keys.t() / temperature, target, reduction="none")
        per_pair = 0.5 * (per_pair + reverse)
    return weighted_global_mean(per_pair, weights)


def relation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL between the teacher's and the student's row-softmaxed similarity to the global teacher set.

    Row ``i``: ``KL(softmax(z_T(x_i) Z_Tᵀ / τ_c) ‖ softmax(z_S(x'_i) Z_Tᵀ / τ_c))`` with ``Z_T`` the
    teacher embeddings of the global batch. The target row is detached. The loss is zero exactly when
    the student's similarity rows equal the teacher's (e.g. ``student == teacher``).
    """
    keys = gather_with_grad(teacher)
    log_student = F.log_softmax(student @ keys.t() / temperature, dim=1)
    target = F.softmax(teacher @ keys.t() / temperature, dim=1).detach()
    return weighted_global_mean(kl_divergence(target, log_student, reduction="none"), weights)


class ProjectionHead(nn.Module):
    """``normalize(Linear(in_dim → dim)(f))``: CRD's embedding, unit-norm rows."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(features), dim=1)


class ContrastiveRelation(nn.Module):
    """The student and teacher projection heads and the chosen contrastive loss.

    ``forward(student_features, teacher_features, weights)`` takes the student's penultimate features
    on ``x'`` and the teacher's on ``x`` (``(B, feature_dim)`` each) and returns the loss.
    ``symmetric`` applies to ``infonce`` only; the relation loss is anchored on the student.
    Create it only when the loss is used on every step (a head that gets no gradient breaks DDP with
    ``find_unused_parameters=False``).
    """

    def __init__(
        self,
        kind: Literal["infonce", "relation"],
        student_dim: int,
        teacher_dim: int,
        dim: int = 128,
        temperature: float = 0.1,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        if kind not in ("infonce", "relation"):
            raise ValueError(f"Unknown contrastive kind {kind!r}; use 'infonce' or 'relation'.")
        self.kind = kind
        self.temperature = temperature
        self.symmetric = symmetric
        self.student_head = ProjectionHead(student_dim, dim)
        self.teacher_head = ProjectionHead(teacher_dim, dim)

    @classmethod
    def from_config(cls, config: ContrastiveConfig, student_dim: int, teacher_dim: int) -> ContrastiveRelation:
        """Build from ``method.contrastive`` (its ``kind`` must not be ``none``)."""
        return cls(
            config.kind,
            student_dim,
            teacher_dim,
            dim=config.dim,
            temperature=config.temperature,
            symmetric=config.symmetric,
        )

    def forward(
        self,
        student_features: torch.Tensor,
        teacher_features: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        z_student = self.student_head(student_features)
        z_teacher = self.teacher_head(teacher_features.detach())
        if self.kind == "infonce":
            return infonce_loss(z_student, z_teacher, self.temperature, self.symmetric, weights)
        return relation_loss(z_student, z_teacher, self.temperature, weights)
