"""Adversarial attacks for training and evaluation.

Everything here works on inputs in ``[0, 1]`` under the L∞ threat model. Models are plain
``nn.Module`` objects whose ``forward(x)`` returns logits (a tuple whose first item is the logits is
accepted too); any normalisation lives inside the model.

The module has three layers:

* **Loss factories** (:func:`ce_loss`, :func:`kl_loss`, :func:`cw_margin_loss`) build a callable
  ``loss_fn(logits) -> scalar`` summed over the batch, which an attack *maximises*.
* **One projected-gradient attack** (:func:`pgd`) parameterised by that loss, used both for the inner
  maximisation of adversarial training/distillation and for evaluation; :func:`fgsm` and
  :func:`cw_inf` are thin presets of it.
* **The evaluation suite**: :data:`EVAL_ATTACKS`, :func:`parse_attack` and :func:`evaluate`, which
  follow the protocol of the robustness-distillation literature (clean, FGSM, PGD-20 with step
  ``eps/4``, CW∞ with 30 steps and κ = 50, AutoAttack "standard" through ``torchattacks``).

Randomness only comes from the global torch generator (``torch.rand_like``/``torch.randn_like``),
so results are reproducible after ``torch.manual_seed``. AutoAttack runs inside
:func:`torch.random.fork_rng`, so its internal re-seeding does not disturb the caller's stream.
Every attack but AutoAttack is free of host synchronisation and draws its random start from the default
generator, so :mod:`crdnd_ray.graphs` can capture it, with the model's forward, as a CUDA graph.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crdnd_ray.graphs import AttackRunner, EagerRunner

__all__ = [
    "AttackFn",
    "DEFAULT_EVAL_ATTACKS",
    "EVAL_ATTACKS",
    "LossFn",
    "ce_loss",
    "cw_inf",
    "cw_margin_loss",
    "evaluate",
    "fgsm",
    "kl_loss",
    "logits_of",
    "model_device",
    "parse_attack",
    "pgd",
    "training_flags_restored",
]

LossFn = Callable[[Tensor], Tensor]
"""A loss to maximise: ``loss_fn(logits) -> scalar tensor`` summed over the batch."""

AttackFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""An evaluation attack: ``attack(model, x, y) -> x_adv`` (detached, same shape as ``x``)."""

DEFAULT_EVAL_ATTACKS: tuple[str, ...] = ("clean", "fgsm", "pgd20", "cw", "autoattack")
"""The literature's standard evaluation suite, in the order it is usually reported."""

_STARTS = ("uniform", "gaussian", "none")
_EAGER_ONLY = ("autoattack",)
_BN_MODES = ("eval", "train")
_TORCHATTACKS_HELP = (
    "AutoAttack needs the optional package torchattacks 3.5.1, which could not be imported. "
    "Install it with `pip install --no-deps torchattacks==3.5.1` (or run `make install`, which does "
    "this): the --no-deps flag is required because torchattacks pins requests~=2.25.1, which conflicts "
    "with mlflow, and an unpinned install silently falls back to torchattacks 3.3.0, whose bundled "
    "top-level `autoattack` and `robustbench` packages shadow the real ones. "
    "Alternatively, leave `autoattack` out of the attack list."
)


def logits_of(output: Any) -> Tensor:
    """Return the logits from a model output that may be ``(logits, features)``."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


@contextmanager
def training_flags_restored(model: nn.Module, training: bool | None) -> Iterator[None]:
    """Temporarily set ``model.train(training)`` (unless ``None``) and restore every submodule's flag."""
    saved = [(module, module.training) for module in model.modules()]
    try:
        if training is not None:
            model.train(training)
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def ce_loss(y: Tensor) -> LossFn:
    """Cross-entropy against the labels ``y``, summed over the batch (the standard PGD/FGSM loss)."""

    def loss_fn(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, reduction="sum")

    return loss_fn


def kl_loss(target_probs: Tensor, temperature: float = 1.0) -> LossFn:
    """``KL(target_probs ‖ softmax(logits / temperature))`` summed over the batch.

    This is the inner maximisation loss of ARD/RSLAD-style distillation, with ``target_probs``
    usually the (detached) teacher's softmax on natural inputs. At ``x_adv = x`` with a target equal to
    the model's own prediction its gradient is zero, so use a random start (``"gaussian"`` or
    ``"uniform"``) with it.
    """
    if temperature <= 0:
        raise ValueError(f"kl_loss needs a positive temperature, got {temperature}.")
    target = target_probs.detach()

    def loss_fn(logits: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="sum")

    return loss_fn


def cw_margin_loss(y: Tensor, kappa: float = 50.0) -> LossFn:
    """Carlini-Wagner margin loss with confidence ``kappa``, summed over the batch.

    Per sample it is ``-max(z_y - max_{j≠y} z_j + kappa, 0)``, exactly IAD's ``basic_eval``
    ``cwloss``; equivalently ``min(margin, kappa) - kappa`` with ``margin = max_{j≠y} z_j - z_y``,
    i.e. the CW f6 objective ``max(z_y - max_{j≠y} z_j, -kappa)`` negated and shifted by the constant
    ``-kappa``. Maximising it pushes the best wrong class above the true one until the margin reaches
    ``kappa``, after which the gradient vanishes.
    """

    labels = y.unsqueeze(1)

    def loss_fn(logits: Tensor) -> Tensor:
        real = logits.gather(1, labels).squeeze(1)
        other = logits.scatter(1, labels, float("-inf")).amax(dim=1)
        return -torch.clamp(real - other + kappa, min=0.0).sum()

    return loss_fn


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto the L∞ ball of radius ``eps`` around ``x`` and onto ``[0, 1]``."""
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def pgd(
    model: nn.Module,
    x: Tensor,
    loss_fn: LossFn,
    *,
    eps: float,
    step_size: float,
    steps: int,
    start: str = "uniform",
    bn_mode: str = "eval",
    gaussian_std: float = 0.001,
) -> Tensor:
    """L∞ projected gradient ascent on ``loss_fn(model(x_adv))``.

    Args:
        model: Returns logits (or ``(logits, features)``) for inputs in ``[0, 1]``.
        x: Natural inputs in ``[0, 1]``.
        loss_fn: Loss to maximise, from :func:`ce_loss`, :func:`kl_loss`, :func:`cw_margin_loss` or any
            callable ``logits -> scalar``.
        eps: Radius of the L∞ ball.
        step_size: Size of each sign-gradient step.
        steps: Number of steps (``0`` returns the projected start point).
        start: ``"uniform"`` (``x + U(-eps, eps)``), ``"gaussian"`` (``x + gaussian_std·N(0, 1)``, the
            ARD/RSLAD training start) or ``"none"`` (start at ``x``).
        bn_mode: ``"eval"`` runs the attack with the model in eval mode and afterwards restores the
            training flag of every submodule; ``"train"`` leaves the model's mode untouched (BatchNorm
            then uses, and updates, batch statistics during the attack).
        gaussian_std: Standard deviation of the ``"gaussian"`` start.

    Returns:
        Detached adversarial inputs, within ``eps`` of ``x`` and within ``[0, 1]``.

    The start point and every step are projected onto the ``eps``-ball and ``[0, 1]``. Gradients are
    taken with :func:`torch.autograd.grad` with respect to the input only, so parameter ``.grad``
    fields are never touched, and gradient tracking is enabled locally so that callers may run
    under :func:`torch.no_grad`.
    """
    if start not in _STARTS:
        raise ValueError(f"Unknown PGD start {start!r}; use one of {', '.join(_STARTS)}.")
    if bn_mode not in _BN_MODES:
        raise ValueError(f"Unknown PGD bn_mode {bn_mode!r}; use one of {', '.join(_BN_MODES)}.")
    if eps < 0 or step_size < 0 or steps < 0:
        raise ValueError(
            f"PGD needs eps, step_size and steps >= 0, got eps={eps}, step_size={step_size}, "
            f"steps={steps}."
        )
    x = x.detach()
    if start == "uniform":
        x_adv = x + torch.empty_like(x).uniform_(-eps, eps)
    elif start == "gaussian":
        x_adv = x + gaussian_std * torch.randn_like(x)
    else:
        x_adv = x.clone()
    x_adv = _project(x_adv, x, eps)

    with training_flags_restored(model, False if bn_mode == "eval" else None):
        with torch.enable_grad():
            for _ in range(steps):
                x_adv.requires_grad_(True)
                loss = loss_fn(logits_of(model(x_adv)))
                (grad,) = torch.autograd.grad(loss, x_adv)
                x_adv = _project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """FGSM: one cross-entropy sign step of size ``eps`` from ``x`` (no random start), eval mode."""
    return pgd(model, x, ce_loss(y), eps=eps, step_size=eps, steps=1, start="none")


def cw_inf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float = 2 / 255,
    steps: int = 30,
    kappa: float = 50.0,
) -> Tensor:
    """CW∞: PGD on :func:`cw_margin_loss` with a uniform start (IAD: 30 steps of 2/255, κ = 50)."""
    return pgd(
        model, x, cw_margin_loss(y, kappa), eps=eps, step_size=step_size, steps=steps, start="uniform"
    )


def _eval_step_size(eps: float) -> float:
    """Evaluation step size ``eps / 4``: exactly 2/255 at the standard ``eps = 8/255``."""
    return eps / 4


def _make_clean(eps: float) -> AttackFn:
    """No attack: returns the inputs unchanged."""

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return x.detach()

    return attack


def _make_fgsm(eps: float) -> AttackFn:
    """FGSM with step ``eps``."""

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return fgsm(model, x, y, eps)

    return attack


def _make_pgd(eps: float, steps: int = 20) -> AttackFn:
    """PGD-``steps`` on cross-entropy, step ``eps/4`` (2/255 at 8/255), uniform random start."""
    step_size = _eval_step_size(eps)

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return pgd(model, x, ce_loss(y), eps=eps, step_size=step_size, steps=steps, start="uniform")

    return attack


def _make_cw(eps: float) -> AttackFn:
    """CW∞: 30 steps of ``eps/4`` (2/255 at 8/255) on the CW margin loss with κ = 50."""
    step_size = _eval_step_size(eps)

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return cw_inf(model, x, y, eps, step_size=step_size, steps=30, kappa=50.0)

    return attack


def _make_autoattack(eps: float) -> AttackFn:
    """AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square) from torchattacks, seed 0.

    torchattacks back-propagates into the parameters; their ``.grad`` fields are restored afterwards,
    and its re-seeding happens inside :func:`torch.random.fork_rng`.
    """
    try:
        import torchattacks
    except ImportError as error:
        raise RuntimeError(_TORCHATTACKS_HELP) from error

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            n_classes = int(logits_of(model(x[:1])).shape[1])
        devices = [x.device] if x.device.type == "cuda" else []
        parameters = list(model.parameters())
        saved_grads = [parameter.grad for parameter in parameters]
        try:
            with torch.random.fork_rng(devices=devices):
                autoattack = torchattacks.AutoAttack(
                    model, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=0
                )
                x_adv = autoattack(x.detach(), y)
        finally:
            for parameter, grad in zip(parameters, saved_grads):
                parameter.grad = grad
        return x_adv.detach()

    return attack


EVAL_ATTACKS: dict[str, Callable[..., AttackFn]] = {
    "clean": _make_clean,
    "fgsm": _make_fgsm,
    "pgd": _make_pgd,
    "cw": _make_cw,
    "autoattack": _make_autoattack,
}
"""Evaluation attacks: name → ``factory(eps, **params) -> attack(model, x, y)``.

``"pgd"`` takes ``steps``; :func:`parse_attack` maps names such as ``"pgd20"`` onto it.
"""

_PGD_NAME = re.compile(r"pgd(\d+)")
_VALID_NAMES = "clean, fgsm, pgd<K> (e.g. pgd20, pgd10), cw, autoattack"


def _canonical_name(name: str) -> tuple[str, dict[str, int]]:
    """Split an attack name into its registry key and parameters; raise ValueError if unknown."""
    key = name.strip().lower()
    match = _PGD_NAME.fullmatch(key)
    if match is not None and int(match.group(1)) > 0:
        return "pgd", {"steps": int(match.group(1))}
    if key in EVAL_ATTACKS and key != "pgd":
        return key, {}
    raise ValueError(f"Unknown evaluation attack {name!r}; valid names are: {_VALID_NAMES}.")


def _display_name(key: str, params: dict[str, int]) -> str:
    return f"pgd{params['steps']}" if key == "pgd" else key


def parse_attack(name: str, eps: float) -> AttackFn:
    """Build the evaluation attack called ``name`` at radius ``eps``.

    Names (case-insensitive):

    * ``clean``: no attack.
    * ``fgsm``: one CE sign step of ``eps``.
    * ``pgd<K>`` (``pgd20``, ``pgd10``, ...): K steps of PGD on CE with a uniform random start and
      step ``eps/4``, which is the literature's 2/255 at the standard ``eps = 8/255``.
    * ``cw``: CW∞, 30 steps of ``eps/4`` on the CW margin loss with κ = 50 (IAD's protocol).
    * ``autoattack``: ``torchattacks.AutoAttack(norm="Linf", version="standard", seed=0)`` with the
      number of classes read from the logits. Needs torchattacks 3.5.1; without it this raises
      :class:`RuntimeError` explaining how to install it.

    Raises:
        ValueError: If the name is unknown; the message lists the valid names.
        RuntimeError: For ``autoattack`` when torchattacks cannot be imported.
    """
    key, params = _canonical_name(name)
    return EVAL_ATTACKS[key](eps, **params)


def _scorer(attack: AttackFn, model: nn.Module) -> Callable[[Tensor, Tensor], tuple[Tensor]]:
    """``score(x, y) -> (correct,)``: how many of ``x`` the model still classifies as ``y`` after the attack."""

    def score(x: Tensor, y: Tensor) -> tuple[Tensor]:
        x_adv = attack(model, x, y)
        with torch.no_grad():
            predictions = logits_of(model(x_adv)).argmax(dim=1)
        return ((predictions == y).sum(),)

    return score


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _planned_total(loader: Any, limit: int | None) -> int:
    try:
        size = len(loader.dataset)
    except (AttributeError, TypeError):
        return limit if limit is not None else 0
    return size if limit is None else min(size, limit)


def evaluate(
    model: nn.Module,
    loader: Any,
    attacks: Sequence[str],
    *,
    eps: float,
    limit: int | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    runner: AttackRunner | None = None,
) -> dict[str, float]:
    """Accuracy of ``model`` under each named attack, on the same samples.

    Args:
        model: The classifier; it is put in eval mode and every submodule's training flag is restored
            afterwards.
        loader: Iterable of ``(x, y, ...)`` batches with ``x`` in ``[0, 1]``.
        attacks: Attack names understood by :func:`parse_attack`, e.g. ``["clean", "pgd20"]``.
        eps: L∞ radius.
        limit: Evaluate only the first ``limit`` samples of the loader (all when ``None``).
        device: Where to run; defaults to the device of the model's parameters.
        progress: Called as ``progress(attack_name, samples_done, samples_total)`` after each batch
            of each attack; ``samples_total`` is 0 when the loader's size is unknown.
        runner: Runs each batch's attack and scoring (:mod:`crdnd_ray.graphs`); a ``GraphRunner`` replays
            them as CUDA graphs (AutoAttack always runs eagerly). Its graphs belong to ``model``: give each
            call its own runner. Default: eager.

    Returns:
        ``{f"{name}_acc": accuracy_in_percent, ..., "n_eval": number_of_samples}`` where ``name`` is
        the canonical lower-case attack name (``clean``, ``fgsm``, ``pgd20``, ``cw``, ``autoattack``).

    All attack names are checked (and AutoAttack's dependency imported) before any computation.
    Every attack sees exactly the same samples, batch by batch. Correct counts stay on the device until
    the end, so batches are not synchronised with the host.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"evaluate needs limit > 0 or None, got {limit}.")
    if not attacks:
        raise ValueError(f"evaluate needs at least one attack name; valid names are: {_VALID_NAMES}.")
    built: dict[str, AttackFn] = {}
    for name in attacks:
        key, params = _canonical_name(name)
        display = _display_name(key, params)
        if display not in built:
            built[display] = EVAL_ATTACKS[key](eps, **params)
    run_device = torch.device(device) if device is not None else model_device(model)
    total = _planned_total(loader, limit)
    eager = EagerRunner()
    runner = runner or eager
    scorers = {display: (_scorer(attack, model), eager if display in _EAGER_ONLY else runner)
               for display, attack in built.items()}
    correct = {display: torch.zeros((), dtype=torch.int64, device=run_device) for display in built}
    seen = 0

    with training_flags_restored(model, False):
        for batch in loader:
            if limit is not None and seen >= limit:
                break
            x, y = batch[0], batch[1]
            if limit is not None:
                x, y = x[: limit - seen], y[: limit - seen]
            x, y = x.to(run_device), y.to(run_device)
            for display, (score, run) in scorers.items():
                (hits,) = run(score, x, y)
                correct[display] += hits
                if progress is not None:
                    progress(display, seen + len(y), total)
            seen += len(y)

    if seen == 0:
        raise ValueError("evaluate got no samples from the loader; check the dataset and its split.")
    results: dict[str, float] = {f"{name}_acc": 100.0 * int(hits) / seen for name, hits in correct.items()}
    results["n_eval"] = seen
    return results
