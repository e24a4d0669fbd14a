"""Tests of the Tune driver's callbacks (``engine.callbacks``): the recording callback with real Tune trials, the
status rule applied to trials, and Tune's bookkeeping keys kept out of the loop's reports."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from conftest import RUN_EPOCHS, write_run_folder  # noqa: E402
from crdnd_ray.config import TrackingConfig  # noqa: E402
from crdnd_ray.engine.callbacks import TrialRecorder, TrialSpec, loop_report, trial_status  # noqa: E402
from crdnd_ray.tracking.store import Recorder  # noqa: E402
from crdnd_ray.tracking.uris import normalize_tracking_uri  # noqa: E402

RUN_FILES = {"config.yaml", "best.pt", "final_metrics.json", "metrics.jsonl", "learning_curve.png"}


def _trial(storage_root: Path, trial_id: str, config: dict | None = None):
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    storage = StorageContext(storage_path=str(storage_root), experiment_dir_name="sweep", trial_dir_name=trial_id)
    return Trial("fn", config=config or {}, trial_id=trial_id, storage=storage, stub=True)


SPEC = TrialSpec(overrides=lambda config: {"method.temperature": config["t"]},
                 name=lambda trial: f"trial-{trial.trial_id}", tags=lambda config: {})


def test_trial_recorder_hooks_with_real_trials(sqlite_uri: str, tmp_path: Path) -> None:
    recorder = Recorder(TrackingConfig(uri=sqlite_uri), "tune")
    parent = recorder.start_parent("sweep", "sweep", {"search.num_samples": 3}, {})
    base = {"method": {"name": "crdnd", "temperature": None}, "experiment": {"seed": 0}}
    callback = TrialRecorder(recorder, parent, "sweep", SPEC, base, tmp_path)
    done, stopped, broken = (_trial(tmp_path / "tune", name, {"t": t}) for name, t in
                             (("done", 1.0), ("stopped", 2.0), ("broken", 3.0)))
    for trial in (done, stopped, broken):
        callback.on_trial_start(iteration=0, trials=[], trial=trial)
    write_run_folder(tmp_path / "trials" / "done")
    for epoch in range(RUN_EPOCHS):
        result = {"epoch": epoch + 1, "loss": 1.0, "epoch_pgd20_acc": 10.0 + epoch, "training_iteration": epoch + 1,
                  "time_total_s": 3.0, "config": {"t": 1.0}, "trial_id": "done", "done": False}
        if epoch == RUN_EPOCHS - 1:
            result.update({"best_pgd20_acc": 12.0, "last_pgd20_acc": 12.0, "best_epoch": 3})
        callback.on_trial_result(iteration=epoch, trials=[], trial=done, result=result)
    callback.on_trial_complete(iteration=3, trials=[], trial=done)
    callback.on_trial_result(iteration=0, trials=[], trial=stopped, result={"epoch": 1, "epoch_pgd20_acc": 5.0})
    callback.on_trial_complete(iteration=1, trials=[], trial=stopped)
    trial_dir = Path(broken.storage.trial_fs_path)
    trial_dir.mkdir(parents=True)
    (trial_dir / "error.txt").write_text("Failure # 1\nTraceback (most recent call last):\nRuntimeError: boom\n")
    broken.run_metadata.error_filename = "error.txt"
    callback.on_trial_error(iteration=1, trials=[], trial=broken)

    client = MlflowClient(tracking_uri=normalize_tracking_uri(sqlite_uri))
    runs = {run.data.tags["trial_id"]: run for run in
            client.search_runs([recorder.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")}
    assert set(runs) == {"done", "stopped", "broken"}
    assert runs["done"].data.tags["status"] == "finished" and runs["done"].info.status == "FINISHED"
    assert runs["done"].data.metrics["best_pgd20_acc"] == 12.0
    assert [p.step for p in client.get_metric_history(runs["done"].info.run_id, "epoch_pgd20_acc")] == [1, 2, 3]
    assert "time_total_s" not in runs["done"].data.metrics and "training_iteration" not in runs["done"].data.metrics
    assert {item.path for item in client.list_artifacts(runs["done"].info.run_id)} == RUN_FILES
    assert runs["stopped"].data.tags["status"] == "stopped_early"
    assert "after epoch 1" in runs["stopped"].data.tags["status_reason"]
    assert runs["broken"].info.status == "FAILED" and runs["broken"].data.tags["status"] == "failed"
    assert runs["broken"].data.tags["status_reason"].startswith("RuntimeError: boom\n\nFailure # 1\n")
    assert runs["broken"].data.params["sampled.method.temperature"] == "3.0"

    import ray.cloudpickle

    resumed = ray.cloudpickle.loads(ray.cloudpickle.dumps(TrialRecorder(recorder, parent, "sweep", SPEC, base, tmp_path)))
    assert type(resumed) is TrialRecorder
    restored = _trial(tmp_path / "tune", "stopped", {"t": 2.0})
    resumed.on_trial_start(iteration=0, trials=[], trial=restored)
    assert resumed.records["stopped"].run_id == runs["stopped"].info.run_id
    assert client.get_run(runs["stopped"].info.run_id).info.status == "RUNNING"
    for epoch in (0, 1):
        resumed.on_trial_result(iteration=epoch, trials=[], trial=restored, result={"epoch": epoch + 1, "epoch_pgd20_acc": 6.0})
    assert [p.step for p in client.get_metric_history(runs["stopped"].info.run_id, "epoch_pgd20_acc")] == [1, 2]
    write_run_folder(tmp_path / "trials" / "stopped", epochs=2)
    resumed.on_trial_complete(iteration=2, trials=[], trial=restored)
    finished = client.get_run(runs["stopped"].info.run_id)
    assert finished.data.tags["status"] == "finished" and "status_reason" not in finished.data.tags
    assert finished.info.status == "FINISHED" and "mlflow.runColor" not in finished.data.tags
    assert finished.data.metrics["best_pgd20_acc"] == 30.0
    assert len(client.search_runs([recorder.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")) == 3




def test_trial_status_is_the_run_status_rule_on_the_loops_last_report(tmp_path: Path) -> None:
    done, stopped, running, pending = (_trial(tmp_path, name) for name in ("done", "stopped", "running", "pending"))
    done.update_last_result({"epoch": 2, "epoch_pgd20_acc": 40.0, "best_pgd20_acc": 41.0, "best_epoch": 1,
                             "training_iteration": 3, "time_total_s": 9.0})
    stopped.update_last_result({"epoch": 1, "epoch_pgd20_acc": 20.0, "training_iteration": 1})
    running.update_last_result({"epoch": 1, "epoch_pgd20_acc": 30.0, "training_iteration": 2})
    for trial, status in ((done, "TERMINATED"), (stopped, "TERMINATED"), (running, "RUNNING")):
        trial.set_status(status)
    assert trial_status(done) == ("finished", "")
    assert trial_status(stopped) == ("stopped_early", "The scheduler stopped the run after epoch 1.")
    assert trial_status(running) == ("running", "")
    assert trial_status(pending) == ("pending", "")
    assert loop_report(done.last_result) == {"epoch": 2, "epoch_pgd20_acc": 40.0, "best_pgd20_acc": 41.0, "best_epoch": 1}


class RecordingView:
    """A printer with an ``update`` method, as the CLI's live view is: it keeps what it is shown."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.snapshots: list[object] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def update(self, snapshot: object) -> None:
        self.snapshots.append(snapshot)


def test_progress_follows_each_trial_and_estimates_the_remaining_time(tmp_path: Path) -> None:
    from crdnd_ray.engine.callbacks import TrialsProgress
    from crdnd_ray.progress import render_snapshot

    view = RecordingView()
    progress = TrialsProgress("sweep", total=3, epochs=4, concurrent=1, metrics=["epoch_pgd20_acc"], spec=SPEC, printer=view)
    first, second = _trial(tmp_path, "first", {"t": 1.0}), _trial(tmp_path, "second", {"t": 2.0})
    for trial in (first, second):
        progress.on_trial_start(iteration=0, trials=[], trial=trial)
    for epoch, trial in ((1, first), (2, first), (3, first), (4, first), (1, second)):
        result = {"epoch": epoch, "epoch_pgd20_acc": 10.0 * epoch, "time_this_iter_s": 2.0, "training_iteration": epoch}
        trial.update_last_result(result)
        progress.on_trial_result(iteration=epoch, trials=[], trial=trial, result=result)
    first.update_last_result({"epoch": 4, "epoch_pgd20_acc": 40.0, "best_epoch": 4, "best_pgd20_acc": 40.0})
    progress.on_trial_complete(iteration=5, trials=[], trial=first)
    snapshot = view.snapshots[-1]
    assert snapshot.counts == {"finished": 1, "running": 1}
    assert snapshot.remaining_s == pytest.approx((3 + 4) * 2.0), "3 epochs of the running trial, 4 of the pending one"
    assert view.lines[0].startswith("[0/3] trial-first started at epoch 1/4  temperature=1")
    assert view.lines[-1].startswith("[1/3] trial-first finished after 4/4 epochs epoch_pgd20_acc=40.00")
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    Console(file=buffer, width=120).print(render_snapshot(snapshot))
    text = buffer.getvalue()
    assert "1/3 done (finished 1, stopped 0, failed 0), running 1" in text and "remaining ≈ 14 s (at most)" in text
    assert "trial-second" in text and "1/4" in text and "trial-first" not in text, "one row per running trial"
