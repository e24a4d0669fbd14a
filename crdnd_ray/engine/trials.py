"""The one Ray Tune driver behind sweeps and ablations: trials, their recording, progress and result rows.

:func:`run_trials` turns a parameter space (Optuna's proposals for a sweep, a grid of variant × seed cells
for an ablation) into Tune trials. A trial with one worker trains inside its Tune trial (no Ray Train
start-up); with N workers it is a Ray Train run. The driver is the only writer to the tracking store: the
callbacks of ``engine.callbacks`` record each trial and show the progress. Status, reason and rows come from
``callbacks.trial_status``, which applies :func:`crdnd_ray.runs.run_status`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from crdnd_ray import runs
from crdnd_ray.config import RunConfig, flatten
from crdnd_ray.engine.callbacks import TrialRecorder, TrialSpec, TrialsProgress, loop_report, trial_status
from crdnd_ray.engine.distributed import TrainingFailed, build_trainer, init_ray, node_cpus, root_cause
from crdnd_ray.engine.loop import LoopContext, run_training
from crdnd_ray.engine.resources import ResourcePlan, plan_resources
from crdnd_ray.engine.teachers import load_teacher
from crdnd_ray.logs import route_library_logs
from crdnd_ray.tracking import links
from crdnd_ray.tracking.store import Recorder
from crdnd_ray.tracking.uris import TrackingUnavailable
from crdnd_ray.tracking.sync import sync_trials

__all__ = ["TERMINAL", "TrialSpec", "TrialsPlan", "TrialsResult", "plan_trials", "run_trials", "start_parent"]

TERMINAL = ("finished", "stopped_early", "failed", "killed")
VIEW_METRICS = ("best_clean_acc", "best_pgd20_acc")
"""Metrics the MLflow UI view of a sweep or ablation shows after its own ranking metrics."""


@dataclass
class TrialsResult:
    """What :func:`run_trials` returns: one row per trial, and the parent run that files can be attached to."""

    rows: list[dict[str, Any]]
    parent_run_id: str | None
    recorder: Recorder | None = None
    interrupted: bool = False
    folder: Path | None = None

    def attach(self, files: list[Path], metrics: dict[str, Any] | None = None) -> None:
        """Upload ``files`` (result tables, plots) and ``metrics`` to the parent run (nothing when not tracking,
        and only a warning when the store does not answer: ``crdnd-ray sync`` sends them later)."""
        if self.recorder is None or self.parent_run_id is None:
            return
        try:
            self.recorder.log_artifacts(self.parent_run_id, files)
            if metrics:
                self.recorder.log_metrics(self.parent_run_id, metrics)
        except TrackingUnavailable:
            pass

    def finish_parent(self) -> None:
        """End the parent run as finished (for a caller that passed ``parent_run_id``); nothing when interrupted,
        not tracking, or the store does not answer (``crdnd-ray sync`` ends it later)."""
        if self.recorder is None or self.parent_run_id is None or self.interrupted:
            return
        try:
            self.recorder.finish(self.parent_run_id, "finished")
        except TrackingUnavailable:
            pass

    def raise_if_interrupted(self) -> None:
        """After the result files are written: KeyboardInterrupt naming the ``--resume`` command, if interrupted."""
        if self.interrupted:
            raise KeyboardInterrupt(f"continue it with --resume {self.folder}")


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


def _trial_function(config: dict[str, Any], base: dict[str, Any], folder: str, teacher: bytes | None,
                    plan: ResourcePlan, overrides: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The Tune function trainable: train one trial in-process or as a Ray Train run.

    ``teacher`` holds the teacher checkpoint's bytes, which reach the trial through Ray's object store
    (``tune.with_parameters``), so a trial on another machine needs no copy of the driver's file.
    """
    cfg = RunConfig.model_validate(base).with_overrides(overrides(config), source="the trial's parameters")
    output_dir = Path(folder) / "trials" / tune.get_context().get_trial_id()
    runs.write_config(output_dir, cfg)
    if plan.in_process:
        runs.add_placement(output_dir, [ray.get_runtime_context().get_node_id()])
        restored = tune.get_checkpoint()
        teacher_model = load_teacher(cfg, teacher) if teacher else None

        def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
            checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            tune.report(metrics, checkpoint=checkpoint)

        resume_from = Path(restored.to_directory()) if restored is not None else None
        run_training(cfg, output_dir, teacher_model, LoopContext(report=report, resume_from=resume_from))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = build_trainer(cfg, output_dir, teacher, plan,
                            name=f"train-trial_id={tune.get_context().get_trial_id()}",
                            callbacks=[TuneReportCallback()], resume=True)
    trainer.fit()


def run_trials(cfg: RunConfig, folder: Path, *, kind: str, param_space: dict[str, Any], spec: TrialSpec,
               num_samples: int, max_concurrent: int, metrics: list[str], modes: list[str],
               search_alg: Any = None, scheduler: Any = None, resume: bool = False,
               teacher_path: Path | None = None, printer: Callable[[str], None] = print,
               parent_params: dict[str, Any] | None = None,
               extra_callbacks: list[Any] | None = None, experiment: str | None = None,
               parent_run_id: str | None = None) -> TrialsResult:
    """Run trials with Ray Tune and return one row per trial with the MLflow parent run.

    Each row holds the trial's overrides, status (finished / stopped_early / failed, or running / pending when
    interrupted), reason, epochs run, wall time and metrics (the last report's, including the final
    ``best_*``/``last_*``). An interrupted run (Ctrl-C, SIGTERM) returns with ``interrupted`` set, its
    unfinished runs killed in MLflow; the caller writes its tables, then :meth:`TrialsResult.raise_if_interrupted`.
    ``experiment`` names the Tune experiment under ``<folder>/tune`` (default ``kind``), so that several stages
    can share one folder; with ``parent_run_id`` the trials are recorded under that parent run (made by
    :func:`start_parent`), which the caller ends, instead of a parent of their own.
    """
    folder = Path(folder).resolve()
    name = experiment or kind
    route_library_logs(folder)
    printer("starting Ray" + (f" (joining {cfg.scaling.address})" if cfg.scaling.address else
                              ": a local instance takes 5-15 s"))
    cluster = init_ray(cfg.scaling, log_to_driver=False)
    route_library_logs(folder)
    in_process = cfg.scaling.num_workers == 1 and cfg.scaling.in_process_single_worker
    plan = plan_resources(cfg.scaling, cluster, concurrent_trials=max_concurrent, in_process=in_process,
                          node_cpus=node_cpus())
    _link_ray_logs(folder)
    if parent_run_id is None:
        recorder, parent_id = start_parent(cfg, folder, kind, resume, parent_params or {})
    else:
        recorder, parent_id = Recorder(cfg.tracking, cfg.experiment.name), parent_run_id
    if recorder is not None and parent_id is not None:
        view = links.trials_view(parent_id, metrics=[*metrics, *(m for m in VIEW_METRICS if m not in metrics)],
                                 params=spec.shown_params, mode="min" if modes[0] == "min" else "max",
                                 tags=(*spec.shown_tags, "status"), kind=kind, created_ms=int(time.time() * 1000),
                                 chart_metric=metrics[0])
        recorder.set_experiment_tag(view.tag_key, view.tag_value)
        runs.update_run_info(folder, ui_view=view.key)
    total = _expected_trials(param_space, num_samples)
    callbacks: list[Any] = [TrialsProgress(kind, total, cfg.train.epochs, plan.concurrent, metrics, spec, printer),
                            *(extra_callbacks or [])]
    if recorder is not None and parent_id is not None:
        callbacks.append(TrialRecorder(recorder, parent_id, kind, spec, cfg.run_dict(), folder))
    trainable = tune.with_resources(
        tune.with_parameters(_trial_function, base=cfg.run_dict(), folder=str(folder),
                             teacher=Path(teacher_path).read_bytes() if teacher_path else None, plan=plan,
                             overrides=spec.overrides),
        plan.trial_resources,
    )
    tune_dir = folder / "tune"
    printer(f"{name}: {total} trial(s), {plan.describe()}; "
            f"{'trains in the Tune trial' if in_process else 'Ray Train per trial'}")
    run_config = tune.RunConfig(name=name, storage_path=str(tune_dir), callbacks=callbacks, verbose=0,
                                failure_config=tune.FailureConfig(max_failures=cfg.scaling.max_failures))
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
        interrupted = _fit(tuner)
    except Exception as error:  # noqa: BLE001 - reported below with the trials that were kept
        failure = error
    rows = _rows(tune_dir / name, spec)
    if failure is not None:
        ray.shutdown()
        raise TrainingFailed(f"Ray Tune stopped the {name} ({root_cause(failure)}); the {len(rows)} trial(s) it "
                             f"recorded are kept in {folder}; continue with --resume {folder}") from failure
    interrupted = interrupted or len(rows) < total or any(row["status"] not in TERMINAL for row in rows)
    if interrupted:
        rows = _rows(tune_dir / name, spec, interrupted=True)
    if recorder is not None and parent_id is not None:
        _bring_store_in_line(recorder, parent_id, folder, rows, cfg, kind, callbacks, interrupted,
                             end_parent=parent_run_id is None)
    printer(f"{name} {'interrupted' if interrupted else 'done'}: {len(rows)} trial(s) recorded")
    if interrupted:
        ray.shutdown()
    return TrialsResult(rows, parent_id, recorder, interrupted, folder)


def _fit(tuner: tune.Tuner) -> bool:
    """Run ``tuner.fit()``; return whether Ctrl-C (or SIGTERM, which the CLI turns into SIGINT) interrupted it.

    During ``fit`` Ray Tune's own SIGINT handler stops the trials gracefully; it restores the previous handler
    only when it fires and otherwise stays installed, where it would swallow a later Ctrl-C (during the
    verification, or between a tuned ablation's stages). So the previous handler is put back, and a handler
    already put back by Tune means it fired — an interrupt, even when the last trial ended at that moment.
    """
    before = signal.getsignal(signal.SIGINT)
    tune_catches = (threading.current_thread() is threading.main_thread()
                    and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0")
    try:
        tuner.fit()
    except KeyboardInterrupt:
        return True
    finally:
        fired = tune_catches and signal.getsignal(signal.SIGINT) is before
        if tune_catches:
            signal.signal(signal.SIGINT, before)
    return fired


def _bring_store_in_line(recorder: Recorder, parent_id: str, folder: Path, rows: list[dict[str, Any]],
                         cfg: RunConfig, kind: str, callbacks: list[Any], interrupted: bool, end_parent: bool) -> None:
    """End every child run as its trial ended (killed when interrupted) and, with ``end_parent``, the parent run
    (killed when interrupted); a store that does not answer leaves one line naming ``crdnd-ray sync``."""
    records = next((c.records for c in callbacks if isinstance(c, TrialRecorder)), {})
    try:
        sync_trials(recorder, parent_id, folder, rows, flatten(cfg.run_dict()), kind, records)
        if interrupted:
            recorder.finish(parent_id, "killed", f"Interrupted; continue with --resume {folder}")
        elif end_parent:
            recorder.finish(parent_id, "finished")
    except TrackingUnavailable:
        print(f"the tracking store still does not answer: what it missed waits in {folder}; send it with "
              f"'crdnd-ray sync {folder}' once it is back.", file=sys.stderr, flush=True)


def _expected_trials(param_space: dict[str, Any], num_samples: int) -> int:
    cells = 1
    for value in param_space.values():
        if isinstance(value, dict) and "grid_search" in value:
            cells *= len(value["grid_search"])
    return num_samples * cells


def _rows(experiment_dir: Path, spec: TrialSpec, interrupted: bool = False) -> list[dict[str, Any]]:
    """One row per trial from Tune's experiment state, in the order the trials started (trials that never
    started last): name, status, reason, epochs, parameters, metrics."""
    analysis = tune.ExperimentAnalysis(str(experiment_dir))
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: (t.run_metadata.start_time or float("inf"), t.trial_id)):
        status, reason = trial_status(trial, interrupted)
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
    plan = plan_resources(cfg.scaling, cluster, concurrent_trials=max_concurrent, in_process=in_process,
                          node_cpus=node_cpus() if ray.is_initialized() else None)
    return TrialsPlan(kind=kind, trials=trials, concurrent=plan.concurrent, resources=plan.describe(),
                      in_process=in_process, epochs=cfg.train.epochs,
                      details={**(details or {}), "cluster": cluster, "warnings": _plan_warnings(cfg)})


def _plan_warnings(cfg: RunConfig) -> list[str]:
    """What a dry run cannot know about the cluster it plans for."""
    if cfg.scaling.address or os.environ.get("RAY_ADDRESS"):
        return []
    return ["no Ray cluster connected: resources were planned against this machine's CPUs"
            + (" and the GPUs the plan asks for" if cfg.scaling.use_gpu else "")]


def _cluster_for_planning(cfg: RunConfig, max_concurrent: int) -> dict[str, float]:
    """The resources a dry run plans against: the real cluster when connecting to one, else this machine's
    CPUs (and, when the config asks for GPUs, as many as the plan needs), without starting Ray."""
    if cfg.scaling.address or os.environ.get("RAY_ADDRESS"):
        return init_ray(cfg.scaling)
    cluster = {"CPU": float(os.cpu_count() or 1)}
    if cfg.scaling.use_gpu:
        cluster["GPU"] = float(max(cfg.scaling.num_workers, 1) * max_concurrent)
    return cluster
