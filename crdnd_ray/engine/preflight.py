"""Checks that run before any work, so that a run never fails after its teacher or its epochs are done.

Two kinds, both one paragraph each and exit code 2 in the CLI:

* **config checks** (:func:`check_config`): names the schema leaves free (``method.name`` against the method
  registry, attack names), for the base config and for every config a sweep or an ablation derives from it:
  each ablation variant and each value a search or tuning space can choose. The schema cannot do this itself:
  the methods import it. (A search's own bounds, such as ASHA's grace period, are checked by
  ``engine.sweep.check_search``, which every sweep, tuned ablation and ``--dry-run`` runs first.)
* **environment checks** (:func:`environment_problems`): the dataset is on disk, the teacher checkpoint is
  readable and fits ``teacher.kwargs``, the output folder is writable, the tracking store answers.

:func:`preflight` runs both and raises the first problem. ``--dry-run`` raises config problems but only
lists environment problems, since a plan is often checked on a laptop before it ships to a cluster.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Iterator

from crdnd_ray.attacks import parse_attack
from crdnd_ray.checkpoints import CheckpointError
from crdnd_ray.config import ConfigError, RunConfig
from crdnd_ray.data import DataError, require_data
from crdnd_ray.engine.teachers import load_teacher, needs_teacher
from crdnd_ray.methods import METHODS
from crdnd_ray.tracking.uris import TrackingUnavailable, check_store

__all__ = ["check_config", "derived_configs", "environment_problems", "preflight"]


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


def _refuse(where: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{where}: {problem} {fix} Fix it in the file or with --set and run the command again.")


def _check_method(where: str, cfg: RunConfig) -> None:
    name = cfg.method.name
    if name in METHODS:
        return
    close = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise _refuse(where, f"method.name '{name}' is not a known method.{hint}",
                  f"The methods are {', '.join(sorted(METHODS))}.")


def _check_attacks(where: str, cfg: RunConfig) -> None:
    for key, names in (("eval.epoch_attacks", cfg.eval.epoch_attacks), ("eval.final_attacks", cfg.eval.final_attack_names)):
        for name in names:
            try:
                parse_attack(name, cfg.eval.eps)
            except (ValueError, RuntimeError) as error:
                raise _refuse(where, f"{key} names '{name}', which cannot run: {error}",
                              "Use clean, fgsm, pgd<K> (e.g. pgd20), cw or autoattack.") from None


def check_config(cfg: RunConfig) -> None:
    """Refuse (ConfigError) a config, or a config derived from it, that names what the engine does not have."""
    for where, derived in derived_configs(cfg):
        _check_method(where, derived)
        _check_attacks(where, derived)


def _check_writable(folder: Path) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"The output folder '{folder}' cannot be written ('{existing}' is not a writable folder). Choose "
            "another place with --output, or fix the folder's permissions."
        )


def environment_problems(cfg: RunConfig, output: Path | None = None) -> list[Exception]:
    """What would stop the run on this machine: missing data, an unfit teacher, an unwritable output folder,
    a tracking store that does not answer. Each problem is an exception whose message says how to fix it."""
    checks = [lambda: require_data(cfg.data)]
    if cfg.teacher.checkpoint and any(needs_teacher(derived) for _, derived in derived_configs(cfg)):
        checks.append(lambda: load_teacher(cfg, Path(cfg.teacher.checkpoint)))
    if output is not None:
        checks.append(lambda: _check_writable(Path(output)))
    if cfg.tracking.enabled:
        checks.append(lambda: check_store(cfg.tracking))
    problems: list[Exception] = []
    for check in checks:
        try:
            check()
        except (DataError, CheckpointError, ConfigError, TrackingUnavailable) as problem:
            problems.append(problem)
    return problems


def preflight(cfg: RunConfig, output: Path | None = None) -> None:
    """Run every check before any work; raise the first problem (one paragraph each)."""
    check_config(cfg)
    problems = environment_problems(cfg, output)
    if problems:
        raise problems[0]
