"""Judging robustness numbers: the verdicts of a verification and its ``verify.json``.

Given the accuracies a verification measured (``engine.verify`` runs the attacks), :func:`run_checks` applies
the sanity checks of Carlini et al., "On Evaluating Adversarial Robustness" (2019), that need no human
judgement:

* ``ordering``: clean ≥ FGSM ≥ PGD-20 ≥ AutoAttack; a stronger attack never finds fewer adversarial
  examples.
* ``eps_growth``: PGD-20 accuracy falls as eps grows (several multiples of eps) and reaches about 0 % at a
  very large eps (by default 1, the whole ``[0, 1]`` input box).
* ``more_iterations``: PGD with many more steps and random restarts (PGD-100 × 5) does not lower accuracy
  much below PGD-20, i.e. PGD-20 has converged.
* ``transfer``: PGD-20 examples crafted on an independently trained surrogate (a black-box transfer
  attack) do not beat the model's own white-box PGD.
* ``autoattack_gap``: PGD-20 and AutoAttack agree within a few points (2–5 is considered sound on CIFAR).

``ordering``, ``eps_growth`` and ``transfer`` are the classic signs of gradient masking (the model hides
its adversarial examples from gradient attacks); ``more_iterations`` and ``autoattack_gap`` say whether
PGD-20 is strong enough to report. Each check gives a verdict ``pass`` or ``warn`` and a plain-language
line. :class:`VerifyResult` flattens to MLflow metrics and tags and is stored as ``verify.json`` in a run
folder. Pure Python: no torch, no tracking store.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "CHECKS",
    "GRADIENT_MASKING_CHECKS",
    "SURROGATE_DIR",
    "VERIFY_FILE",
    "Check",
    "Verdict",
    "VerifyError",
    "VerifyResult",
    "VerifySettings",
    "eps_multiples",
    "read_verify",
    "run_checks",
    "worst",
    "write_verify",
]

VERIFY_FILE = "verify.json"
FORMAT = "crdnd-ray-verify/1"
SURROGATE_DIR = Path("verify") / "surrogate"

CHECKS: dict[str, str] = {
    "ordering": "clean >= FGSM >= PGD-20 >= AutoAttack",
    "eps_growth": "PGD-20 accuracy falls as eps grows and reaches about 0 % at a very large eps",
    "more_iterations": "many more PGD steps and random restarts do not beat PGD-20 by much",
    "transfer": "a transfer attack from an independently trained surrogate does not beat white-box PGD",
    "autoattack_gap": "PGD-20 and AutoAttack agree within a few points",
}
"""The checks, by name, in the order they run, with what each one asserts."""

GRADIENT_MASKING_CHECKS = ("ordering", "eps_growth", "transfer")
"""The checks whose warning means gradient masking; the others say whether PGD-20 is strong enough."""

Verdict = Literal["pass", "warn"]


class VerifyError(Exception):
    """A run folder or a ``verify.json`` cannot be verified or read; the message says why and how to fix it."""


@dataclass(frozen=True)
class VerifySettings:
    """The stronger attacks and the tolerances of the checks. Tolerances are in accuracy points (percent).

    Attributes:
        ordering_tolerance: How far (points) a stronger attack's accuracy may exceed a weaker one's in the
            ``ordering`` check before it warns. 1 point: at 150 examples one example is 0.7 points.
        eps_multiples: The multiples of eps at which ``eps_growth`` runs PGD-20 (1 reuses PGD-20 itself).
        large_eps: The very large eps of ``eps_growth``; 1 allows the whole ``[0, 1]`` input box, where any
            image can become any other.
        large_eps_max_acc: The accuracy (percent) PGD-20 may leave at ``large_eps``: "about 0".
        growth_tolerance: How far (points) accuracy may rise from one eps to the next larger one.
        long_steps: The steps of the long PGD of ``more_iterations`` (step size eps/4, as PGD-20).
        restarts: Its random restarts; an example counts as robust only if it survives every restart.
        steps_tolerance: How far (points) the long PGD may go below PGD-20.
        transfer_tolerance: How far (points) the transfer attack may go below the strongest white-box PGD.
        gap_tolerance: How far (points) AutoAttack may go below PGD-20. 5 is the upper end of what the
            CIFAR literature considers sound (2–5 points).
        seed: Seeds the random starts, so a verification is reproducible; the caller's random state is
            left alone.
    """

    ordering_tolerance: float = 1.0
    eps_multiples: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    large_eps: float = 1.0
    large_eps_max_acc: float = 2.0
    growth_tolerance: float = 1.0
    long_steps: int = 100
    restarts: int = 5
    steps_tolerance: float = 2.0
    transfer_tolerance: float = 2.0
    gap_tolerance: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps_multiples", tuple(sorted(float(m) for m in self.eps_multiples)))
        tolerances = ("ordering_tolerance", "large_eps_max_acc", "growth_tolerance", "steps_tolerance",
                      "transfer_tolerance", "gap_tolerance")
        negative = [name for name in tolerances if getattr(self, name) < 0]
        if negative:
            raise ValueError(f"Verification tolerances must be >= 0, but {', '.join(negative)} is negative; "
                             "use 0 for no tolerance.")
        if not self.eps_multiples or min(self.eps_multiples) <= 0:
            raise ValueError(f"eps_multiples must be positive numbers, got {self.eps_multiples}; the default "
                             "is (0.5, 1.0, 2.0, 4.0).")
        if self.large_eps <= 0 or self.long_steps < 1 or self.restarts < 1:
            raise ValueError(f"large_eps must be positive and long_steps and restarts at least 1, got "
                             f"large_eps={self.large_eps}, long_steps={self.long_steps}, restarts={self.restarts}.")

    @property
    def long_name(self) -> str:
        """The long PGD's name in accuracies and metrics, e.g. ``pgd100x5``."""
        return f"pgd{self.long_steps}x{self.restarts}"


@dataclass(frozen=True)
class Check:
    """One sanity check: its name (a key of :data:`CHECKS`), the numbers it judged, a verdict and a line.

    ``message`` is one or two plain-language sentences: the evidence when it passes; when it warns, what
    is wrong, what it means, and which number to report instead.
    """

    name: str
    verdict: Verdict
    numbers: dict[str, float]
    message: str


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify_model` found for one model.

    Attributes:
        eps: The L∞ radius of the run.
        n_eval: How many test examples every attack saw (the same ones).
        accuracies: Percent, by attack: ``clean``, ``fgsm``, ``pgd20``, ``autoattack``, the long PGD
            (``pgd100x5``), ``pgd20_eps_x<m>`` for each eps multiple, ``pgd20_large_eps``, ``transfer``
            and ``surrogate_clean`` (with a surrogate), and ``worst_case`` (correct under every attack at
            eps, per example).
        checks: The checks that ran, in the order of :data:`CHECKS` (``transfer`` needs a surrogate).
        settings: The attack settings and tolerances used.
        timings: Wall seconds ``autoattack`` and ``total``, and this process's CPU seconds ``autoattack_cpu``
            and ``total_cpu`` (on a shared machine the wall time also counts other people's work).
        checkpoint: ``best``, ``last`` or None (a model not taken from a run folder).
        files: Paths of the checkpoints verified (``model``) and attacked (``surrogate``), when known.
    """

    eps: float
    n_eval: int
    accuracies: dict[str, float]
    checks: list[Check]
    settings: VerifySettings
    timings: dict[str, float]
    checkpoint: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def verdict(self) -> Verdict:
        """``warn`` if any check warns, else ``pass``."""
        return worst(check.verdict for check in self.checks)

    @property
    def gradient_masking(self) -> Verdict:
        """The verdict of the gradient-masking checks only (:data:`GRADIENT_MASKING_CHECKS`)."""
        return worst(check.verdict for check in self.checks if check.name in GRADIENT_MASKING_CHECKS)

    def check(self, name: str) -> Check:
        """The check called ``name``; KeyError names the checks that ran."""
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"No check called {name!r} ran; the checks that ran are "
                       f"{', '.join(c.name for c in self.checks)}.")

    @property
    def prefix(self) -> str:
        """``verify`` for the best checkpoint or a bare model, ``verify_<checkpoint>`` otherwise."""
        return "verify" if self.checkpoint in (None, "best") else f"verify_{self.checkpoint}"

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: ``verify_<attack>_acc`` for every accuracy, the gaps the checks judged
        (``verify_gap_pgd20_autoattack``, ``verify_gap_pgd20_pgd100x5``, ``verify_gap_whitebox_transfer``;
        positive when the second attack is stronger), ``verify_n_warn``, ``verify_n_eval``, ``verify_eps``
        and the timings ``verify_autoattack_time_s`` and ``verify_time_s``. For the last checkpoint the
        prefix is ``verify_last``."""
        p = self.prefix
        values = {f"{p}_{name}_acc": value for name, value in self.accuracies.items()}
        gaps = {"gap_pgd20_autoattack": ("autoattack_gap", "gap"),
                f"gap_pgd20_{self.settings.long_name}": ("more_iterations", "gap"),
                "gap_whitebox_transfer": ("transfer", "gap")}
        ran = {check.name: check for check in self.checks}
        values.update({f"{p}_{name}": ran[check].numbers[key] for name, (check, key) in gaps.items() if check in ran})
        values.update({f"{p}_n_warn": float(sum(c.verdict == "warn" for c in self.checks)),
                       f"{p}_n_eval": float(self.n_eval), f"{p}_eps": self.eps,
                       f"{p}_autoattack_time_s": self.timings["autoattack"], f"{p}_time_s": self.timings["total"]})
        return values

    def tags(self) -> dict[str, str]:
        """Flat MLflow tags: ``verify.<check>``, ``verify.gradient_masking`` and ``verify``, each ``pass`` or
        ``warn`` (prefix ``verify_last`` for the last checkpoint)."""
        p = self.prefix
        tags = {f"{p}.{check.name}": check.verdict for check in self.checks}
        tags[f"{p}.gradient_masking"] = self.gradient_masking
        tags[p] = self.verdict
        return tags

    def lines(self) -> list[str]:
        """Human-readable summary: a headline, then one line per check (``PASS``/``WARN``, name, message)."""
        head = (f"{self.verdict.upper()}: {self.n_eval} examples at eps {self.eps:g}"
                + (f", {self.checkpoint} checkpoint" if self.checkpoint else "")
                + f"; AutoAttack {self.accuracies['autoattack']:.1f} % "
                f"(worst case over all attacks {self.accuracies['worst_case']:.1f} %), "
                f"AutoAttack took {self.timings['autoattack']:.1f} s.")
        return [head] + [f"{c.verdict.upper()} {c.name}: {c.message}" for c in self.checks]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the layout of one entry of ``verify.json``)."""
        payload = asdict(self)
        payload["settings"]["eps_multiples"] = list(self.settings.eps_multiples)
        payload["verdict"] = self.verdict
        payload["gradient_masking"] = self.gradient_masking
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> VerifyResult:
        """Rebuild a result from :meth:`to_dict`'s output."""
        values = {key: value for key, value in payload.items() if key not in ("verdict", "gradient_masking")}
        values["checks"] = [Check(**check) for check in payload["checks"]]
        values["settings"] = VerifySettings(**payload["settings"])
        return cls(**values)


def worst(verdicts: Any) -> Verdict:
    """``warn`` when any of ``verdicts`` warns, else ``pass``."""
    return "warn" if "warn" in set(verdicts) else "pass"




def eps_multiples(eps: float, settings: VerifySettings) -> list[float]:
    """The eps multiples of ``eps_growth`` that stay below ``large_eps``."""
    return [m for m in settings.eps_multiples if m * eps < settings.large_eps]


def run_checks(accuracies: dict[str, float], eps: float, settings: VerifySettings | None = None) -> list[Check]:
    """Judge the accuracies (percent, named as in :attr:`VerifyResult.accuracies`) of a verification.

    Pure and cheap: re-judging a stored result with other tolerances is
    ``run_checks(result.accuracies, result.eps, replace(result.settings, gap_tolerance=3))`` (the attack
    settings must stay those the accuracies were measured with). ``transfer`` is judged only when the
    accuracies hold a ``transfer`` entry.
    """
    settings = settings or VerifySettings()
    checks = [_check_ordering(accuracies, settings),
              _check_eps_growth(accuracies, eps, eps_multiples(eps, settings), settings),
              _check_more_iterations(accuracies, settings)]
    if "transfer" in accuracies:
        checks.append(_check_transfer(accuracies, settings))
    checks.append(_check_autoattack_gap(accuracies, settings))
    return checks


_ORDER = (("clean", "no attack"), ("fgsm", "FGSM"), ("pgd20", "PGD-20"), ("autoattack", "AutoAttack"))


def _check_ordering(acc: dict[str, float], settings: VerifySettings) -> Check:
    tolerance = settings.ordering_tolerance
    numbers = {name: acc[name] for name, _ in _ORDER} | {"tolerance": tolerance}
    broken = [(weak, strong) for weak, strong in pairwise(_ORDER) if acc[strong[0]] > acc[weak[0]] + tolerance]
    if not broken:
        chain = " ≥ ".join(f"{label} {acc[name]:.1f} %" for name, label in _ORDER)
        return Check("ordering", "pass", numbers,
                     f"Each stronger attack finds at least as many adversarial examples: {chain}.")
    lines = [f"{strong[1]} leaves {acc[strong[0]] - acc[weak[0]]:.1f} points more accuracy than {weak[1]} "
             f"({strong[1]} {acc[strong[0]]:.1f} %, {weak[1]} {acc[weak[0]]:.1f} %), although a stronger attack "
             "must find at least as many adversarial examples." for weak, strong in broken]
    lines.append("The model's gradients mislead the attacks (gradient masking): do not trust gradient-based "
                 "accuracies of this model; report AutoAttack and check the model for saturating or "
                 "non-differentiable parts.")
    return Check("ordering", "warn", numbers, " ".join(lines))


def _check_eps_growth(acc: dict[str, float], eps: float, multiples: list[float], settings: VerifySettings) -> Check:
    points = [(m * eps, acc[f"pgd20_eps_x{m:g}"]) for m in multiples]
    points.append((settings.large_eps, acc["pgd20_large_eps"]))
    numbers = {f"pgd20_eps_x{m:g}": acc[f"pgd20_eps_x{m:g}"] for m in multiples}
    numbers |= {"pgd20_large_eps": acc["pgd20_large_eps"], "large_eps": settings.large_eps,
                "large_eps_max_acc": settings.large_eps_max_acc, "tolerance": settings.growth_tolerance}
    curve = ", ".join(f"{value:.1f} % at {radius:g}" for radius, value in points)
    lines = [f"PGD-20 accuracy rises from {low_acc:.1f} % at eps {low:g} to {high_acc:.1f} % at eps {high:g}, "
             "but a larger ball contains every smaller one, so a working attack can only do better."
             for (low, low_acc), (high, high_acc) in pairwise(points)
             if high_acc > low_acc + settings.growth_tolerance]
    large, large_acc = points[-1]
    if large_acc > settings.large_eps_max_acc:
        box = ", the whole [0, 1] input box," if large >= 1 else ""
        lines.append(f"PGD-20 still leaves {large_acc:.1f} % accuracy at eps {large:g} (about 0 % is expected, at "
                     f"most {settings.large_eps_max_acc:g} %): with a ball that large{box} any input can be turned "
                     "into one of another class.")
    if not lines:
        return Check("eps_growth", "pass", numbers, f"PGD-20 accuracy falls as eps grows: {curve}.")
    lines.append(f"({curve}.) The attack's gradients lead it nowhere (gradient masking, or a broken attack): do not "
                 "trust PGD accuracies of this model; report AutoAttack.")
    return Check("eps_growth", "warn", numbers, " ".join(lines))


def _check_more_iterations(acc: dict[str, float], settings: VerifySettings) -> Check:
    name = settings.long_name
    label = f"PGD-{settings.long_steps} × {settings.restarts} restarts"
    gap = acc["pgd20"] - acc[name]
    numbers = {"pgd20": acc["pgd20"], name: acc[name], "gap": gap, "tolerance": settings.steps_tolerance}
    shown = f"PGD-20 {acc['pgd20']:.1f} %, {label} {acc[name]:.1f} %"
    if gap <= settings.steps_tolerance:
        return Check("more_iterations", "pass", numbers,
                     f"PGD-20 has converged: {label} stays within {settings.steps_tolerance:g} points of it ({shown}).")
    return Check("more_iterations", "warn", numbers,
                 f"PGD-20 overstates robustness by {gap:.1f} points: {label} finds {gap:.1f} points more adversarial "
                 f"examples ({shown}). PGD-20 has not converged on this model; report AutoAttack, not PGD-20.")


def _check_transfer(acc: dict[str, float], settings: VerifySettings) -> Check:
    name = settings.long_name
    white_name, white_label = min((("pgd20", "PGD-20"), (name, f"PGD-{settings.long_steps} × {settings.restarts}")),
                                  key=lambda item: acc[item[0]])
    gap = acc[white_name] - acc["transfer"]
    numbers = {"transfer": acc["transfer"], "whitebox": acc[white_name], "surrogate_clean": acc["surrogate_clean"],
               "gap": gap, "tolerance": settings.transfer_tolerance}
    shown = (f"transfer {acc['transfer']:.1f} %, white-box {white_label} {acc[white_name]:.1f} %; "
             f"the surrogate's own clean accuracy {acc['surrogate_clean']:.1f} %")
    if gap <= settings.transfer_tolerance:
        return Check("transfer", "pass", numbers,
                     f"A transfer attack from an independently trained surrogate does not beat the white-box attack "
                     f"({shown}).")
    return Check("transfer", "warn", numbers,
                 f"A black-box transfer attack beats the white-box attack by {gap:.1f} points ({shown}): adversarial "
                 "examples exist that the model's own gradients do not lead to (gradient masking). White-box PGD "
                 "overstates robustness; report AutoAttack.")


def _check_autoattack_gap(acc: dict[str, float], settings: VerifySettings) -> Check:
    gap = acc["pgd20"] - acc["autoattack"]
    numbers = {"pgd20": acc["pgd20"], "autoattack": acc["autoattack"], "gap": gap,
               "tolerance": settings.gap_tolerance}
    shown = f"PGD-20 {acc['pgd20']:.1f} %, AutoAttack {acc['autoattack']:.1f} %"
    if gap <= settings.gap_tolerance:
        return Check("autoattack_gap", "pass", numbers,
                     f"PGD-20 and AutoAttack agree within {settings.gap_tolerance:g} points ({shown}).")
    return Check("autoattack_gap", "warn", numbers,
                 f"PGD-20 overstates robustness by {gap:.1f} points: AutoAttack finds {gap:.1f} points more "
                 f"adversarial examples ({shown}). Report AutoAttack, not PGD-20.")


def _read_file(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise VerifyError(f"'{path}' could not be read ({error}); delete it and verify the run again.") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise VerifyError(f"'{path}' is not a crdnd-ray verification file (no '{FORMAT}' marker); delete it and "
                          "verify the run again.")
    return payload


def write_verify(folder: str | Path, result: VerifyResult) -> Path:
    """Store ``result`` in ``<folder>/verify.json`` under its checkpoint (``model`` when None), keeping the others.

    Layout: ``{"format": "crdnd-ray-verify/1", "results": {"best": <VerifyResult.to_dict()>, ...}}``.
    """
    path = Path(folder) / VERIFY_FILE
    payload = _read_file(path) if path.exists() else {"format": FORMAT, "results": {}}
    payload["results"][result.checkpoint or "model"] = result.to_dict()
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    temporary.replace(path)
    return path


def read_verify(folder: str | Path) -> dict[str, VerifyResult]:
    """The results stored in ``<folder>/verify.json``, by checkpoint (``best``, ``last`` or ``model``).

    Raises:
        VerifyError: When there is no readable ``verify.json``.
    """
    path = Path(folder) / VERIFY_FILE
    if not path.exists():
        raise VerifyError(f"'{folder}' holds no {VERIFY_FILE}: the run has not been verified yet. Verify it first "
                          "(engine.verify.verify_run_folder).")
    return {name: VerifyResult.from_dict(entry) for name, entry in _read_file(path)["results"].items()}
