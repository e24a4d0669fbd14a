"""Tests of ``crdnd_ray.tracking.record``: a run recorded from the loop's reports into a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from conftest import write_run_folder  # noqa: E402
from crdnd_ray import runs  # noqa: E402
from crdnd_ray.config import TrackingConfig, flatten  # noqa: E402
from crdnd_ray.tracking.record import RunRecord  # noqa: E402
from crdnd_ray.tracking.store import Recorder  # noqa: E402
from crdnd_ray.tracking.uris import normalize_tracking_uri  # noqa: E402

RUN_FILES = {"config.yaml", "best.pt", "final_metrics.json", "metrics.jsonl", "learning_curve.png"}


def feed(record: RunRecord, folder: Path) -> None:
    """Report a hand-written run folder as the loop does: each epoch row, the last one with the final metrics."""
    history = runs.read_metrics(folder)
    final = runs.read_final(folder)
    for row in history[:-1]:
        record.report(row)
    record.report({**history[-1], **(final or {})})


def test_a_run_is_recorded_from_its_reports(sqlite_uri: str, tmp_path: Path) -> None:
    recorder = Recorder(TrackingConfig(uri=sqlite_uri), "train-runs")
    done = tmp_path / "runs" / "done"
    cfg = write_run_folder(done)
    record = RunRecord.start(recorder, "train-done", flatten(cfg), {"method": "crdnd"}, done)
    feed(record, done)
    assert record.finish() == ("finished", "")
    stopped = tmp_path / "runs" / "stopped"
    write_run_folder(stopped, epochs=2, final=False)
    stopped_record = RunRecord.start(recorder, "train-stopped", flatten(cfg), {}, stopped)
    feed(stopped_record, stopped)
    assert stopped_record.finish() == ("stopped_early", "The scheduler stopped the run after epoch 2.")

    client = MlflowClient(tracking_uri=normalize_tracking_uri(sqlite_uri))
    run = client.get_run(record.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
    assert run.data.tags["run_kind"] == "train" and "mlflow.parentRunId" not in run.data.tags
    expected = {key: (json.dumps(value) if isinstance(value, list) else str(value)) for key, value in flatten(cfg).items()}
    assert run.data.params == expected
    history = {m: sorted(client.get_metric_history(record.run_id, m), key=lambda p: p.step) for m in ("loss", "epoch_clean_acc")}
    assert [(p.step, p.value) for p in history["loss"]] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert [p.value for p in history["epoch_clean_acc"]] == [40.0, 50.0, 60.0]
    assert run.data.metrics["best_clean_acc"] == 60.0 and run.data.metrics["best_epoch"] == 3.0
    assert run.data.metrics["last_pgd20_acc"] == 29.0 and run.data.metrics["best_n_eval"] == 64.0
    assert "epoch_started_at" not in run.data.metrics and run.data.metrics["epoch_pgd20_best_so_far"] == 30.0
    assert len(client.get_metric_history(record.run_id, "best_pgd20_acc")) == 1
    assert {item.path for item in client.list_artifacts(record.run_id)} == RUN_FILES
    stored = Path(run.info.artifact_uri.removeprefix("file://"))
    assert stored.is_relative_to(tmp_path / "mlartifacts" / "train-runs")
    assert (stored / "best.pt").read_bytes() == (done / "best.pt").read_bytes()
    assert (stored / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stopped_run = client.get_run(stopped_record.run_id)
    assert stopped_run.data.tags["status"] == "stopped_early" and stopped_run.info.status == "KILLED"
    assert stopped_run.data.tags["mlflow.runColor"] == "#b0b0b0", "greyed out in the UI's runs table"
    assert "after epoch 2" in stopped_run.data.tags["status_reason"]
    assert not any(key.startswith("best_") for key in stopped_run.data.metrics)
    assert len(client.get_metric_history(stopped_record.run_id, "epoch_pgd20_acc")) == 2
    assert {item.path for item in client.list_artifacts(stopped_record.run_id)} == RUN_FILES - {"final_metrics.json"}
    assert not (tmp_path / "mlruns").exists()


def test_a_reopened_run_logs_each_epoch_once_and_takes_final_metrics_from_its_folder(sqlite_uri: str,
                                                                                   tmp_path: Path) -> None:
    recorder = Recorder(TrackingConfig(uri=sqlite_uri), "resumed")
    folder = tmp_path / "run"
    write_run_folder(folder, final=False)
    first = RunRecord.start(recorder, "train-run", {"train.epochs": 3}, {}, folder)
    for row in runs.read_metrics(folder)[:2]:
        first.report(row)
    assert first.finish(error="KeyboardInterrupt")[0] == "failed"

    write_run_folder(folder)
    again = RunRecord.reopen(recorder, first.run_id, folder)
    assert recorder.client.get_run(first.run_id).data.tags["status"] == "running"
    for row in runs.read_metrics(folder):
        again.report(row)
    assert again.finish() == ("finished", "")
    client = MlflowClient(tracking_uri=normalize_tracking_uri(sqlite_uri))
    assert [p.step for p in sorted(client.get_metric_history(first.run_id, "loss"), key=lambda p: p.step)] == [1, 2, 3]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and "status_reason" not in run.data.tags
    assert run.data.metrics["best_pgd20_acc"] == 30.0
    assert len(client.search_runs([recorder.experiment_id])) == 1


def test_a_failed_run_keeps_its_reason_and_what_it_reached(sqlite_uri: str, tmp_path: Path) -> None:
    recorder = Recorder(TrackingConfig(uri=sqlite_uri), "failing")
    folder = tmp_path / "run"
    write_run_folder(folder, epochs=1, final=False)
    record = RunRecord.start(recorder, "train-run", {}, {}, folder)
    record.report(runs.read_metrics(folder)[0])
    assert record.finish(error="DivergedError: the training loss became nan") == (
        "failed", "DivergedError: the training loss became nan")
    run = recorder.client.get_run(record.run_id)
    assert run.info.status == "FAILED" and run.data.tags["status_reason"].startswith("DivergedError")
    assert [p.step for p in recorder.client.get_metric_history(record.run_id, "epoch_pgd20_acc")] == [1]
