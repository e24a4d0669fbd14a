"""Shared fixtures: one local Ray for the whole session, a cached digits teacher, isolated folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crdnd_ray.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]


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
        "eval.epoch_limit": 64,
        "eval.final_limit": 64,
        "attack.steps": 3,
    }
    base.update(overrides)
    return load_config(REPO / "search_spaces" / "digits.yaml", base)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small PGD-AT digits teacher, trained once per test session (a few seconds)."""
    from crdnd_ray.teachers import prepare_teacher

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
