"""The one Ray Tune driver behind sweeps and ablations: trials, their recording, progress and result rows.

:func:`run_trials` turns a parameter space (Optuna's proposals for a sweep, a grid of variant × seed cells
for an ablation) into Tune trials. A trial with one worker trains inside its Tune trial (no Ray Train
start-up); with N workers it is a Ray Train run. The driver is the only writer to the tracking store: one
:class:`TrialRecorder` callback feeds each trial's reports into its :class:`~crdnd_ray.tracking.RunRecord`.
Status, reason and rows come from :func:`trial_status`, which applies :func:`crdnd_ray.runs.run_status`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from crdnd_ray import runs
from crdnd_ray.config import RunConfig, flatten
from crdnd_ray.engine.distributed import TrainingFailed, build_trainer, init_ray, root_cause
from crdnd_ray.engine.loop import LoopContext, run_training
from crdnd_ray.engine.resources import ResourcePlan, plan_resources
from crdnd_ray.engine.teachers import load_teacher
from crdnd_ray.tracking.record import RunRecord
from crdnd_ray.tracking.store import Recorder

__all__ = ["TERMINAL", "TrialRecorder", "TrialSpec", "TrialsPlan", "TrialsResult", "loop_report", "plan_trials", "run_trials",
           "start_parent", "trial_error", "trial_status"]

logger = logging.getLogger(__name__)

TERMINAL = ("finished", "stopped_early", "failed")
TUNE_KEYS = frozenset({
    "training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore", "timesteps_total",
    "timesteps_since_restore", "iterations_since_restore", "episodes_total", "timestamp", "pid", "node_ip",
    "hostname", "date", "config", "done", "trial_id", "experiment_tag", "experiment_id", "checkpoint_dir_name",
    "should_checkpoint", "warmup_time", "checkpoint_path",
})
"""Keys that Ray Tune adds to every result; what remains is the loop's own report."""


def loop_report(result: dict[str, Any] | None) -> dict[str, Any]:
    """A Tune result without Tune's bookkeeping: the row that the training loop reported."""
    return {key: value for key, value in (result or {}).items() if key not in TUNE_KEYS}


@dataclass
class TrialSpec:
    """How a trial's Tune config becomes a run: its overrides of the base config, its name and its tags."""

    overrides: Callable[[dict[str, Any]], dict[str, Any]]
    name: Callable[[Any], str]
    tags: Callable[[dict[str, Any]], dict[str, str]]


@dataclass
class TrialsResult:
    """What :func:`run_trials` returns: one row per trial, and the parent run that files can be attached to."""

    rows: list[dict[str, Any]]
    parent_run_id: str | None
    recorder: Recorder | None = None

    def attach(self, files: list[Path], metrics: dict[str, Any] | None = None) -> None:
        """Upload ``files`` (result tables, plots) and ``metrics`` to the parent run (nothing when not tracking)."""
        if self.recorder is None or self.parent_run_id is None:
            return
        self.recorder.log_artifacts(self.parent_run_id, files)
        if metrics:
            self.recorder.log_metrics(self.parent_run_id, metrics)


@dataclass
class TrialsPlan:
    """The resolved plan of a sweep or ablation (what ``--dry-run`` prints)."""

    kind: str
    trials: int
    concurrent: int
    resources: str
    in_process: bool
    epochs: int
    details: dict[str, Any] = field(default_factory=dict)


def trial_error(trial: Any, max_lines: int = 30) -> str:
    """The error of a failed trial: its last line (the exception) first, then the traceback's head and tail."""
    text = ""
    try:
        error_file = trial.error_file
    except Exception:  # noqa: BLE001 - the local staging path needs a running Ray session
        error_file = None
    if error_file and Path(error_file).is_file():
        text = Path(error_file).read_text(errors="replace")
    if not text.strip():
        try:
            text = str(trial.get_error() or "")
        except Exception:  # noqa: BLE001 - the trial's storage may be gone
            text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "The trial failed without an error message."
    summary = lines[-1].strip()
    if len(lines) > max_lines:
        lines = lines[: max_lines - 6] + ["..."] + lines[-5:]
    return summary + "\n\n" + "\n".join(lines)


def trial_status(trial: Any) -> tuple[str, str]:
    """``(status, reason)`` of a Tune trial by :func:`crdnd_ray.runs.run_status`; ``pending`` before it starts."""
    if trial.status == "PENDING":
        return "pending", ""
    error = trial_error(trial) if trial.status == "ERROR" else None
    return runs.run_status(loop_report(trial.last_result), ended=trial.status in ("TERMINATED", "ERROR"), error=error)


def _trial_function(config: dict[str, Any], base: dict[str, Any], folder: str, teacher_path: str | None,
                    plan: ResourcePlan, overrides: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The Tune function trainable: train one trial in-process or as a Ray Train run."""
    cfg = RunConfig.model_validate(base).with_overrides(overrides(config), source="the trial's parameters")
    output_dir = Path(folder) / "trials" / tune.get_context().get_trial_id()
    runs.write_config(output_dir, cfg)
    if plan.in_process:
        restored = tune.get_checkpoint()
        teacher = load_teacher(cfg, Path(teacher_path)) if teacher_path else None

        def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
            checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            tune.report(metrics, checkpoint=checkpoint)

        resume_from = Path(restored.to_directory()) if restored is not None else None
        run_training(cfg, output_dir, teacher, LoopContext(report=report, resume_from=resume_from))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = build_trainer(cfg, output_dir, Path(teacher_path) if teacher_path else None, plan,
                            name=f"train-trial_id={tune.get_context().get_trial_id()}",
                            callbacks=[TuneReportCallback()], resume=True)
    trainer.fit()


class TrialRecorder(tune.Callback):
    """Records every trial as a child MLflow run of the sweep's or ablation's parent run.

    It runs in the Tune driver, the only process that writes to the tracking store. A trial restored on
    resume reuses its child run (found by its ``trial_id`` tag) instead of creating a duplicate. Every hook
    logs its own errors, so a recording problem never stops the trials.
    """

    def __init__(self, recorder: Recorder, parent_run_id: str, kind: str, spec: TrialSpec, base: dict[str, Any],
                 folder: Path) -> None:
        self.recorder, self.parent_run_id, self.kind, self.spec = recorder, parent_run_id, kind, spec
        self.base_params = flatten(base)
        self.folder = Path(folder)
        self.records: dict[str, RunRecord] = {}

    def record(self, trial: Any) -> RunRecord:
        """The trial's record: known, an existing child run of the parent (resume), or a new child run."""
        trial_id = trial.trial_id
        if trial_id not in self.records:
            folder = self.folder / "trials" / trial_id
            existing = self.recorder.find_child(self.parent_run_id, trial_id)
            if existing is not None:
                self.records[trial_id] = RunRecord.reopen(self.recorder, existing, folder)
            else:
                overrides = self.spec.overrides(trial.config)
                params = {**self.base_params, **overrides}
                tags = {"trial_id": trial_id, f"{self.kind}_id": self.parent_run_id, "kind": self.kind,
                        "method": str(params.get("method.name")), "seed": str(params.get("experiment.seed")),
                        **self.spec.tags(trial.config)}
                self.records[trial_id] = RunRecord.start(self.recorder, self.spec.name(trial), params, tags, folder,
                                                         parent_run_id=self.parent_run_id, sampled=overrides)
        return self.records[trial_id]

    def _guard(self, what: str, trial: Any, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception:  # noqa: BLE001 - a recording problem must not fail the trials
            logger.exception("MLflow recording of trial %s failed while %s.", getattr(trial, "trial_id", "?"), what)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """Open (or reopen) the trial's child run."""
        self._guard("opening its run", trial, lambda: self.record(trial))

    def on_trial_restore(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """Reopen the child run of a restored trial."""
        self._guard("reopening its run", trial, lambda: self.record(trial))

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        """Feed the loop's report to the trial's record."""
        self._guard("logging a result", trial, lambda: self.record(trial).report(loop_report(result)))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """Finish the record: finished when the final metrics arrived, else stopped early."""
        self._guard("finishing its run", trial, lambda: self.record(trial).finish())

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """Note a failure that Tune will retry."""
        self._guard("noting a retry", trial, lambda: self.recorder.set_tags(
            self.record(trial).run_id, {"status": "retrying", "last_failure": trial_error(trial)}))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """Finish the record as failed, with the trial's error as the reason."""
        self._guard("marking its run failed", trial, lambda: self.record(trial).finish(error=trial_error(trial)))


class LiveTable(tune.Callback):
    """Prints one compact line per trial event (Ray's own output is silenced)."""

    def __init__(self, total: int, metrics: list[str], spec: TrialSpec, printer: Callable[[str], None]) -> None:
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

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._line(trial, "started")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.done += 1
        self._line(trial, runs.run_status(loop_report(trial.last_result), ended=True)[0].replace("_", " "))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.done += 1
        self._line(trial, f"FAILED ({trial_error(trial).splitlines()[0]})")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_trials(cfg: RunConfig, folder: Path, *, kind: str, param_space: dict[str, Any], spec: TrialSpec,
               num_samples: int, max_concurrent: int, metrics: list[str], modes: list[str],
               search_alg: Any = None, scheduler: Any = None, resume: bool = False,
               teacher_path: Path | None = None, printer: Callable[[str], None] = print,
               parent_params: dict[str, Any] | None = None,
               extra_callbacks: list[Any] | None = None, experiment: str | None = None,
               parent_run_id: str | None = None) -> TrialsResult:
    """Run trials with Ray Tune and return one row per trial with the MLflow parent run.

    Each row holds the trial's overrides, status (finished / stopped_early / failed), reason, epochs run,
    wall time and metrics (the last report's, including the final ``best_*``/``last_*``). An interrupted run
    (Ctrl-C) raises KeyboardInterrupt naming the ``--resume`` command after the rows are kept on disk.
    ``experiment`` names the Tune experiment under ``<folder>/tune`` (default ``kind``), so that several stages
    can share one folder; with ``parent_run_id`` the trials are recorded under that parent run (made by
    :func:`start_parent`), which the caller finishes, instead of a parent of their own.
    """
    folder = Path(folder).resolve()
    name = experiment or kind
    cluster = init_ray(cfg.scaling, log_to_driver=False)
    in_process = cfg.scaling.num_workers == 1 and cfg.scaling.in_process_single_worker
    plan = plan_resources(cfg.scaling, cluster, concurrent_trials=max_concurrent, in_process=in_process)
    _link_ray_logs(folder)
    if parent_run_id is None:
        recorder, parent_id = start_parent(cfg, folder, kind, resume, parent_params or {})
    else:
        recorder, parent_id = Recorder(cfg.tracking, cfg.experiment.name), parent_run_id
    total = _expected_trials(param_space, num_samples)
    callbacks: list[Any] = [LiveTable(total, metrics, spec, printer), *(extra_callbacks or [])]
    if recorder is not None and parent_id is not None:
        callbacks.append(TrialRecorder(recorder, parent_id, kind, spec, cfg.run_dict(), folder))
    trainable = tune.with_resources(
        tune.with_parameters(_trial_function, base=cfg.run_dict(), folder=str(folder),
                             teacher_path=str(teacher_path.resolve()) if teacher_path else None, plan=plan,
                             overrides=spec.overrides),
        plan.trial_resources,
    )
    tune_dir = folder / "tune"
    printer(f"{name}: {total} trial(s), {plan.describe()}; "
            f"{'trains in the Tune trial' if in_process else 'Ray Train per trial'}")
    started = time.perf_counter()
    run_config = tune.RunConfig(name=name, storage_path=str(tune_dir), callbacks=callbacks, verbose=0,
                                failure_config=tune.FailureConfig(max_failures=0))
    if resume and tune.Tuner.can_restore(str(tune_dir / name)):
        tuner = tune.Tuner.restore(str(tune_dir / name), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        tuner._local_tuner._run_config.callbacks = callbacks
    else:
        tune_config = tune.TuneConfig(num_samples=num_samples, max_concurrent_trials=plan.concurrent,
                                      reuse_actors=plan.in_process, search_alg=search_alg, scheduler=scheduler,
                                      metric=metrics[0] if len(metrics) == 1 else None,
                                      mode=modes[0] if len(modes) == 1 else None)
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    interrupted, failure = False, None
    try:
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    except Exception as error:  # noqa: BLE001 - reported below with the trials that were kept
        failure = error
    rows = _rows(tune_dir / name, spec)
    if failure is not None:
        ray.shutdown()
        raise TrainingFailed(f"Ray Tune stopped the {name} ({root_cause(failure)}); the {len(rows)} trial(s) it "
                             f"recorded are kept in {folder}; continue with --resume {folder}") from failure
    interrupted = interrupted or len(rows) < total or any(row["status"] not in TERMINAL for row in rows)
    if recorder is not None and parent_id is not None and not interrupted and parent_run_id is None:
        recorder.finish(parent_id, "finished")
    printer(f"{name} {'interrupted' if interrupted else 'done'} in {time.perf_counter() - started:.1f} s "
            f"({len(rows)} trial(s) recorded)")
    if interrupted:
        ray.shutdown()
        raise KeyboardInterrupt(f"continue it with --resume {folder}")
    return TrialsResult(rows, parent_id, recorder)


def _expected_trials(param_space: dict[str, Any], num_samples: int) -> int:
    cells = 1
    for value in param_space.values():
        if isinstance(value, dict) and "grid_search" in value:
            cells *= len(value["grid_search"])
    return num_samples * cells


def _rows(experiment_dir: Path, spec: TrialSpec) -> list[dict[str, Any]]:
    """One row per trial from Tune's experiment state: name, status, reason, epochs, parameters, metrics."""
    analysis = tune.ExperimentAnalysis(str(experiment_dir))
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        status, reason = trial_status(trial)
        result = trial.last_result or {}
        row: dict[str, Any] = {"trial": spec.name(trial), "trial_id": trial.trial_id, "status": status,
                               "reason": reason.split("\n", 1)[0], "epochs": result.get("training_iteration", 0),
                               "wall_time_s": round(result.get("time_total_s", 0.0), 2)}
        row.update({f"param.{k}": v for k, v in spec.overrides(trial.config).items()})
        row.update(spec.tags(trial.config))
        row.update({k: v for k, v in loop_report(result).items()
                    if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)})
        rows.append(row)
    return rows


def _link_ray_logs(folder: Path) -> None:
    """Point ``<folder>/ray_logs`` at this Ray session's log folder (Ray's raw output goes there)."""
    logs = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "session_latest" / "logs"
    link = folder / "ray_logs"
    if logs.exists() and not link.exists():
        folder.mkdir(parents=True, exist_ok=True)
        link.symlink_to(logs.resolve(), target_is_directory=True)


def start_parent(cfg: RunConfig, folder: Path, kind: str, resume: bool,
                 params: dict[str, Any]) -> tuple[Recorder | None, str | None]:
    """The recorder and the parent run of this sweep or ablation (the one in ``run.json`` when resuming)."""
    runs.update_run_info(folder, kind=kind)
    if not cfg.tracking.enabled:
        return None, None
    recorder = Recorder(cfg.tracking, cfg.experiment.name)
    parent_id = runs.read_run_info(folder).get("mlflow_run_id") if resume else None
    if not parent_id:
        parent_id = recorder.start_parent(kind, f"{kind}-{folder.name}", {**flatten(cfg.run_dict()), **params},
                                          {"output_dir": str(folder)})
        runs.update_run_info(folder, mlflow_run_id=parent_id, tracking_uri=recorder.tracking_uri)
    return recorder, parent_id


def plan_trials(cfg: RunConfig, kind: str, trials: int, max_concurrent: int,
                details: dict[str, Any] | None = None) -> TrialsPlan:
    """Size ``trials`` trials of ``cfg`` against the cluster without starting anything heavy."""
    in_process = cfg.scaling.num_workers == 1 and cfg.scaling.in_process_single_worker
    cluster = _cluster_for_planning(cfg, max_concurrent)
    plan = plan_resources(cfg.scaling, cluster, concurrent_trials=max_concurrent, in_process=in_process)
    return TrialsPlan(kind=kind, trials=trials, concurrent=plan.concurrent, resources=plan.describe(),
                      in_process=in_process, epochs=cfg.train.epochs,
                      details={**(details or {}), "cluster": cluster, "warnings": _plan_warnings(cfg)})


def _plan_warnings(cfg: RunConfig) -> list[str]:
    """Problems a real run would hit that a dry run can see without loading anything."""
    from crdnd_ray.data import CIFAR_FOLDERS

    warnings = []
    if not (cfg.scaling.address or os.environ.get("RAY_ADDRESS")):
        warnings.append("no Ray cluster connected: resources were planned against this machine's CPUs"
                        + (" and the GPUs the plan asks for" if cfg.scaling.use_gpu else ""))
    if cfg.teacher.checkpoint and not Path(cfg.teacher.checkpoint).exists():
        warnings.append(f"teacher.checkpoint '{cfg.teacher.checkpoint}' does not exist yet")
    if cfg.data.name in CIFAR_FOLDERS and not cfg.data.download:
        data_folder = Path(cfg.data.root) / CIFAR_FOLDERS[cfg.data.name]
        if not data_folder.exists():
            warnings.append(f"the dataset folder '{data_folder}' does not exist and data.download is false")
    return warnings


def _cluster_for_planning(cfg: RunConfig, max_concurrent: int) -> dict[str, float]:
    """The resources a dry run plans against: the real cluster when connecting to one, else this machine's
    CPUs (and, when the config asks for GPUs, as many as the plan needs), without starting Ray."""
    if cfg.scaling.address or os.environ.get("RAY_ADDRESS"):
        return init_ray(cfg.scaling)
    cluster = {"CPU": float(os.cpu_count() or 1)}
    if cfg.scaling.use_gpu:
        cluster["GPU"] = float(max(cfg.scaling.num_workers, 1) * max_concurrent)
    return cluster
