"""Shared fixtures: one local Ray for the whole session, a cached digits teacher, isolated folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from crdnd_ray.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Teachers trained by tests are cached in a session folder, never in the user's runs/."""
    os.environ["CRDND_RAY_CACHE"] = str(tmp_path_factory.mktemp("teacher-cache"))


@pytest.fixture(autouse=True)
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
