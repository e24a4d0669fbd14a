"""One MLflow run fed by the training loop's reports: the single recording path of crdnd-ray.

The loop hands every epoch's row to ``LoopContext.report``. In ``crdnd-ray train`` that callback feeds a
:class:`RunRecord` in process (or, with Ray Train workers, from the Train controller on the driver's node);
in a sweep or ablation one Tune callback in the driver feeds a record per trial. Either way the record logs
each epoch's metrics at ``step = epoch`` (an epoch already logged, as after a resume, is not logged twice),
the final ``best_*``/``last_*`` metrics when they arrive, and on :meth:`RunRecord.finish` the run folder's
files, a learning-curve PNG, and the status decided by :func:`crdnd_ray.runs.run_status`.

The tracking store never stops training: while it does not answer, reports are kept only in the run folder
(``metrics.jsonl``, ``final_metrics.json``) and the record is *behind*; the next report that reaches the
store first catches up from the folder, and a record that ends behind is completed by
:func:`crdnd_ray.tracking.sync.sync_folder` (``crdnd-ray sync`` or ``--resume``). The decided status and
reason are kept in the run folder's ``run.json`` as well.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from crdnd_ray import runs
from crdnd_ray.tracking.store import Recorder
from crdnd_ray.tracking.uris import TrackingUnavailable

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
        self.behind = False

    @classmethod
    def start(cls, recorder: Recorder, name: str, params: dict[str, Any], tags: dict[str, Any], folder: Path | None,
              parent_run_id: str | None = None, sampled: dict[str, Any] | None = None) -> RunRecord:
        """Open a new run (a child of ``parent_run_id`` when given) with the flat dotted ``params``."""
        run_id = recorder.start_run(name, params, tags, parent_run_id=parent_run_id, sampled=sampled)
        if folder is not None:
            runs.update_run_info(folder, mlflow_run_id=run_id, tracking_uri=recorder.tracking_uri)
        return cls(recorder, run_id, folder)

    @classmethod
    def reopen(cls, recorder: Recorder, run_id: str, folder: Path | None) -> RunRecord:
        """Continue an existing run: it is marked running (tag ``resumed``) and keeps the epochs it holds."""
        steps = cls.stored_steps(recorder, run_id)
        recorder.call(lambda: recorder.client.update_run(run_id, status="RUNNING"))
        recorder.set_tags(run_id, {"status": "running", "resumed": "true"})
        return cls(recorder, run_id, folder, steps)

    def report(self, row: dict[str, Any]) -> None:
        """Log one report of the loop: its epoch's metrics once, and the final metrics when it carries them.

        While the store does not answer, the report stays only in the run folder and the record is behind.
        """
        self.last = row
        try:
            if self.behind:
                self.catch_up()
            self._log(row)
        except TrackingUnavailable:
            self.behind = True

    def _log(self, row: dict[str, Any]) -> None:
        step = row.get("epoch")
        if isinstance(step, (int, float)) and not isinstance(step, bool) and int(step) not in self.logged_steps:
            self.recorder.log_epoch(self.run_id, epoch_metrics(row), step=int(step))
            self.logged_steps.add(int(step))
        if runs.is_final(row):
            self.recorder.log_metrics(self.run_id, final_metrics(row))

    def catch_up(self) -> None:
        """Log every epoch of the run folder that the store does not hold yet (TrackingUnavailable if down)."""
        if self.folder is not None:
            for row in runs.read_metrics(self.folder):
                self._log(row)
        self.behind = False

    def finish(self, error: str | None = None, interrupted: bool = False) -> tuple[str, str]:
        """Decide the status (:func:`crdnd_ray.runs.run_status`), keep it in ``run.json``, and end the run in
        the store with the folder's files; return ``(status, reason)``.

        The folder counts as a report too: a run whose final metrics reached its folder but not this record
        (it was stopped between the two, or another process fed the epochs) is finished, with those metrics
        logged once. When the store does not answer, the run stays behind for ``crdnd-ray sync``.
        """
        on_disk = runs.last_report(self.folder) if self.folder is not None else None
        final_from_disk = runs.is_final(on_disk) and not runs.is_final(self.last)
        if final_from_disk or self.last is None:
            self.last = on_disk
        status, reason = runs.run_status(self.last, ended=True, error=error, interrupted=interrupted)
        if self.folder is not None:
            runs.update_run_info(self.folder, status=status, reason=reason)
        try:
            self.logged_steps |= self.stored_steps(self.recorder, self.run_id)
            self.catch_up()
            if final_from_disk:
                metrics = self.recorder.call(lambda: self.recorder.client.get_run(self.run_id)).data.metrics
                if runs.FINAL_MARKER not in metrics:
                    self.recorder.log_metrics(self.run_id, final_metrics(self.last))
            if self.folder is not None:
                self.upload_folder()
            self.recorder.finish(self.run_id, status, reason)
        except TrackingUnavailable:
            self.behind = True
        if self.folder is not None:
            runs.update_run_info(self.folder, tracking_behind=self.behind)
        return status, reason

    @staticmethod
    def stored_steps(recorder: Recorder, run_id: str) -> set[int]:
        """The epochs the store holds for ``run_id`` (whoever logged them)."""
        return {int(point.step) for point in recorder.call(lambda: recorder.client.get_metric_history(run_id, "epoch"))}

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
