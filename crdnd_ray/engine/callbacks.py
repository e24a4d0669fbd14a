"""The Tune driver's callbacks and result helpers: what a trial is (:class:`TrialSpec`), its loop report and
error, its status by the one rule of ``runs.py``, its MLflow record (:class:`TrialRecorder`) and its progress
on the terminal (:class:`TrialsProgress`). They run in the driver, the only process that writes the store.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ray import tune

from crdnd_ray import runs
from crdnd_ray.config import flatten
from crdnd_ray.tracking.record import RunRecord
from crdnd_ray.tracking.store import Recorder
from crdnd_ray.tracking.uris import TrackingUnavailable

__all__ = ["TUNE_KEYS", "TrialRecorder", "TrialSpec", "TrialsProgress", "TrialsSnapshot", "loop_report", "trial_error",
           "trial_status"]

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
    """How a trial's Tune config becomes a run: its overrides of the base config, its name and its tags.

    ``shown_params`` and ``shown_tags`` are the columns the MLflow UI view of the trials shows (the searched
    parameters of a sweep; the variant and seed of an ablation).
    """

    overrides: Callable[[dict[str, Any]], dict[str, Any]]
    name: Callable[[Any], str]
    tags: Callable[[dict[str, Any]], dict[str, str]]
    shown_params: tuple[str, ...] = ()
    shown_tags: tuple[str, ...] = ()


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


def trial_status(trial: Any, interrupted: bool = False) -> tuple[str, str]:
    """``(status, reason)`` of a Tune trial by :func:`crdnd_ray.runs.run_status`; ``pending`` before its first
    report (Ray Tune also puts a trial it stopped back to PENDING, but that one has reported).

    With ``interrupted`` (the sweep was stopped by the user), a trial that had not ended is ``killed``.
    """
    report = loop_report(trial.last_result)
    if trial.status == "PENDING" and "epoch" not in report:
        return "pending", ""
    ended = trial.status in ("TERMINATED", "ERROR")
    error = trial_error(trial) if trial.status == "ERROR" else None
    return runs.run_status(report, ended=ended, error=error, interrupted=interrupted and not ended)


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
        except TrackingUnavailable:
            pass
        except Exception as error:  # noqa: BLE001 - a recording problem must not fail the trials
            print(f"warning: recording trial {getattr(trial, 'trial_id', '?')} in MLflow failed while {what} "
                  f"({type(error).__name__}: {error}); 'crdnd-ray sync' repairs it.", file=sys.stderr, flush=True)

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


@dataclass
class TrialsSnapshot:
    """The state of a sweep or ablation for a live view: one line per trial, counts, times."""

    kind: str
    total: int
    epochs: int
    metric: str
    trials: list[dict[str, Any]]
    counts: dict[str, int]
    elapsed_s: float
    remaining_s: float | None


class TrialsProgress(tune.Callback):
    """Follows every trial (status, epoch, metric) and shows it through ``printer``: one line per trial event,
    and, when the printer has an ``update`` method (the CLI's live view), a :class:`TrialsSnapshot` each epoch.
    """

    def __init__(self, kind: str, total: int, epochs: int, concurrent: int, metrics: list[str], spec: TrialSpec,
                 printer: Callable[[str], None]) -> None:
        self.kind, self.total, self.epochs, self.concurrent = kind, total, epochs, concurrent
        self.metrics, self.spec, self.printer = metrics, spec, printer
        self.trials: dict[str, dict[str, Any]] = {}
        self.epoch_seconds: list[float] = []
        self.started = time.perf_counter()

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its run config for resuming; the printer stays with the live driver."""
        return {**self.__dict__, "printer": print}

    def _follow(self, trial: Any, status: str) -> dict[str, Any]:
        result = loop_report(trial.last_result)
        params = " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in self.spec.overrides(trial.config).items())
        line = self.trials.setdefault(trial.trial_id, {"trial": self.spec.name(trial), "params": params})
        line.update(status=status, epoch=int(result.get("epoch", 0) or 0), metric=result.get(self.metrics[0]))
        return line

    def _show(self, line: dict[str, Any] | None = None, what: str = "") -> None:
        if line is not None:
            done = sum(t["status"] not in ("running",) for t in self.trials.values())
            metric = f" {self.metrics[0]}={line['metric']:.2f}" if isinstance(line["metric"], (int, float)) else ""
            progress = (f"after {line['epoch']}/{self.epochs} epochs" if what != "started"
                        else f"at epoch {line['epoch'] + 1}/{self.epochs}")
            self.printer(f"[{done}/{self.total}] {line['trial']} {what} {progress}{metric}  {line['params']}")
        update = getattr(self.printer, "update", None)
        if update is not None:
            update(self.snapshot())

    def snapshot(self) -> TrialsSnapshot:
        """Where the work stands, with the remaining time estimated from the epochs done so far (an upper
        bound: a scheduler may stop trials early)."""
        counts: dict[str, int] = {}
        for line in self.trials.values():
            counts[line["status"]] = counts.get(line["status"], 0) + 1
        remaining = None
        if self.epoch_seconds:
            left = sum(self.epochs - t["epoch"] for t in self.trials.values() if t["status"] == "running")
            left += self.epochs * (self.total - len(self.trials))
            remaining = left * (sum(self.epoch_seconds) / len(self.epoch_seconds)) / max(self.concurrent, 1)
        return TrialsSnapshot(self.kind, self.total, self.epochs, self.metrics[0], list(self.trials.values()), counts,
                              time.perf_counter() - self.started, remaining)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(self._follow(trial, "running"), "started")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        if isinstance(result.get("time_this_iter_s"), (int, float)):
            self.epoch_seconds.append(float(result["time_this_iter_s"]))
        self._follow(trial, "running")
        self._show()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        status = runs.run_status(loop_report(trial.last_result), ended=True)[0]
        self._show(self._follow(trial, status), status.replace("_", " "))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(self._follow(trial, "failed"), f"FAILED ({trial_error(trial).splitlines()[0]})")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


