"""The Distiller interface shared by CRDND and every baseline."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from crdnd_ray import attacks
from crdnd_ray.config import AttackConfig, MethodConfig
from crdnd_ray.graphs import AttackRunner, EagerRunner

__all__ = ["Distiller", "LossParts", "Reduction", "accuracy", "distillation_kl", "kl_divergence"]

LossParts = dict[str, torch.Tensor]
Reduction = Literal["none", "batchmean", "elementmean"]


class Distiller(nn.Module):
    """A training objective: holds the student, the frozen teacher and any extra trainable modules.

    ``forward(x, y)`` runs the method's inner attack (:meth:`attack_phase`) through ``attack_runner``
    and returns ``loss(x, y, *attack outputs)``: ``(loss, parts)``, where ``parts`` maps each loss
    component's name to a detached scalar. Wrapping the whole distiller in DistributedDataParallel
    therefore synchronises the student and the extra modules together. The teacher never trains: its
    parameters do not require gradients and ``train()`` keeps it in eval mode.

    ``attack_runner`` is an :class:`~crdnd_ray.graphs.EagerRunner` unless the loop sets a
    :class:`~crdnd_ray.graphs.GraphRunner`, which replays the attack phase as a CUDA graph: the same
    function, called or replayed.

    Subclasses set ``name`` and the published defaults, put extra trainable modules in ``self.extras``
    and implement ``attack_phase`` (when they attack) and ``loss``.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    default_temperature: ClassVar[float] = 1.0
    default_alpha: ClassVar[float] = 5.0 / 6.0
    default_start: ClassVar[str] = "gaussian"
    default_bn_mode: ClassVar[str] = "eval"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        method: MethodConfig,
        attack: AttackConfig,
        num_classes: int,
    ) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ValueError(f"The method '{self.name}' distils from a teacher, but no teacher was given.")
        self.student = student
        self.teacher = teacher if self.needs_teacher else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        self.extras = nn.ModuleDict()
        self.method = method
        self.attack = attack
        self.num_classes = num_classes
        self.temperature = method.temperature if method.temperature is not None else self.default_temperature
        self.alpha = method.alpha if method.alpha is not None else self.default_alpha
        self.attack_start = attack.start or self.default_start
        self.attack_bn_mode = attack.bn_mode or self.default_bn_mode
        self.epoch = 0
        self.attack_runner: AttackRunner = EagerRunner()

    def train(self, mode: bool = True) -> Distiller:
        """Set the student and extras to ``mode``; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def set_epoch(self, epoch: int) -> None:
        """Tell the method which epoch (0-based) is being trained, for epoch-dependent losses."""
        self.epoch = epoch

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Optimiser groups: the student with weight decay, then each extra module as its own group."""
        groups = [{"name": "student", "params": list(self.student.parameters()), "weight_decay": weight_decay}]
        groups.extend(self.extra_parameter_groups(weight_decay))
        return [group for group in groups if group["params"]]

    def extra_parameter_groups(self, weight_decay: float) -> list[dict]:
        """Groups for ``self.extras``; override to change weight decay or learning rate per module."""
        return [
            {"name": name, "params": list(module.parameters()), "weight_decay": weight_decay}
            for name, module in self.extras.items()
        ]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        """Compute the training loss on a batch: the attack phase through ``attack_runner``, then the loss."""
        return self.loss(x, y, *self.attack_runner(self.attack_phase, x, y, tag=self.training))

    def attack_phase(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The inner attack: the tensors ``loss`` needs that come from the batch without gradient.

        Typically the teacher's outputs on ``x`` (:meth:`teacher_outputs`) and the adversarial ``x'``
        (:meth:`inner_attack`), in the order ``loss`` takes them. It reads nothing but ``x``, ``y`` and the
        modules' parameters and buffers, and does not synchronise with the host, so that a
        :class:`~crdnd_ray.graphs.GraphRunner` can capture it. Methods without an attack return ``()``.
        """
        return ()

    def loss(self, x: torch.Tensor, y: torch.Tensor, *attacked: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        """The training loss and its parts, given the batch and the outputs of :meth:`attack_phase`."""
        raise NotImplementedError

    @property
    def attack_passes_per_example(self) -> int:
        """Forward-and-backward passes through the student that the inner attack spends per training example
        (its PGD steps; none for a method without an attack). The loop counts them for compute accounting."""
        return 0 if type(self).attack_phase is Distiller.attack_phase else self.attack.steps

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits and penultimate features on ``x`` (no gradients)."""
        assert self.teacher is not None
        return self.teacher(x, return_features=True)

    def inner_attack(self, x: torch.Tensor, loss_fn, model: nn.Module | None = None) -> torch.Tensor:
        """Run the training PGD maximising ``loss_fn`` (from ``crdnd_ray.attacks``).

        The attacked network is the student unless ``model`` is given (AdaAD attacks a module that
        returns the student's and the teacher's logits side by side); the attack settings are the same.
        """
        return attacks.pgd(
            self.student if model is None else model,
            x,
            loss_fn,
            eps=self.attack.eps,
            step_size=self.attack.step_size,
            steps=self.attack.steps,
            start=self.attack_start,
            bn_mode=self.attack_bn_mode,
        )


def kl_divergence(
    target_probs: torch.Tensor, log_probs: torch.Tensor, reduction: Reduction = "batchmean"
) -> torch.Tensor:
    """``KL(target ‖ q)`` from target probabilities and the log-probabilities of ``q``, rows = samples.

    Reductions: ``"none"`` gives one value per sample (summed over classes), ``"batchmean"`` the sum
    divided by the batch size (the true mean KL per sample), ``"elementmean"`` the sum divided by
    batch size × classes (what ``nn.KLDivLoss()`` with its default reduction computes, as in ARD and
    AdaAD's CIFAR-10 script). Zero target entries contribute zero. Gradients flow into both arguments;
    detach the target where the method's reference code does.
    """
    per_sample = F.kl_div(log_probs, target_probs, reduction="none").sum(dim=1)
    if reduction == "none":
        return per_sample
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "elementmean":
        return per_sample.mean() / log_probs.shape[1]
    raise ValueError(f"Unknown KL reduction {reduction!r}; use one of none, batchmean, elementmean.")


def distillation_kl(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
) -> torch.Tensor:
    """Hinton's distillation term ``τ² · KL(target ‖ softmax(student_logits / τ))``.

    ``target_probs`` must already be softened at the same ``τ`` (e.g. ``softmax(teacher / τ)``). The
    ``τ²`` factor keeps gradient magnitudes comparable across temperatures and is 1 at ``τ = 1``.
    """
    log_probs = F.log_softmax(student_logits / temperature, dim=1)
    return temperature**2 * kl_divergence(target_probs, log_probs, reduction)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Percentage of rows whose arg-max is the label (0-100, like every accuracy crdnd-ray reports), as a
    detached scalar tensor."""
    return 100.0 * (logits.detach().argmax(dim=1) == y).float().mean()
