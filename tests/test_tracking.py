"""Tests of ``crdnd_ray.tracking`` against real MLflow stores: a real ``mlflow server`` over HTTP, a SQLite
file written by two processes at once, and runs recorded from a hand-written run folder. No mocks."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from crdnd_ray.config import RunConfig, TrackingConfig, flatten  # noqa: E402
from crdnd_ray.tracking import (  # noqa: E402
    Recorder,
    TrialInfo,
    default_artifact_location,
    final_metrics_flat,
    log_finished_run,
    normalize_tracking_uri,
    start_server,
    stop_server,
)

EPOCHS = 3
RUN_FILES = {"config.yaml", "best.pt", "final_metrics.json", "metrics.jsonl", "learning_curve.png"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file with MLflow's schema, created once (migrations take seconds) and copied per test."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_uri(empty_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite store in the test's own working directory."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    return "sqlite:///mlflow.db"


def write_run_folder(folder: Path, epochs: int = EPOCHS, final: bool = True, seed: int = 0) -> dict:
    """A run output folder as the training loop writes it; returns the config dict."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig().run_dict()
    cfg["experiment"]["seed"] = seed
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(folder / "metrics.jsonl", "w") as handle:
        for epoch in range(epochs):
            row = {"epoch": epoch, "lr": 0.05 / (epoch + 1), "images_per_s": 1000.0 + epoch, "epoch_time_s": 1.5,
                   "epoch_started_at": 1.7e9 + epoch, "pgd20_best_so_far": 20.0 + 5 * epoch + seed,
                   "loss": 2.0 - 0.5 * epoch, "loss_kd": 1.0 - 0.2 * epoch, "loss_contrast": 0.5,
                   "clean_acc": 40.0 + 10 * epoch + seed, "pgd20_acc": 20.0 + 5 * epoch + seed}
            handle.write(json.dumps(row) + "\n")
    (folder / "best.pt").write_bytes(b"checkpoint-bytes" * 10)
    (folder / "last.pt").write_bytes(b"last")
    if final:
        (folder / "final_metrics.json").write_text(json.dumps({
            "best": {"clean_acc": 60.0 + seed, "fgsm_acc": 35.0, "pgd20_acc": 30.0 + seed, "cw_acc": 28.0, "n_eval": 64},
            "last": {"clean_acc": 59.0, "fgsm_acc": 34.0, "pgd20_acc": 29.0, "cw_acc": 27.5, "n_eval": 64},
            "best_epoch": epochs - 1,
        }))
    return cfg


def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(ConnectionError, match="does not answer.*sqlite:///mlflow.db"):
        Recorder(TrackingConfig(uri=f"http://127.0.0.1:{free_port()}"), "nowhere")


def test_import_is_cheap() -> None:
    code = "import sys, crdnd_ray.tracking, crdnd_ray.report; print(sorted({'mlflow', 'ray', 'matplotlib'} & set(sys.modules)))"
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
    assert final_metrics_flat({"best": {"pgd20_acc": 30, "note": "x"}, "last": {"pgd20_acc": 29}, "best_epoch": 2}) == {
        "best_pgd20_acc": 30.0, "last_pgd20_acc": 29.0, "best_epoch": 2.0}


@pytest.fixture
def server(empty_store: Path, tmp_path: Path):
    """A real ``mlflow server`` on a free loopback port with a temporary SQLite store and artifact folder."""
    shutil.copy(empty_store, tmp_path / "server.db")
    artifacts = tmp_path / "served-artifacts"
    process, url = start_server(free_port(), "127.0.0.1", f"sqlite:///{tmp_path / 'server.db'}", artifacts,
                                log_file=tmp_path / "server.log")
    try:
        yield url, artifacts
    finally:
        stop_server(process)
        assert process.poll() is not None


def test_server_records_parent_children_metrics_and_artifacts(server, tmp_path: Path) -> None:
    url, artifacts = server
    recorder = Recorder(TrackingConfig(uri=url), "served")
    assert recorder.artifact_location.startswith("mlflow-artifacts:")
    parent = recorder.start_parent("sweep", "sweep-demo", {"search.num_samples": 2, "train.epochs": EPOCHS},
                                   {"sweep_id": "demo"})
    children = {}
    for index, temperature in enumerate((1.5, 3.0)):
        folder = tmp_path / f"trial{index}"
        cfg = write_run_folder(folder, seed=index)
        params = {**flatten(cfg), "method.temperature": temperature}
        run = recorder.start_run(f"trial-{index}", params, {"trial_id": f"t{index}", "method": "crdnd", "seed": index},
                                 parent_run_id=parent, sampled={"method.temperature": temperature})
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            recorder.log_epoch(run, row, step=row["epoch"])
        recorder.log_metrics(run, final_metrics_flat(json.loads((folder / "final_metrics.json").read_text())))
        recorder.log_run_folder(run, folder)
        recorder.finish(run, "finished")
        children[run] = (index, params)
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
        for metric in ("loss", "loss_kd", "clean_acc", "pgd20_acc", "lr", "images_per_s"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(point.step for point in history) == list(range(EPOCHS)), metric
        assert [p.value for p in sorted(client.get_metric_history(run.info.run_id, "pgd20_acc"),
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
            recorder.log_epoch(run, {"loss": 1.0 / (epoch + 1), "clean_acc": epoch, "pgd20_acc": epoch / 2}, step=epoch)
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
        assert len(client.get_metric_history(run.info.run_id, "pgd20_acc")) == epochs
        assert run.data.params["sampled.method.temperature"] == run.data.params["index"]
    failed = [run for run in found if run.info.status == "FAILED"]
    assert [run.info.run_name for run in failed] == ["w1-r0"]
    assert failed[0].data.tags["status"] == "failed"
    assert failed[0].data.tags["status_reason"] == "ValueError: the student diverged (loss is NaN)."
    assert sum(run.info.status == "FINISHED" for run in found) == 2 * runs - 1
    assert not (tmp_path / "mlruns").exists()


def test_log_finished_run_from_a_run_folder(sqlite_uri: str, tmp_path: Path) -> None:
    recorder = Recorder(TrackingConfig(uri=sqlite_uri), "train-runs")
    done = tmp_path / "runs" / "done"
    cfg = write_run_folder(done)
    run_id = log_finished_run(recorder, cfg, done, "train-done", {"method": "crdnd"})
    stopped = tmp_path / "runs" / "stopped"
    write_run_folder(stopped, epochs=2, final=False)
    stopped_id = log_finished_run(recorder, cfg, stopped, "train-stopped", {})

    client = MlflowClient(tracking_uri=normalize_tracking_uri(sqlite_uri))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
    assert run.data.tags["run_kind"] == "train" and "mlflow.parentRunId" not in run.data.tags
    expected = {key: (json.dumps(value) if isinstance(value, list) else str(value)) for key, value in flatten(cfg).items()}
    assert run.data.params == expected
    history = {m: sorted(client.get_metric_history(run_id, m), key=lambda p: p.step) for m in ("loss", "clean_acc")}
    assert [(p.step, p.value) for p in history["loss"]] == [(0, 2.0), (1, 1.5), (2, 1.0)]
    assert [p.value for p in history["clean_acc"]] == [40.0, 50.0, 60.0]
    assert run.data.metrics["best_clean_acc"] == 60.0 and run.data.metrics["best_epoch"] == 2.0
    assert run.data.metrics["last_pgd20_acc"] == 29.0 and run.data.metrics["best_n_eval"] == 64.0
    assert "epoch_started_at" not in run.data.metrics and run.data.metrics["pgd20_best_so_far"] == 30.0
    assert {item.path for item in client.list_artifacts(run_id)} == RUN_FILES
    stored = Path(run.info.artifact_uri.removeprefix("file://"))
    assert stored.is_relative_to(tmp_path / "mlartifacts" / "train-runs")
    assert (stored / "best.pt").read_bytes() == (done / "best.pt").read_bytes()
    assert (stored / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stopped_run = client.get_run(stopped_id)
    assert stopped_run.data.tags["status"] == "stopped_early" and stopped_run.info.status == "FINISHED"
    assert not any(key.startswith("best_") for key in stopped_run.data.metrics)
    assert len(client.get_metric_history(stopped_id, "pgd20_acc")) == 2
    assert {item.path for item in client.list_artifacts(stopped_id)} == RUN_FILES - {"final_metrics.json"}
    assert not (tmp_path / "mlruns").exists()


def _trial(storage_root: Path, trial_id: str, config: dict | None = None):
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    storage = StorageContext(storage_path=str(storage_root), experiment_dir_name="sweep", trial_dir_name=trial_id)
    return Trial("fn", config=config or {}, trial_id=trial_id, storage=storage, stub=True)


def test_trial_recorder_hooks_with_real_trials(sqlite_uri: str, tmp_path: Path) -> None:
    from crdnd_ray.tracking import TrialRecorder

    recorder = Recorder(TrackingConfig(uri=sqlite_uri), "tune")
    parent = recorder.start_parent("sweep", "sweep", {"search.num_samples": 3}, {})
    folders = {}

    def describe(trial) -> TrialInfo:
        folders[trial.trial_id] = tmp_path / "trials" / trial.trial_id
        return TrialInfo(name=f"trial-{trial.trial_id}", params={"method.temperature": trial.config["t"]},
                         sampled={"method.temperature": trial.config["t"]}, tags={"sweep_id": parent},
                         output_dir=folders[trial.trial_id])

    callback = TrialRecorder(recorder, parent, describe)
    done, stopped, broken = (_trial(tmp_path / "tune", name, {"t": t}) for name, t in
                             (("done", 1.0), ("stopped", 2.0), ("broken", 3.0)))
    for trial in (done, stopped, broken):
        callback.on_trial_start(iteration=0, trials=[], trial=trial)
    write_run_folder(tmp_path / "trials" / "done")
    for epoch in range(EPOCHS):
        result = {"epoch": epoch, "loss": 1.0, "pgd20_acc": 10.0 + epoch, "training_iteration": epoch + 1,
                  "time_total_s": 3.0, "config": {"t": 1.0}, "trial_id": "done", "done": False}
        if epoch == EPOCHS - 1:
            result.update({"best_pgd20_acc": 12.0, "last_pgd20_acc": 12.0, "best_epoch": 2})
        callback.on_trial_result(iteration=epoch, trials=[], trial=done, result=result)
    callback.on_trial_complete(iteration=3, trials=[], trial=done)
    callback.on_trial_result(iteration=0, trials=[], trial=stopped, result={"epoch": 0, "pgd20_acc": 5.0})
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
    assert [p.step for p in client.get_metric_history(runs["done"].info.run_id, "pgd20_acc")] == [0, 1, 2]
    assert "time_total_s" not in runs["done"].data.metrics and "training_iteration" not in runs["done"].data.metrics
    assert {item.path for item in client.list_artifacts(runs["done"].info.run_id)} == RUN_FILES
    assert runs["stopped"].data.tags["status"] == "stopped_early"
    assert "after epoch 0" in runs["stopped"].data.tags["status_reason"]
    assert runs["broken"].info.status == "FAILED" and runs["broken"].data.tags["status"] == "failed"
    assert runs["broken"].data.tags["status_reason"].startswith("RuntimeError: boom\n\nFailure # 1\n")
    assert runs["broken"].data.params["sampled.method.temperature"] == "3.0"

    import ray.cloudpickle

    resumed = ray.cloudpickle.loads(ray.cloudpickle.dumps(TrialRecorder(recorder, parent, describe)))
    assert type(resumed) is TrialRecorder
    restored = _trial(tmp_path / "tune", "stopped", {"t": 2.0})
    resumed.on_trial_start(iteration=0, trials=[], trial=restored)
    assert resumed.runs["stopped"] == runs["stopped"].info.run_id
    assert client.get_run(runs["stopped"].info.run_id).info.status == "RUNNING"
    for epoch in (0, 1):
        resumed.on_trial_result(iteration=epoch, trials=[], trial=restored, result={"epoch": epoch, "pgd20_acc": 6.0})
    assert [p.step for p in client.get_metric_history(runs["stopped"].info.run_id, "pgd20_acc")] == [0, 1]
    write_run_folder(tmp_path / "trials" / "stopped", epochs=2)
    resumed.on_trial_complete(iteration=2, trials=[], trial=restored)
    finished = client.get_run(runs["stopped"].info.run_id)
    assert finished.data.tags["status"] == "finished" and "status_reason" not in finished.data.tags
    assert finished.data.metrics["best_pgd20_acc"] == 30.0
    assert len(client.search_runs([recorder.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")) == 3


def test_serve_ui_warns_on_a_public_bind_and_refuses_a_busy_port(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from crdnd_ray.tracking import serve_ui

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = serve_ui(port=port, host="0.0.0.0", tracking_uri=f"sqlite:///{tmp_path / 'ui.db'}")
    captured = capsys.readouterr()
    assert code == 2
    assert "Warning: binding the MLflow UI to 0.0.0.0 exposes every run" in captured.err
    assert f"cannot listen on 0.0.0.0:{port}" in captured.err and "--port" in captured.err
    assert not (tmp_path / "ui.db").exists()


def test_serve_ui_prints_urls_and_stops_on_ctrl_c(sqlite_uri: str, tmp_path: Path) -> None:
    recorder = Recorder(TrackingConfig(uri=sqlite_uri), "shown")
    port = free_port()
    code = ("import sys; from crdnd_ray.tracking import serve_ui; "
            f"sys.exit(serve_ui(port={port}, tracking_uri='sqlite:///mlflow.db', experiment='shown'))")
    with open(tmp_path / "ui.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=log, text=True)
    try:
        first = process.stdout.readline()
        second = process.stdout.readline()
        assert first.startswith(f"MLflow UI for sqlite:///{tmp_path / 'mlflow.db'} at http://127.0.0.1:{port}")
        assert second.strip().endswith(f"http://127.0.0.1:{port}/#/experiments/{recorder.experiment_id}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=shown",
                         timeout=10) as answer:
            assert json.loads(answer.read())["experiment"]["experiment_id"] == recorder.experiment_id
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) != 0:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the MLflow server still listens after Ctrl-C")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert not (tmp_path / "mlruns").exists()
    assert os.path.exists(tmp_path / "mlflow.db")
