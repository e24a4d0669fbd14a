"""Tests of the framework-free loop (``engine.loop``): no Ray, no MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import small_config
from typer.testing import CliRunner

from crdnd_ray import runs
from crdnd_ray.cli import app
from crdnd_ray.config import ConfigError
from crdnd_ray.engine.loop import LoopContext, run_training
from crdnd_ray.engine.teachers import load_teacher

TIMING = ("images_per_s", "epoch_time_s", "epoch_started_at")
"""Metric keys that measure time and so differ between two otherwise identical runs."""


def test_sync_batchnorm_on_cpu_workers_is_a_clear_error(digits_teacher: Path, tmp_path: Path):
    cfg = small_config(**{"teacher.checkpoint": str(digits_teacher), "scaling.sync_batchnorm": True})
    with pytest.raises(ConfigError, match="SyncBatchNorm does not run on CPU"):
        run_training(cfg, tmp_path, None, LoopContext(rank=0, world_size=2))


def test_resume_continues_an_interrupted_local_run(digits_teacher: Path, tmp_path: Path):
    cfg = small_config(**{"teacher.checkpoint": str(digits_teacher), "train.epochs": 4})
    teacher = load_teacher(cfg, digits_teacher)
    straight = tmp_path / "straight"
    run_training(cfg, straight, teacher, LoopContext())

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    runs.write_config(interrupted, cfg)

    def interrupt(epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, interrupted, teacher, LoopContext(on_epoch_start=interrupt))
    assert [row["epoch"] for row in runs.read_metrics(interrupted)] == [0, 1]
    assert not (interrupted / "final_metrics.json").exists()

    result = CliRunner().invoke(app, ["train", "--resume", str(interrupted)])
    assert result.exit_code == 0, result.output
    resumed = runs.read_metrics(interrupted)
    assert [row["epoch"] for row in resumed] == [0, 1, 2, 3]
    # The resumed run continues exactly where the interrupted one stopped (model, optimiser, schedule,
    # RNG and data order), so it matches the run that was never interrupted.
    for mine, theirs in zip(runs.read_metrics(straight), resumed):
        assert {k: v for k, v in theirs.items() if k not in TIMING} == pytest.approx(
            {k: v for k, v in mine.items() if k not in TIMING}, rel=1e-6)
    assert runs.read_final(interrupted) == pytest.approx(runs.read_final(straight))


