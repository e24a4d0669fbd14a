"""Shared fixtures: one local Ray for the whole session, a cached digits teacher, isolated folders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from crdnd_ray.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
RUN_EPOCHS = 3
"""Epochs of the hand-written run folders of :func:`write_run_folder`."""


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Teachers trained by tests are cached in a session folder, never in the user's runs/."""
    os.environ["CRDND_RAY_CACHE"] = str(tmp_path_factory.mktemp("teacher-cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run faster single-threaded on a shared 2-core machine; restore afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_config(**overrides) -> RunConfig:
    """The embedded digits default shrunk for tests (short runs, small eval), tracking off."""
    base = {
        "tracking.enabled": False,
        "teacher.training.epochs": 4,
        "train.epochs": 2,
        "search.scheduler.grace_period": 1,
        "eval.epoch_limit": 64,
        "eval.final_limit": 64,
        "attack.steps": 3,
        "eval.verify": False,
    }
    base.update(overrides)
    return load_config(REPO / "search_spaces" / "digits.yaml", base)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small PGD-AT digits teacher, trained once per test session (a few seconds)."""
    from crdnd_ray.engine.teachers import prepare_teacher

    return prepare_teacher(small_config(), cache_root=tmp_path_factory.mktemp("teachers"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray."""
    from crdnd_ray.config import ScalingConfig
    from crdnd_ray.engine.distributed import init_ray

    init_ray(ScalingConfig(), log_to_driver=False)
    import ray

    yield ray
    ray.shutdown()


def finished_trials(folder: Path) -> dict[str, float]:
    """Trial id → modification time of its final_metrics.json, for every finished trial under ``folder``."""
    return {path.parent.name: path.stat().st_mtime for path in folder.glob("trials/*/final_metrics.json")}


def interrupt_then_resume(command: list[str], folder: Path, cwd: Path, finished: int) -> tuple[dict, dict]:
    """Run ``crdnd-ray COMMAND --output folder``, press Ctrl-C once ``finished`` trials are done, then
    ``--resume`` it to the end. Returns the finished trials (id → mtime) before and after the resume."""
    cli = [sys.executable, "-m", "crdnd_ray.cli"]
    first = subprocess.Popen(cli + command + ["--output", str(folder)], cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(finished_trials(folder)) < finished:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGINT)
    first.communicate(timeout=120)
    before = finished_trials(folder)
    resumed = subprocess.run(cli + command + ["--resume", str(folder)], cwd=cwd, capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return before, finished_trials(folder)


def _gloo_rank(rank: int, world_size: int, port: int, worker, args: tuple) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    worker(rank, world_size, *args)
    dist.barrier()
    os._exit(0)


def run_gloo_ranks(worker, world_size: int, *args) -> None:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` processes joined by a gloo process group.

    Each rank ends with a barrier and ``os._exit(0)``: tearing gloo down at interpreter exit while a peer
    is still closing its connections aborts the process now and then (SIGABRT), which is noise, not a
    result. A worker that raises still fails the test with its traceback.
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_gloo_rank, args=(world_size, port, worker, args), nprocs=world_size, join=True)


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file with MLflow's schema, created once (migrations take seconds) and copied per test."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_uri(empty_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite store in the test's own working directory."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    return "sqlite:///mlflow.db"


@pytest.fixture
def mlflow_server(empty_store: Path, tmp_path: Path):
    """A real ``mlflow server`` on a free loopback port with a temporary SQLite store and artifact folder."""
    from crdnd_ray.tracking.server import start_server, stop_server

    shutil.copy(empty_store, tmp_path / "server.db")
    artifacts = tmp_path / "served-artifacts"
    process, url = start_server(free_port(), "127.0.0.1", f"sqlite:///{tmp_path / 'server.db'}", artifacts,
                                log_file=tmp_path / "server.log")
    try:
        yield url, artifacts
    finally:
        stop_server(process)
        assert process.poll() is not None


#: Keys of an epoch row that measure time, so differ between two runs that are otherwise identical.
TIMING_KEYS = ("images_per_s", "epoch_time_s", "epoch_started_at", "cost_device_s", "cost_wall_s")


def write_run_folder(folder: Path, epochs: int = RUN_EPOCHS, final: bool = True, seed: int = 0) -> dict:
    """A run output folder as the training loop writes it; returns the config dict."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig().run_dict()
    cfg["experiment"]["seed"] = seed
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(folder / "metrics.jsonl", "w") as handle:
        for epoch in range(epochs):
            row = {"epoch": epoch + 1, "lr": 0.05 / (epoch + 1), "images_per_s": 1000.0 + epoch, "epoch_time_s": 1.5,
                   "epoch_started_at": 1.7e9 + epoch, "epoch_pgd20_best_so_far": 20.0 + 5 * epoch + seed,
                   "loss": 2.0 - 0.5 * epoch, "loss_kd": 1.0 - 0.2 * epoch, "loss_contrast": 0.5,
                   "epoch_clean_acc": 40.0 + 10 * epoch + seed, "epoch_pgd20_acc": 20.0 + 5 * epoch + seed}
            handle.write(json.dumps(row) + "\n")
    (folder / "best.pt").write_bytes(b"checkpoint-bytes" * 10)
    (folder / "last.pt").write_bytes(b"last")
    if final:
        (folder / "final_metrics.json").write_text(json.dumps({
            "best": {"clean_acc": 60.0 + seed, "fgsm_acc": 35.0, "pgd20_acc": 30.0 + seed, "cw_acc": 28.0, "n_eval": 64},
            "last": {"clean_acc": 59.0, "fgsm_acc": 34.0, "pgd20_acc": 29.0, "cw_acc": 27.5, "n_eval": 64},
            "best_epoch": epochs,
        }))
    return cfg


CLI = [sys.executable, "-m", "crdnd_ray.cli"]


def start_cli(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``crdnd-ray ARGS`` in its own process group (so a test can signal it as a terminal would)."""
    with open(log, "w") as handle:
        return subprocess.Popen([*CLI, *args], cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_until(condition, timeout: float, what: str) -> float:
    """Poll ``condition()`` every 0.25 s; return the seconds waited, or fail the test naming ``what``."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if condition():
            return time.perf_counter() - started
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def epochs_done(folder: Path) -> dict[str, int]:
    """Trial id → epochs in its metrics.jsonl, for every trial folder under ``folder``."""
    from crdnd_ray import runs

    return {path.name: len(runs.read_metrics(path)) for path in folder.glob("trials/*")}


def mlflow_runs(uri: str, folder: Path) -> tuple[object, dict[str, object]]:
    """The parent run of a sweep/ablation folder and its children by trial id, read back from the store."""
    from mlflow import MlflowClient

    from crdnd_ray import runs

    client = MlflowClient(uri)
    parent = client.get_run(runs.read_run_info(folder)["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, {child.data.tags["trial_id"]: child for child in children}


def loss_steps(uri: str, run) -> list[int]:
    """The steps of a run's ``loss`` history (a duplicate step would appear twice)."""
    from mlflow import MlflowClient

    return sorted(point.step for point in MlflowClient(uri).get_metric_history(run.info.run_id, "loss"))
