"""Checks that run before any work: every config that a command will run names things the engine has.

The schema (``crdnd_ray.config``) cannot know the method registry (the methods import the schema), so the
names it leaves free are checked here, for the base config and for every config a sweep or an ablation
will derive from it: each ablation variant and each value a search or tuning space can choose.
"""

from __future__ import annotations

import difflib
from typing import Iterator

from crdnd_ray.config import ConfigError, RunConfig
from crdnd_ray.methods import METHODS

__all__ = ["derived_configs", "preflight"]


def derived_configs(cfg: RunConfig) -> Iterator[tuple[str, RunConfig]]:
    """``(where, config)`` for the base config, each ablation variant (with each choice its tuning space can
    make) and each choice of the search space."""
    yield "the config", cfg
    if cfg.ablation is not None:
        tune = cfg.ablation.tune
        for name, overrides in cfg.ablation.variants.items():
            source = f"ablation.variants.{name}"
            yield source, cfg.with_overrides(dict(overrides or {}), source=source)
            for key, spec in ({**tune.space, **tune.variant_space.get(name, {})} if tune else {}).items():
                for value in spec.values or []:
                    yield (f"ablation.tune (variant '{name}') {key}",
                           cfg.with_overrides({**(overrides or {}), key: value}, source=f"ablation.tune.{key}"))
    if cfg.search is not None:
        for key, spec in cfg.search.space.items():
            for value in spec.values or []:
                yield f"search.space.{key}", cfg.with_overrides({key: value}, source=f"search.space.{key}")


def _check_method(where: str, cfg: RunConfig) -> None:
    name = cfg.method.name
    if name in METHODS:
        return
    close = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"{where}: method.name '{name}' is not a known method.{hint} The methods are "
        f"{', '.join(sorted(METHODS))}. Fix method.name in the file or with --set method.name=... and run the "
        "command again."
    )


def preflight(cfg: RunConfig) -> None:
    """Refuse, with one ConfigError paragraph, a config that would fail only after work has started."""
    for where, derived in derived_configs(cfg):
        _check_method(where, derived)
