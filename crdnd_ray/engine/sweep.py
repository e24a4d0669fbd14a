"""Sweeps: what Optuna searches (the ``search`` section), through the one Tune driver of ``engine.trials``.

Optuna (through Ray's ``OptunaSearch``) proposes each trial's overrides, single- or multi-objective, with ASHA
early stopping; the trials run, are recorded and resumed by :func:`crdnd_ray.engine.trials.run_trials`.
:func:`run_search` is that machinery for any space; a sweep runs it once, a tuned ablation once per variant.
The sweep folder then gets ``results.csv``/``.parquet``, ``best.yaml``, the Pareto front and plots — also
after a failure or Ctrl-C, for the trials that were recorded.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from crdnd_ray import plots, tables
from crdnd_ray.analysis import pareto_rows
from crdnd_ray.config import ConfigError, ParameterSpec, RunConfig, SamplerConfig, SearchConfig, flatten
from crdnd_ray.engine.cost import totals
from crdnd_ray.engine.preflight import check_config
from crdnd_ray.engine.teachers import prepare_teacher
from crdnd_ray.engine.trials import TrialSpec, TrialsPlan, TrialsResult, plan_trials, run_trials
from crdnd_ray.engine.verify import VERIFY_COLUMNS, sweep_choice, verify_rows

__all__ = ["best_row", "check_search", "plan_sweep", "resolve_space", "run_search", "run_sweep",
           "sample_space", "validate_space", "write_sweep_results"]

PER_EPOCH_EXTRA = ("loss",)


def validate_space(cfg: RunConfig) -> SearchConfig:
    """Check the ``search`` section against the run config; raise ConfigError naming the problem."""
    search = cfg.search
    if search is None:
        raise ConfigError("This file has no 'search:' section, so there is nothing to sweep. Add one (see "
                          "search_spaces/digits.yaml) or use 'crdnd-ray train' for a single run.")
    if not search.space:
        raise ConfigError("search.space is empty: name at least one dotted config key to search, e.g. "
                          "method.temperature: {type: uniform, low: 1, high: 8}.")
    resolve_space(cfg, search.space, "search.space")
    check_config(cfg)
    check_search(cfg, search, "search")
    return search


def check_search(cfg: RunConfig, search: SearchConfig, where: str) -> None:
    """Refuse a scheduler that cannot run within the epochs, or a metric the trials do not report when the
    search needs it.

    A single-objective search reports every epoch's value to Optuna (and ASHA compares trials at each rung),
    so its metric must be a per-epoch one; only a multi-objective search without ASHA may use the final
    ``best_*``/``last_*`` metrics.
    """
    scheduler = search.scheduler
    max_t = scheduler.max_t or cfg.train.epochs
    if scheduler.kind == "asha" and scheduler.grace_period > max_t:
        raise ConfigError(
            f"{where}.scheduler.grace_period={scheduler.grace_period} is longer than the {max_t} epochs a trial may "
            f"run ({where}.scheduler.max_t, else train.epochs), so ASHA could never stop a trial. Set grace_period "
            f"to at most {max_t}, or more train.epochs, and run the command again."
        )
    per_epoch = [f"epoch_{name}_acc" for name in cfg.eval.epoch_attacks] + list(PER_EPOCH_EXTRA)
    final = [f"{which}_{name}_acc" for which in ("best", "last") for name in cfg.eval.final_attack_names]
    every_epoch = len(search.metrics) == 1 or search.scheduler.kind == "asha"
    allowed = per_epoch if every_epoch else per_epoch + final
    for metric in search.metrics:
        if metric not in allowed:
            need = ("a single-objective Optuna search" if len(search.metrics) == 1 else "ASHA")
            raise ConfigError(
                f"{where}.metric '{metric}' is not a metric the trials report"
                + (f" every epoch, which {need} needs" if every_epoch else "")
                + f". Choose one of: {', '.join(allowed)}."
            )


def _config_value(flat: dict[str, Any], key: str, where: str) -> Any:
    if key not in flat:
        raise ConfigError(f"{where}: a 'when' condition names '{key}', which is neither a parameter of the space nor "
                          "a config value. Name a parameter of the space or a dotted config key such as "
                          "method.contrastive.kind.")
    return flat[key]


def resolve_space(cfg: RunConfig, space: dict[str, ParameterSpec], where: str,
                  pinned: Iterable[str] = ()) -> dict[str, ParameterSpec]:
    """The space that runs of ``cfg`` search, checked against the config (ConfigError naming the problem).

    Keys in ``pinned`` are left out (they keep ``cfg``'s value). A ``when`` condition on a key outside the
    space is decided by ``cfg``'s fixed value: the parameter is dropped when it fails and loses that condition
    when it holds, so only conditions among searched parameters remain for :func:`sample_space`.
    """
    run = cfg.run_dict()
    flat = flatten(run)
    for key, spec in space.items():
        probe = spec.values[0] if spec.type == "choice" else (spec.low if spec.type != "int" else int(spec.low))
        if key.split(".")[0] not in run:
            raise ConfigError(f"{where}.{key}: '{key.split('.')[0]}' is not a config section.")
        try:
            cfg.with_overrides({key: probe}, source=f"{where}.{key}")
        except ConfigError as error:
            raise ConfigError(f"{where}.{key} does not name a valid config value: {error}") from None
    left_out = set(pinned)
    resolved = {key: spec for key, spec in space.items() if key not in left_out}
    changed = True
    while changed:
        changed = False
        for key, spec in list(resolved.items()):
            fixed = {other: values for other, values in (spec.when or {}).items() if other not in resolved}
            if not fixed:
                continue
            changed = True
            if all(_config_value(flat, other, f"{where}.{key}") in values for other, values in fixed.items()):
                kept = {other: values for other, values in spec.when.items() if other not in fixed}
                resolved[key] = spec.model_copy(update={"when": kept or None})
            else:
                del resolved[key]
    return resolved


def sample_space(trial: Any, space: dict[str, ParameterSpec]) -> dict[str, Any]:
    """Define-by-run sampling for Optuna: parameters with a ``when`` condition are sampled only if it holds."""
    chosen: dict[str, Any] = {}
    pending = dict(space)
    while pending:
        progressed = False
        for name, spec in list(pending.items()):
            conditions = spec.when or {}
            if any(other in pending for other in conditions):
                continue
            del pending[name]
            progressed = True
            if not all(other in chosen and chosen[other] in values for other, values in conditions.items()):
                continue
            if spec.type == "uniform":
                chosen[name] = trial.suggest_float(name, spec.low, spec.high)
            elif spec.type == "loguniform":
                chosen[name] = trial.suggest_float(name, spec.low, spec.high, log=True)
            elif spec.type == "int":
                chosen[name] = trial.suggest_int(name, int(spec.low), int(spec.high))
            else:
                chosen[name] = trial.suggest_categorical(name, spec.values)
        if not progressed:
            raise ConfigError(f"search.space has a cycle of conditions among: {', '.join(pending)}.")
    return None  # Ray's OptunaSearch reads the suggested values from the trial itself.


def run_search(cfg: RunConfig, folder: Path, search: SearchConfig, space: dict[str, ParameterSpec], *, kind: str,
               spec: TrialSpec, resume: bool, teacher_path: Path | None, printer: Callable[[str], None],
               parent_params: dict[str, Any] | None = None, experiment: str | None = None,
               parent_run_id: str | None = None, extra_callbacks: list[Any] | None = None) -> TrialsResult:
    """Run ``search.num_samples`` Optuna trials over ``space`` (a resolved space) with ``search``'s sampler and
    scheduler, through :func:`crdnd_ray.engine.trials.run_trials` (``experiment``, ``parent_run_id`` and
    ``extra_callbacks`` as there). ``spec`` turns the sampled values into the trial's overrides."""
    from ray.tune.search.optuna import OptunaSearch

    metrics, modes = search.metrics, search.modes
    searcher = OptunaSearch(
        space=functools.partial(sample_space, space=space),
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        sampler=_optuna_sampler(search.sampler),
    )
    scheduler = None
    if search.scheduler.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=search.scheduler.max_t or cfg.train.epochs,
                                  grace_period=search.scheduler.grace_period,
                                  reduction_factor=search.scheduler.reduction_factor)
    return run_trials(
        cfg, folder, kind=kind, param_space={}, spec=spec, num_samples=search.num_samples,
        max_concurrent=search.max_concurrent, metrics=metrics, modes=modes, search_alg=searcher,
        scheduler=scheduler, resume=resume, teacher_path=teacher_path, printer=printer,
        parent_params=parent_params, experiment=experiment, parent_run_id=parent_run_id,
        extra_callbacks=extra_callbacks,
    )


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The trial that did best on ``metric`` among those that did not fail (None when there is none).

    Ties (a metric on a few hundred test images often ties) go to the trial the searcher proposed first —
    Tune numbers trials in that order (``<experiment>_00003``) — not to whichever happened to start first, so
    the same search always chooses the same trial.
    """
    ranked = [row for row in rows if row["status"] != "failed" and isinstance(row.get(metric), (int, float))
              and math.isfinite(row[metric])]
    if not ranked:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(ranked, key=lambda row: (sign * row[metric], -_proposal_index(str(row.get("trial_id", "")))))


def _proposal_index(trial_id: str) -> int:
    suffix = trial_id.rsplit("_", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def plan_sweep(cfg: RunConfig) -> TrialsPlan:
    """Validate the search section and size the trials without starting anything heavy."""
    search = validate_space(cfg)
    return plan_trials(cfg, "sweep", search.num_samples, search.max_concurrent, details={
        "metric": search.metric, "mode": search.mode, "sampler": search.sampler.model_dump(),
        "scheduler": search.scheduler.model_dump(),
        "space": {k: v.model_dump(exclude_none=True) for k, v in search.space.items()}})


def run_sweep(cfg: RunConfig, folder: Path, resume: bool = False, printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the Optuna search of ``cfg.search``; write results, ``best.yaml`` and plots into ``folder``.

    With ``eval.verify`` the chosen trials are verified (:mod:`crdnd_ray.engine.verify`) before the tables are
    written. Interrupted (Ctrl-C, SIGTERM), it writes the tables of the trials recorded so far, then raises
    KeyboardInterrupt naming the ``--resume`` command.
    """
    search = validate_space(cfg)
    teacher_path = prepare_teacher(cfg, printer)
    spec = TrialSpec(overrides=lambda config: {k: v for k, v in config.items()},
                     name=lambda trial: f"trial-{trial.trial_id}", tags=lambda config: {},
                     shown_params=tuple(search.space))
    result = run_search(cfg, folder, search, resolve_space(cfg, search.space, "search.space"), kind="sweep",
                        spec=spec, resume=resume, teacher_path=teacher_path, printer=printer,
                        parent_params={f"search.{k}": v for k, v in flatten(search.model_dump(mode="json")).items()})
    if cfg.eval.verify and not result.interrupted:
        verify_rows(folder, result.rows, sweep_choice(result.rows, cfg), result.recorder, result.parent_run_id,
                    printer)
    outcome = write_sweep_results(cfg, folder, result)
    result.raise_if_interrupted()
    return outcome


def _optuna_sampler(sampler: SamplerConfig) -> Any:
    import optuna

    startup = {} if sampler.startup_trials is None else {"n_startup_trials": sampler.startup_trials}
    if sampler.kind == "tpe":
        return optuna.samplers.TPESampler(seed=sampler.seed, **startup)
    if sampler.kind == "gp":
        return optuna.samplers.GPSampler(seed=sampler.seed, **startup)
    if sampler.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=sampler.seed)
    return optuna.samplers.RandomSampler(seed=sampler.seed)


def write_sweep_results(cfg: RunConfig, folder: Path, result: TrialsResult) -> dict[str, Any]:
    """Write the results table (CSV, Parquet), ``best.yaml``, the Pareto front and plots; attach them to the
    sweep's parent run. ``best.yaml`` is the trial with the highest verified AutoAttack accuracy when trials
    were verified (``eval.verify``), else the best by the searched metric."""
    import pandas as pd

    rows = result.rows
    search = cfg.search
    assert search is not None
    metrics, modes = search.metrics, search.modes
    frame = pd.DataFrame(rows)
    written = []
    for suffix in ("csv", "parquet"):
        path = folder / f"results.{suffix}"
        tables.write_table(frame, path)
        written.append(path)
    best = best_row(rows, VERIFY_COLUMNS[0], "max") or best_row(rows, metrics[0], modes[0])
    if best is not None:
        overrides = {key.removeprefix("param."): value for key, value in best.items() if key.startswith("param.")}
        best_cfg = cfg.with_overrides({**overrides, "search": None, "ablation": None}, source="the best trial")
        best_path = folder / "best.yaml"
        best_path.write_text(f"# best trial {best['trial_id']} of the sweep in {folder}\n"
                             + yaml.safe_dump(best_cfg.model_dump(mode="json", exclude_none=True), sort_keys=False))
        written.append(best_path)
    front = []
    if len(metrics) > 1:
        front = pareto_rows(rows, metrics, modes)
        path = folder / "pareto.csv"
        tables.write_table(pd.DataFrame(front), path)
        written.append(path)
        if front:
            plots.pareto_front(frame[frame["status"] != "failed"], metrics[0], metrics[1], folder / "pareto.png")
            written.append(folder / "pareto.png")
    if best is not None:
        plots.optimisation_history(frame[frame["status"] != "failed"], metrics[0], modes[0], folder / "history.png")
        written.append(folder / "history.png")
    result.attach(written, {**totals(rows), **({f"best_trial_{m}": best[m] for m in (*metrics, *VERIFY_COLUMNS)
                                                if isinstance(best.get(m), (int, float))} if best else {})})
    return {"rows": rows, "best": best, "pareto": front, "files": written, "parent_run_id": result.parent_run_id}
