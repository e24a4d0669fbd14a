"""One MLflow run fed by the training loop's reports: the single recording path of crdnd-ray.

The loop hands every epoch's row to ``LoopContext.report``. In ``crdnd-ray train`` that callback feeds a
:class:`RunRecord` in process (or, with Ray Train workers, from the Train controller on the driver's node);
in a sweep or ablation one Tune callback in the driver feeds a record per trial. Either way the record logs
each epoch's metrics at ``step = epoch`` (an epoch already logged, as after a resume, is not logged twice),
the final ``best_*``/``last_*`` metrics when they arrive, and on :meth:`RunRecord.finish` the run folder's
files, a learning-curve PNG, and the status decided by :func:`crdnd_ray.runs.run_status`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from crdnd_ray import runs
from crdnd_ray.tracking.store import Recorder, retry

__all__ = ["LEARNING_CURVE", "RunRecord", "epoch_metrics", "final_metrics"]

LEARNING_CURVE = "learning_curve.png"


def final_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The final part of a report: ``best_*``, ``last_*`` (the attack suite on both checkpoints)."""
    return {key: value for key, value in report.items() if key.startswith(("best_", "last_"))}


def epoch_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The per-epoch part of a report: without the final metrics and wall-clock stamps (``*_at``)."""
    return {key: value for key, value in report.items()
            if not key.startswith(("best_", "last_")) and not key.endswith("_at")}


class RunRecord:
    """The MLflow run of one training run, written from its reports (see the module docstring).

    Create one with :meth:`start` (a new run) or :meth:`reopen` (a run that is resumed); feed it with
    :meth:`report`; end it with :meth:`finish`. ``folder`` is the run folder whose files are uploaded at the end.
    """

    def __init__(self, recorder: Recorder, run_id: str, folder: Path | None, logged_steps: set[int] | None = None):
        self.recorder = recorder
        self.run_id = run_id
        self.folder = Path(folder) if folder is not None else None
        self.logged_steps: set[int] = set(logged_steps or ())
        self.last: dict[str, Any] | None = None

    @classmethod
    def start(cls, recorder: Recorder, name: str, params: dict[str, Any], tags: dict[str, Any], folder: Path | None,
              parent_run_id: str | None = None, sampled: dict[str, Any] | None = None) -> RunRecord:
        """Open a new run (a child of ``parent_run_id`` when given) with the flat dotted ``params``."""
        run_id = recorder.start_run(name, params, tags, parent_run_id=parent_run_id, sampled=sampled)
        return cls(recorder, run_id, folder)

    @classmethod
    def reopen(cls, recorder: Recorder, run_id: str, folder: Path | None) -> RunRecord:
        """Continue an existing run: it is marked running (tag ``resumed``) and keeps the epochs it holds."""
        history = retry(lambda: recorder.client.get_metric_history(run_id, "epoch"))
        retry(lambda: recorder.client.update_run(run_id, status="RUNNING"))
        recorder.set_tags(run_id, {"status": "running", "resumed": "true"})
        return cls(recorder, run_id, folder, {int(point.step) for point in history})

    def report(self, row: dict[str, Any]) -> None:
        """Log one report of the loop: its epoch's metrics once, and the final metrics when it carries them."""
        self.last = row
        step = row.get("epoch")
        if isinstance(step, (int, float)) and not isinstance(step, bool) and int(step) not in self.logged_steps:
            self.recorder.log_epoch(self.run_id, epoch_metrics(row), step=int(step))
            self.logged_steps.add(int(step))
        if runs.is_final(row):
            self.recorder.log_metrics(self.run_id, final_metrics(row))

    def finish(self, error: str | None = None) -> tuple[str, str]:
        """Upload the run folder, set the status of :func:`crdnd_ray.runs.run_status`; return ``(status, reason)``.

        The folder counts as a report too: a run whose final metrics reached its folder but not this record
        (it was stopped between the two, or another process fed the epochs) is still recorded as finished,
        with those metrics logged once.
        """
        if not runs.is_final(self.last) and self.folder is not None:
            on_disk = runs.last_report(self.folder)
            if runs.is_final(on_disk):
                metrics = retry(lambda: self.recorder.client.get_run(self.run_id)).data.metrics
                if runs.FINAL_MARKER not in metrics:
                    self.recorder.log_metrics(self.run_id, final_metrics(on_disk))
                self.last = on_disk
            elif self.last is None:
                self.last = on_disk
        if self.folder is not None:
            self.upload_folder()
        status, reason = runs.run_status(self.last, ended=True, error=error)
        self.recorder.finish(self.run_id, status, reason)
        return status, reason

    def upload_folder(self) -> list[str]:
        """Upload the run folder's files (:data:`crdnd_ray.runs.ARTIFACT_FILES`) and a learning-curve PNG."""
        assert self.folder is not None
        logged = self.recorder.log_artifacts(self.run_id, [self.folder / name for name in runs.ARTIFACT_FILES])
        history = runs.read_metrics(self.folder)
        if history:
            from crdnd_ray.plots import learning_curves

            scratch = Path(tempfile.mkdtemp(prefix="crdnd-curve-"))
            try:
                logged += self.recorder.log_artifacts(self.run_id, [learning_curves(history, scratch / LEARNING_CURVE)])
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return logged
