"""Distillation methods: CRDND and the baselines, one file each, behind one registry.

``METHODS`` maps each method's ``name`` to its :class:`Distiller` class; :func:`build_distiller`
instantiates one from the config sections. The engine never special-cases a method: everything a
method needs (its inner attack, extra modules, optimiser groups, epoch-dependent behaviour) lives
in its own class.
"""

from __future__ import annotations

from torch import nn

from crdnd_ray.config import AttackConfig, MethodConfig
from crdnd_ray.methods.adaad import AdaAD
from crdnd_ray.methods.ard import ARD
from crdnd_ray.methods.base import Distiller, LossParts
from crdnd_ray.methods.crdnd import CRDND
from crdnd_ray.methods.iad import IAD
from crdnd_ray.methods.natural import Natural
from crdnd_ray.methods.rslad import RSLAD
from crdnd_ray.methods.sat import SAT
from crdnd_ray.methods.trades import TRADES

__all__ = [
    "ARD",
    "CRDND",
    "IAD",
    "METHODS",
    "Natural",
    "RSLAD",
    "SAT",
    "TRADES",
    "AdaAD",
    "Distiller",
    "LossParts",
    "build_distiller",
]

METHODS: dict[str, type[Distiller]] = {
    cls.name: cls for cls in (CRDND, RSLAD, ARD, IAD, AdaAD, SAT, TRADES, Natural)
}
"""Registered methods by name."""


def build_distiller(
    name: str,
    student: nn.Module,
    teacher: nn.Module | None,
    method_cfg: MethodConfig,
    attack_cfg: AttackConfig,
    num_classes: int,
) -> Distiller:
    """Instantiate the method ``name`` around ``student`` (and ``teacher`` where the method uses one).

    Methods without a teacher (``sat``, ``trades``, ``natural``) ignore ``teacher``; the others raise ValueError
    when it is missing.

    Raises:
        ValueError: If ``name`` is not registered; the message lists the valid names.
    """
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(
            f"Unknown method {name!r}. Valid methods are: {', '.join(sorted(METHODS))}. "
            "Set method.name to one of them."
        ) from None
    return cls(student, teacher, method_cfg, attack_cfg, num_classes)
