"""Ray Tune + Optuna: a search space becomes Tune trials, each one training run.

``run_trials`` is the one mechanism behind both ``crdnd-ray sweep`` (Optuna proposes each trial's
overrides) and ``crdnd-ray ablate`` (a grid of variant × seed overrides). Each trial trains in its Tune
trial when it has one worker (no Ray Train start-up), or as a Ray Train run with N workers otherwise.
The driver prepares the teacher once, records every trial in MLflow (the only writer), shows a compact
live table, and writes the results table when the trials end — including after a failure or Ctrl-C.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from crdnd_ray.config import ConfigError, ParameterSpec, RunConfig, SearchConfig, flatten

__all__ = ["SweepPlan", "TrialSpec", "plan_sweep", "run_sweep", "run_trials", "sample_space", "validate_space"]

STATE_FILE = "sweep_state.json"
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
    per_epoch = [f"{name}_acc" for name in cfg.eval.epoch_attacks] + list(PER_EPOCH_EXTRA)
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


@dataclass
class TrialSpec:
    """How the Tune driver turns a trial's config into a run: overrides, MLflow name and tags."""

    overrides: Callable[[dict[str, Any]], dict[str, Any]]
    name: Callable[[Any], str]
    tags: Callable[[dict[str, Any]], dict[str, str]]


@dataclass
class SweepPlan:
    """The resolved plan of a sweep or ablation (what ``--dry-run`` prints)."""

    kind: str
    trials: int
    concurrent: int
    resources: str
    in_process: bool
    epochs: int
    details: dict[str, Any] = field(default_factory=dict)


def _trial_function(config: dict[str, Any], base: dict[str, Any], folder: str, teacher_path: str | None,
                    plan: Any, overrides: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The Tune function trainable: train one trial in-process or as a Ray Train run."""
    import ray.tune
    from ray.tune import Checkpoint

    from crdnd_ray.engine.loop import LoopContext, run_training
    from crdnd_ray.teachers import load_teacher

    cfg = RunConfig.model_validate(base).with_overrides(overrides(config), source="the trial's parameters")
    trial_id = ray.tune.get_context().get_trial_id()
    output_dir = Path(folder) / "trials" / trial_id
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.run_dict(), sort_keys=False))
    if plan.in_process:
        restored = ray.tune.get_checkpoint()
        resume_from = Path(restored.to_directory()) if restored is not None else None
        teacher = load_teacher(cfg, Path(teacher_path)) if teacher_path else None

        def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
            checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            ray.tune.report(metrics, checkpoint=checkpoint)

        run_training(cfg, output_dir, teacher, LoopContext(report=report, resume_from=resume_from))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from crdnd_ray.engine.distributed import build_trainer

    trainer = build_trainer(cfg, output_dir, Path(teacher_path) if teacher_path else None, plan,
                            name=f"train-trial_id={trial_id}", callbacks=[TuneReportCallback()], resume=True)
    trainer.fit()


def _trial_status(trial: Any, completed: bool = False) -> tuple[str, str]:
    """``finished``, ``stopped_early`` or ``failed`` (with the reason) for an ended trial, else Tune's status."""
    if trial.status == "ERROR":
        return "failed", _error_text(trial)
    final = trial.last_result or {}
    if completed or trial.status == "TERMINATED":
        return ("finished", "") if "best_epoch" in final else (
            "stopped_early", "stopped by the scheduler")
    return trial.status.lower(), ""


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    text = ""
    if path and Path(path).exists():
        text = Path(path).read_text()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line.strip()[:500]
    return lines[-1].strip()[:500] if lines else "the trial raised an error"


def _live_table(*args: Any) -> Any:
    """A Tune callback that prints one compact line per trial event (Ray's own output is silenced).

    Built on first use so that importing this module does not import Ray Tune.
    """
    from ray.tune import Callback

    class LiveTable(Callback):
        def __init__(self, total: int, metrics: list[str], spec: TrialSpec, printer: Callable[[str], None]):
            self.total, self.metrics, self.spec, self.printer = total, metrics, spec, printer
            self.done = 0

        def __getstate__(self) -> dict[str, Any]:
            """Tune pickles its run config for resuming; the printer stays with the live driver."""
            return {**self.__dict__, "printer": print}

        def _line(self, trial: Any, what: str) -> None:
            result = trial.last_result or {}
            shown = " ".join(f"{m}={result[m]:.2f}" for m in self.metrics if isinstance(result.get(m), (int, float)))
            params = " ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in self.spec.overrides(trial.config).items())
            self.printer(f"[{self.done}/{self.total}] {self.spec.name(trial)} {what} "
                         f"epoch={result.get('training_iteration', 0)} {shown}  {params}")

        def on_trial_start(self, iteration, trials, trial, **info):
            self._line(trial, "started")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            status, _ = _trial_status(trial, completed=True)
            self._line(trial, status.replace("_", " "))

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            self._line(trial, f"FAILED ({_error_text(trial)})")

    return LiveTable(*args)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_trials(cfg: RunConfig, folder: Path, *, kind: str, param_space: dict[str, Any], spec: TrialSpec,
               num_samples: int, max_concurrent: int, metrics: list[str], modes: list[str],
               search_alg: Any = None, scheduler: Any = None, resume: bool = False,
               teacher_path: Path | None = None, printer: Callable[[str], None] = print,
               parent_params: dict[str, Any] | None = None,
               extra_callbacks: list[Any] | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Run trials with Ray Tune and return one row per trial plus the MLflow parent run id.

    Each row holds the trial's overrides, status (finished / stopped_early / failed), reason, epochs
    run, wall time and metrics (the last epoch's, including ``best_*``/``last_*`` final metrics).
    """
    import ray
    from ray import tune
    from ray.tune import FailureConfig, RunConfig as TuneRunConfig, TuneConfig, Tuner

    from crdnd_ray.engine.distributed import init_ray, plan_resources

    folder = Path(folder).resolve()
    cluster = init_ray(cfg.scaling, log_to_driver=False)
    in_process = cfg.scaling.num_workers == 1 and cfg.scaling.in_process_single_worker
    plan = plan_resources(cfg.scaling, cluster, concurrent_trials=max_concurrent, in_process=in_process)
    _link_ray_logs(folder)
    state = _load_state(folder) if resume else {}
    recorder, parent_id = _start_recording(cfg, folder, kind, state, parent_params or {})
    _save_state(folder, {**state, "parent_run_id": parent_id, "kind": kind})
    total = _expected_trials(param_space, num_samples)
    callbacks: list[Any] = [_live_table(total, metrics, spec, printer), *(extra_callbacks or [])]
    if recorder is not None:
        from crdnd_ray.tracking import TrialInfo, TrialRecorder

        base_flat = flatten(cfg.run_dict())

        def describe(trial: Any) -> TrialInfo:
            overrides = spec.overrides(trial.config)
            params = {**base_flat, **overrides}
            return TrialInfo(name=spec.name(trial), params=params, sampled=overrides,
                             tags={"trial_id": trial.trial_id, f"{kind}_id": parent_id or "", "kind": kind,
                                   "method": str(params.get("method.name")),
                                   "seed": str(params.get("experiment.seed")), **spec.tags(trial.config)},
                             output_dir=folder / "trials" / trial.trial_id)

        callbacks.append(TrialRecorder(recorder, parent_id, describe))

    trainable = tune.with_resources(
        tune.with_parameters(_trial_function, base=cfg.run_dict(), folder=str(folder),
                             teacher_path=str(teacher_path.resolve()) if teacher_path else None, plan=plan,
                             overrides=spec.overrides),
        plan.trial_resources,
    )
    tune_dir = folder / "tune"
    printer(f"{kind}: {num_samples} trial(s), {plan.describe()}; {'trains in the Tune trial' if in_process else 'Ray Train per trial'}")
    started = time.perf_counter()
    run_config = TuneRunConfig(name=kind, storage_path=str(tune_dir), callbacks=callbacks, verbose=0,
                               failure_config=FailureConfig(max_failures=0))
    if resume and Tuner.can_restore(str(tune_dir / kind)):
        tuner = Tuner.restore(str(tune_dir / kind), trainable=trainable, resume_unfinished=True,
                              resume_errored=False, restart_errored=False)
        tuner._local_tuner._run_config.callbacks = callbacks
    else:
        tune_config = TuneConfig(num_samples=num_samples, max_concurrent_trials=plan.concurrent,
                                 reuse_actors=plan.in_process,
                                 search_alg=search_alg, scheduler=scheduler,
                                 metric=metrics[0] if len(metrics) == 1 else None,
                                 mode=modes[0] if len(modes) == 1 else None)
        tuner = Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    interrupted, failure = False, None
    try:
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    except Exception as error:
        failure = error
    rows = _rows_from_folder(folder, tune_dir / kind, spec)
    if failure is not None:
        from crdnd_ray.engine.distributed import TrainingFailed, root_cause

        ray.shutdown()
        raise TrainingFailed(f"Ray Tune stopped the {kind} ({root_cause(failure)}); the {len(rows)} trial(s) it "
                           f"recorded are kept in {folder}; continue with --resume {folder}") from failure
    interrupted = interrupted or len(rows) < total or any(
        row["status"] not in TERMINAL for row in rows)
    if recorder is not None and parent_id is not None and not interrupted:
        recorder.finish(parent_id, "finished")
    printer(f"{kind} {'interrupted' if interrupted else 'done'} in {time.perf_counter() - started:.1f} s "
            f"({len(rows)} trial(s) recorded)")
    if interrupted:
        ray.shutdown()
        raise KeyboardInterrupt(f"continue it with --resume {folder}")
    return rows, parent_id


TERMINAL = ("finished", "stopped_early", "failed")


def _expected_trials(param_space: dict[str, Any], num_samples: int) -> int:
    cells = 1
    for value in param_space.values():
        if isinstance(value, dict) and "grid_search" in value:
            cells *= len(value["grid_search"])
    return num_samples * cells


def _rows_from_folder(folder: Path, experiment_dir: Path, spec: TrialSpec) -> list[dict[str, Any]]:
    """One row per trial from Tune's experiment state (status, config, last result)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_dir))
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        status, reason = _trial_status(trial)
        result = trial.last_result or {}
        row: dict[str, Any] = {"trial": spec.name(trial), "trial_id": trial.trial_id, "status": status,
                               "reason": reason, "epochs": result.get("training_iteration", 0),
                               "wall_time_s": round(result.get("time_total_s", 0.0), 2)}
        row.update({f"param.{k}": v for k, v in spec.overrides(trial.config).items()})
        row.update(spec.tags(trial.config))
        row.update({k: v for k, v in result.items() if _is_metric(k, v)})
        rows.append(row)
    return rows


_NOT_METRICS = {"training_iteration", "time_total_s", "time_this_iter_s", "timestamp", "time_since_restore",
                "iterations_since_restore", "pid", "done", "epoch"}


def _is_metric(key: str, value: Any) -> bool:
    return (key not in _NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)
            and not key.startswith(("config", "node_ip", "hostname", "date", "trial_id", "experiment_tag")))


def _link_ray_logs(folder: Path) -> None:
    """Point ``<folder>/ray_logs`` at this Ray session's log folder (Ray's raw output goes there)."""
    import os

    logs = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "session_latest" / "logs"
    link = folder / "ray_logs"
    if logs.exists() and not link.exists():
        folder.mkdir(parents=True, exist_ok=True)
        link.symlink_to(logs.resolve(), target_is_directory=True)


def _load_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def _start_recording(cfg: RunConfig, folder: Path, kind: str, state: dict[str, Any],
                     params: dict[str, Any]) -> tuple[Any, str | None]:
    if not cfg.tracking.enabled:
        return None, None
    from crdnd_ray.tracking import Recorder

    recorder = Recorder(cfg.tracking, cfg.experiment.name)
    parent_id = state.get("parent_run_id")
    if not parent_id:
        parent_id = recorder.start_parent(kind, f"{kind}-{folder.name}", {**flatten(cfg.run_dict()), **params},
                                          {**recorder.common_tags(), "output_dir": str(folder)})
    return recorder, parent_id


def plan_sweep(cfg: RunConfig) -> SweepPlan:
    """Validate the search section and size the trials without starting anything heavy."""
    search = validate_space(cfg)
    from crdnd_ray.engine.distributed import plan_resources

    in_process = cfg.scaling.num_workers == 1 and cfg.scaling.in_process_single_worker
    cluster = _cluster_for_planning(cfg)
    plan = plan_resources(cfg.scaling, cluster, concurrent_trials=search.max_concurrent, in_process=in_process)
    return SweepPlan(
        kind="sweep", trials=search.num_samples, concurrent=plan.concurrent, resources=plan.describe(),
        in_process=in_process, epochs=cfg.train.epochs,
        details={"metric": search.metric, "mode": search.mode, "sampler": search.sampler.model_dump(),
                 "scheduler": search.scheduler.model_dump(),
                 "space": {k: v.model_dump(exclude_none=True) for k, v in search.space.items()},
                 "cluster": cluster, "warnings": _plan_warnings(cfg)},
    )


def _plan_warnings(cfg: RunConfig) -> list[str]:
    """Problems a real run would hit that a dry run can see without loading anything."""
    import os

    from crdnd_ray.data import CIFAR_FOLDERS

    warnings = []
    if not (cfg.scaling.address or os.environ.get("RAY_ADDRESS")):
        warnings.append("no Ray cluster connected: resources were planned against this machine's CPUs"
                        + (" and the GPUs the plan asks for" if cfg.scaling.use_gpu else ""))
    if cfg.teacher.checkpoint and not Path(cfg.teacher.checkpoint).exists():
        warnings.append(f"teacher.checkpoint '{cfg.teacher.checkpoint}' does not exist yet")
    if cfg.data.name in CIFAR_FOLDERS and not cfg.data.download:
        folder = Path(cfg.data.root) / CIFAR_FOLDERS[cfg.data.name]
        if not folder.exists():
            warnings.append(f"the dataset folder '{folder}' does not exist and data.download is false")
    return warnings


def _cluster_for_planning(cfg: RunConfig) -> dict[str, float]:
    """The resources a dry run plans against: the real cluster when connecting to one, else a GPU-sized
    or this machine's local view (no Ray start for a local dry run)."""
    import os

    if cfg.scaling.address or os.environ.get("RAY_ADDRESS"):
        from crdnd_ray.engine.distributed import init_ray

        return init_ray(cfg.scaling)
    cluster = {"CPU": float(os.cpu_count() or 1)}
    if cfg.scaling.use_gpu:
        cluster["GPU"] = float(max(cfg.scaling.num_workers, 1) * (cfg.search.max_concurrent if cfg.search else 1))
    return cluster


def _pareto(rows: list[dict[str, Any]], metrics: list[str], modes: list[str]) -> list[dict[str, Any]]:
    import numpy as np

    from crdnd_ray.report import pareto_mask

    candidates = [row for row in rows if row["status"] != "failed" and all(
        isinstance(row.get(m), (int, float)) and math.isfinite(row[m]) for m in metrics)]
    if not candidates:
        return []
    values = np.array([[row[m] for m in metrics] for row in candidates], dtype=float)
    return [row for row, keep in zip(candidates, pareto_mask(values, modes)) if keep]


def run_sweep(cfg: RunConfig, folder: Path, resume: bool = False, printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the Optuna search of ``cfg.search``; write results, ``best.yaml`` and plots into ``folder``."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from crdnd_ray.teachers import prepare_teacher

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
                     name=lambda trial: f"trial-{trial.trial_id}", tags=lambda config: {})
    rows, parent_id = run_trials(
        cfg, folder, kind="sweep", param_space={}, spec=spec, num_samples=search.num_samples,
        max_concurrent=search.max_concurrent, metrics=metrics, modes=modes, search_alg=searcher,
        scheduler=scheduler, resume=resume, teacher_path=teacher_path, printer=printer,
        parent_params={f"search.{k}": v for k, v in flatten(search.model_dump(mode="json")).items()},
    )
    return write_sweep_results(cfg, folder, rows, parent_id)


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


def write_sweep_results(cfg: RunConfig, folder: Path, rows: list[dict[str, Any]], parent_id: str | None) -> dict[str, Any]:
    """Write the results table (CSV, Parquet), ``best.yaml``, the Pareto front and plots; log them to MLflow."""
    import pandas as pd

    from crdnd_ray import report

    search = cfg.search
    assert search is not None
    metrics, modes = search.metrics, search.modes
    frame = pd.DataFrame(rows)
    written = []
    for suffix in ("csv", "parquet"):
        path = folder / f"results.{suffix}"
        report.write_table(frame, path)
        written.append(path)
    ranked = [row for row in rows if row["status"] != "failed" and isinstance(row.get(metrics[0]), (int, float))]
    best = None
    if ranked:
        best = (max if modes[0] == "max" else min)(ranked, key=lambda row: row[metrics[0]])
        overrides = {key.removeprefix("param."): value for key, value in best.items() if key.startswith("param.")}
        best_cfg = cfg.with_overrides({**overrides, "search": None, "ablation": None}, source="the best trial")
        best_path = folder / "best.yaml"
        best_path.write_text(f"# best trial {best['trial_id']} of the sweep in {folder}\n"
                             + yaml.safe_dump(best_cfg.model_dump(mode="json", exclude_none=True), sort_keys=False))
        written.append(best_path)
    front = []
    if len(metrics) > 1:
        front = _pareto(rows, metrics, modes)
        path = folder / "pareto.csv"
        report.write_table(pd.DataFrame(front), path)
        written.append(path)
        if front:
            report.pareto_front(frame[frame["status"] != "failed"], metrics[0], metrics[1], folder / "pareto.png")
            written.append(folder / "pareto.png")
    if ranked:
        report.optimisation_history(frame[frame["status"] != "failed"], metrics[0], modes[0], folder / "history.png")
        written.append(folder / "history.png")
    if cfg.tracking.enabled and parent_id:
        from crdnd_ray.tracking import Recorder

        recorder = Recorder(cfg.tracking, cfg.experiment.name)
        recorder.log_artifacts(parent_id, written)
        if best:
            recorder.log_metrics(parent_id, {f"best_trial_{m}": best[m] for m in metrics if m in best})
    return {"rows": rows, "best": best, "pareto": front, "files": written, "parent_run_id": parent_id}
