"""Tests of ``crdnd_ray.tracking.store`` against real MLflow stores: a real ``mlflow server`` over HTTP and a
SQLite file written by two processes at once. No mocks."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from conftest import RUN_EPOCHS, free_port, write_run_folder  # noqa: E402
from crdnd_ray import runs  # noqa: E402
from crdnd_ray.config import TrackingConfig, flatten  # noqa: E402
from crdnd_ray.tracking.record import RunRecord  # noqa: E402
from crdnd_ray.tracking.store import Recorder  # noqa: E402
from crdnd_ray.tracking.uris import TrackingUnavailable, default_artifact_location, normalize_tracking_uri  # noqa: E402

RUN_FILES = {"config.yaml", "best.pt", "final_metrics.json", "metrics.jsonl", "learning_curve.png"}


def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(TrackingUnavailable, match="does not answer.*sqlite:///mlflow.db"):
        Recorder(TrackingConfig(uri=f"http://127.0.0.1:{free_port()}"), "nowhere")


def test_import_is_cheap() -> None:
    code = ("import sys, crdnd_ray.tracking, crdnd_ray.report, crdnd_ray.runs, crdnd_ray.analysis; "
            "print(sorted({'mlflow', 'ray', 'matplotlib'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_uris_and_artifact_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert normalize_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert normalize_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    uri = normalize_tracking_uri("sqlite:///sub/store.db")
    assert default_artifact_location(uri, "exp") == (tmp_path / "sub" / "mlartifacts" / "exp").as_uri()
    assert default_artifact_location("http://127.0.0.1:5000", "exp") is None
    assert default_artifact_location(uri, "exp", "elsewhere") == (tmp_path / "elsewhere").as_uri()
    assert default_artifact_location(uri, "exp", "s3://bucket/x") == "s3://bucket/x"
    with pytest.raises(ValueError, match="sqlite:///mlflow.db"):
        normalize_tracking_uri("mlflow.db")


def test_a_new_experiment_explains_its_metrics_and_a_description_of_ones_own_is_kept(tmp_path: Path) -> None:
    from crdnd_ray.tracking.links import EXPERIMENT_DESCRIPTION, NOTE_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recorder = Recorder(TrackingConfig(uri=uri), "described")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(recorder.experiment_id).tags[NOTE_TAG] == EXPERIMENT_DESCRIPTION
    client.set_experiment_tag(recorder.experiment_id, NOTE_TAG, "my own notes")
    Recorder(TrackingConfig(uri=uri), "described")
    assert client.get_experiment(recorder.experiment_id).tags[NOTE_TAG] == "my own notes"


def test_server_records_parent_children_metrics_and_artifacts(mlflow_server, tmp_path: Path) -> None:
    url, artifacts = mlflow_server
    recorder = Recorder(TrackingConfig(uri=url), "served")
    assert recorder.artifact_location.startswith("mlflow-artifacts:")
    parent = recorder.start_parent("sweep", "sweep-demo", {"search.num_samples": 2, "train.epochs": RUN_EPOCHS},
                                   {"sweep_id": "demo"})
    children = {}
    for index, temperature in enumerate((1.5, 3.0)):
        folder = tmp_path / f"trial{index}"
        cfg = write_run_folder(folder, seed=index)
        params = {**flatten(cfg), "method.temperature": temperature}
        record = RunRecord.start(recorder, f"trial-{index}", params,
                                 {"trial_id": f"t{index}", "method": "crdnd", "seed": index}, folder,
                                 parent_run_id=parent, sampled={"method.temperature": temperature})
        history = runs.read_metrics(folder)
        for row in history[:-1]:
            record.report(row)
        record.report({**history[-1], **runs.read_final(folder)})
        assert record.finish() == ("finished", "")
        children[record.run_id] = (index, params)
    recorder.finish(parent, "finished")

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("served")
    parents = client.search_runs([experiment.experiment_id], "tags.run_kind = 'sweep'")
    assert [p.info.run_id for p in parents] == [parent]
    assert parents[0].data.params["search.num_samples"] == "2"
    found = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert {run.info.run_id for run in found} == set(children)
    for run in found:
        index, params = children[run.info.run_id]
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
        assert run.data.tags["trial_id"] == f"t{index}" and run.data.tags["seed"] == str(index)
        assert {"git_commit", "host", "device"} <= set(run.data.tags)
        assert run.data.params["sampled.method.temperature"] == str(params["method.temperature"])
        assert run.data.params["method.temperature"] == str(params["method.temperature"])
        assert run.data.params["train.lr"] == str(params["train.lr"])
        assert len([k for k in run.data.params if not k.startswith("sampled.")]) == len(params)
        for metric in ("loss", "loss_kd", "epoch_clean_acc", "epoch_pgd20_acc", "lr", "images_per_s"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(point.step for point in history) == list(range(1, RUN_EPOCHS + 1)), metric
        assert [p.value for p in sorted(client.get_metric_history(run.info.run_id, "epoch_pgd20_acc"),
                                        key=lambda p: p.step)] == [20.0 + index, 25.0 + index, 30.0 + index]
        assert run.data.metrics["best_pgd20_acc"] == 30.0 + index
        assert run.data.metrics["last_cw_acc"] == 27.5
        listed = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert listed == RUN_FILES
        local = client.download_artifacts(run.info.run_id, "best.pt", str(tmp_path / f"dl{index}"))
        assert Path(local).read_bytes() == (tmp_path / f"trial{index}" / "best.pt").read_bytes()
    assert len(list(artifacts.rglob("learning_curve.png"))) == 2
    assert not Path("mlruns").exists()


def _write_concurrently(uri: str, worker: int, runs: int, epochs: int) -> None:
    recorder = Recorder(TrackingConfig(uri=uri), "concurrent")
    for index in range(runs):
        run = recorder.start_run(f"w{worker}-r{index}", {"worker": worker, "index": index},
                                 {"worker": worker}, sampled={"method.temperature": index})
        for epoch in range(epochs):
            recorder.log_epoch(run, {"loss": 1.0 / (epoch + 1), "epoch_clean_acc": epoch, "epoch_pgd20_acc": epoch / 2}, step=epoch)
        if worker == 1 and index == 0:
            recorder.finish(run, "failed", "ValueError: the student diverged (loss is NaN).")
        else:
            recorder.log_metrics(run, {"best_pgd20_acc": index})
            recorder.finish(run, "finished")


def test_sqlite_two_concurrent_writers_and_a_failed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both processes open a store that does not exist yet (so they race on MLflow's schema creation and on
    creating the experiment), then write runs at the same time."""
    monkeypatch.chdir(tmp_path)
    runs, epochs = 3, 8
    context = multiprocessing.get_context("spawn")
    uri = normalize_tracking_uri("sqlite:///mlflow.db")
    workers = [context.Process(target=_write_concurrently, args=(uri, worker, runs, epochs)) for worker in (0, 1)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
    assert [process.exitcode for process in workers] == [0, 0]

    client = MlflowClient(tracking_uri=uri)
    experiments = [e for e in client.search_experiments() if e.name == "concurrent"]
    assert len(experiments) == 1
    assert experiments[0].artifact_location == (tmp_path / "mlartifacts" / "concurrent").as_uri()
    found = client.search_runs([experiments[0].experiment_id], max_results=100)
    assert len(found) == 2 * runs
    for run in found:
        assert len(client.get_metric_history(run.info.run_id, "epoch_pgd20_acc")) == epochs
        assert run.data.params["sampled.method.temperature"] == run.data.params["index"]
    failed = [run for run in found if run.info.status == "FAILED"]
    assert [run.info.run_name for run in failed] == ["w1-r0"]
    assert failed[0].data.tags["status"] == "failed"
    assert failed[0].data.tags["status_reason"] == "ValueError: the student diverged (loss is NaN)."
    assert sum(run.info.status == "FINISHED" for run in found) == 2 * runs - 1
    assert not (tmp_path / "mlruns").exists()


