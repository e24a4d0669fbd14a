"""Sweeps: what Optuna searches (the ``search`` section), through the one Tune driver of ``engine.trials``.

Optuna (through Ray's ``OptunaSearch``) proposes each trial's overrides, single- or multi-objective, with ASHA
early stopping; the trials run, are recorded and resumed by :func:`crdnd_ray.engine.trials.run_trials`. The
sweep folder then gets ``results.csv``/``.parquet``, ``best.yaml``, the Pareto front and plots — also after
a failure or Ctrl-C, for the trials that were recorded.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import yaml

from crdnd_ray import plots, tables
from crdnd_ray.analysis import pareto_rows
from crdnd_ray.config import ConfigError, ParameterSpec, RunConfig, SearchConfig, flatten
from crdnd_ray.engine.cost import totals
from crdnd_ray.engine.preflight import check_config
from crdnd_ray.engine.teachers import prepare_teacher
from crdnd_ray.engine.verify import VERIFY_COLUMNS, sweep_choice, verify_rows
from crdnd_ray.engine.trials import TrialSpec, TrialsPlan, TrialsResult, plan_trials, run_trials

__all__ = ["plan_sweep", "run_sweep", "sample_space", "validate_space", "write_sweep_results"]

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
    run = cfg.run_dict()
    for key, spec in search.space.items():
        probe = spec.values[0] if spec.type == "choice" else (spec.low if spec.type != "int" else int(spec.low))
        try:
            cfg.with_overrides({key: probe}, source=f"search.space.{key}")
        except ConfigError as error:
            raise ConfigError(f"search.space.{key} does not name a valid config value: {error}") from None
        if key.split(".")[0] not in run:
            raise ConfigError(f"search.space.{key}: '{key.split('.')[0]}' is not a config section.")
    check_config(cfg)
    scheduler = search.scheduler
    max_t = scheduler.max_t or cfg.train.epochs
    if scheduler.kind == "asha" and scheduler.grace_period > max_t:
        raise ConfigError(
            f"search.scheduler.grace_period={scheduler.grace_period} is longer than the {max_t} epochs a trial may "
            "run (search.scheduler.max_t, else train.epochs), so ASHA could never stop a trial. Set grace_period to "
            f"at most {max_t}, or more train.epochs, and run the command again."
        )
    per_epoch = [f"epoch_{name}_acc" for name in cfg.eval.epoch_attacks] + list(PER_EPOCH_EXTRA)
    final = [f"{which}_{name}_acc" for which in ("best", "last") for name in cfg.eval.final_attack_names]
    for metric in search.metrics:
        allowed = per_epoch if search.scheduler.kind == "asha" else per_epoch + final
        if metric not in allowed:
            raise ConfigError(
                f"search.metric '{metric}' is not a metric the trials report"
                + (" every epoch, which ASHA needs" if search.scheduler.kind == "asha" else "")
                + f". Choose one of: {', '.join(allowed)}."
            )
    return search


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


def plan_sweep(cfg: RunConfig) -> TrialsPlan:
    """Validate the search section and size the trials without starting anything heavy."""
    search = validate_space(cfg)
    return plan_trials(cfg, "sweep", search.num_samples, search.max_concurrent, details={
        "metric": search.metric, "mode": search.mode, "sampler": search.sampler.model_dump(),
        "scheduler": search.scheduler.model_dump(),
        "space": {k: v.model_dump(exclude_none=True) for k, v in search.space.items()}})


def run_sweep(cfg: RunConfig, folder: Path, resume: bool = False, printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the Optuna search of ``cfg.search``; write results, ``best.yaml`` and plots into ``folder``.

    Interrupted (Ctrl-C, SIGTERM), it writes the tables of the trials recorded so far, then raises
    KeyboardInterrupt naming the ``--resume`` command.
    """
    from ray.tune.search.optuna import OptunaSearch

    search = validate_space(cfg)
    teacher_path = prepare_teacher(cfg, printer)
    metrics, modes = search.metrics, search.modes
    searcher = OptunaSearch(
        space=functools.partial(sample_space, space=search.space),
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        sampler=_optuna_sampler(search),
    )
    scheduler = None
    if search.scheduler.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=search.scheduler.max_t or cfg.train.epochs,
                                  grace_period=search.scheduler.grace_period,
                                  reduction_factor=search.scheduler.reduction_factor)
    spec = TrialSpec(overrides=lambda config: {k: v for k, v in config.items()},
                     name=lambda trial: f"trial-{trial.trial_id}", tags=lambda config: {},
                     shown_params=tuple(search.space))
    result = run_trials(
        cfg, folder, kind="sweep", param_space={}, spec=spec, num_samples=search.num_samples,
        max_concurrent=search.max_concurrent, metrics=metrics, modes=modes, search_alg=searcher,
        scheduler=scheduler, resume=resume, teacher_path=teacher_path, printer=printer,
        parent_params={f"search.{k}": v for k, v in flatten(search.model_dump(mode="json")).items()},
    )
    if cfg.eval.verify and not result.interrupted:
        verify_rows(folder, result.rows, sweep_choice(result.rows, cfg), result.recorder, result.parent_run_id,
                    printer)
    outcome = write_sweep_results(cfg, folder, result)
    result.raise_if_interrupted()
    return outcome


def _ranked(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    return [row for row in rows if row["status"] != "failed" and isinstance(row.get(metric), (int, float))]


def _optuna_sampler(search: SearchConfig) -> Any:
    import optuna

    seed = search.sampler.seed
    kind = search.sampler.kind
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


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
    ranked = _ranked(rows, metrics[0])
    verified = _ranked(rows, VERIFY_COLUMNS[0])
    best = None
    if verified:
        best = max(verified, key=lambda row: row[VERIFY_COLUMNS[0]])
    elif ranked:
        best = (max if modes[0] == "max" else min)(ranked, key=lambda row: row[metrics[0]])
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
    if ranked:
        plots.optimisation_history(frame[frame["status"] != "failed"], metrics[0], modes[0], folder / "history.png")
        written.append(folder / "history.png")
    result.attach(written, {**totals(rows), **({f"best_trial_{m}": best[m] for m in (*metrics, *VERIFY_COLUMNS)
                                                if isinstance(best.get(m), (int, float))} if best else {})})
    return {"rows": rows, "best": best, "pareto": front, "files": written, "parent_run_id": result.parent_run_id}
