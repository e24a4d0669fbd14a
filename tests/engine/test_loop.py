"""Tests of the framework-free loop (``engine.loop``): no Ray, no MLflow.

The loop does not synchronise with the device at every step: the loss is summed on the device and checked
every ``FINITE_CHECK_STEPS`` steps and at the end of the epoch. The divergence tests make a run diverge on
purpose (a teacher whose weights are NaN, or an absurd learning rate) and check that it still stops, in the
right epoch and step window, before anything of that epoch is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TIMING_KEYS, small_config
from typer.testing import CliRunner

from crdnd_ray import runs
from crdnd_ray.cli import app
from crdnd_ray.config import ConfigError
from crdnd_ray.engine import loop
from crdnd_ray.engine.loop import DivergedError, LoopContext, run_training
from crdnd_ray.engine.teachers import load_teacher
from crdnd_ray.models import build_model

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
    assert [row["epoch"] for row in runs.read_metrics(interrupted)] == [1, 2]
    assert not (interrupted / "final_metrics.json").exists()

    result = CliRunner().invoke(app, ["train", "--resume", str(interrupted)])
    assert result.exit_code == 0, result.output
    resumed = runs.read_metrics(interrupted)
    assert [row["epoch"] for row in resumed] == [1, 2, 3, 4]
    # The resumed run continues exactly where the interrupted one stopped (model, optimiser, schedule,
    # RNG and data order), so it matches the run that was never interrupted.
    for mine, theirs in zip(runs.read_metrics(straight), resumed):
        assert {k: v for k, v in theirs.items() if k not in TIMING_KEYS} == pytest.approx(
            {k: v for k, v in mine.items() if k not in TIMING_KEYS}, rel=1e-6)
    assert runs.read_final(interrupted) == pytest.approx(runs.read_final(straight))


QUICK = {"train.epochs": 2, "attack.steps": 1, "eval.epoch_attacks": ["clean"], "eval.final_attacks": ["clean"],
         "eval.epoch_limit": 32, "eval.final_limit": 32}


def small_teacher(value: float | None = None) -> torch.nn.Module:
    torch.manual_seed(1)
    teacher = build_model("small_cnn", 10, in_channels=1, width=8)
    if value is not None:
        with torch.no_grad():
            for parameter in teacher.parameters():
                parameter.fill_(value)
    return teacher


def test_nan_loss_stops_training_naming_the_epoch_and_the_step_window(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "FINITE_CHECK_STEPS", 4)
    cfg = small_config(**QUICK, **{"method.name": "rslad"})
    with pytest.raises(DivergedError, match=r"at epoch 1, between steps 0 and 3\. Lower train\.lr"):
        run_training(cfg, tmp_path / "run", small_teacher(float("nan")), LoopContext())
    assert runs.read_metrics(tmp_path / "run") == []


def test_divergence_found_at_the_end_of_an_epoch_names_its_last_window(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "FINITE_CHECK_STEPS", 8)
    cfg = small_config(**QUICK, **{"method.name": "natural", "train.lr": 1e30, "train.max_steps_per_epoch": 13})
    with pytest.raises(DivergedError, match=r"at epoch 1, between steps 0 and 7\."):
        run_training(cfg, tmp_path / "run", None, LoopContext())


def test_epoch_metrics_are_the_mean_of_finite_steps(tmp_path):
    cfg = small_config(**QUICK, **{"method.name": "rslad", "train.max_steps_per_epoch": 3})
    run_training(cfg, tmp_path / "run", small_teacher(), LoopContext())
    rows = runs.read_metrics(tmp_path / "run")
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        assert {"loss", "kd_adv", "kd_nat", "train_adv_acc", "train_teacher_acc"} <= set(row)
        assert row["loss"] == pytest.approx(0.1 * (5 / 6 * row["kd_adv"] + 1 / 6 * row["kd_nat"]), rel=1e-5)
        assert 0.0 <= row["train_adv_acc"] <= 100.0 and 0.0 <= row["train_teacher_acc"] <= 100.0


def test_a_training_set_smaller_than_one_batch_is_refused(tmp_path):
    cfg = small_config(**QUICK, **{"method.name": "natural", "data.train_limit": 40, "data.batch_size": 64})
    with pytest.raises(ValueError, match="fewer than one batch of 64.*Lower data.batch_size"):
        run_training(cfg, tmp_path / "run", None, LoopContext())


def test_resume_falls_back_to_the_previous_state_when_the_newest_is_torn(digits_teacher: Path, tmp_path: Path):
    cfg = small_config(**{"teacher.checkpoint": str(digits_teacher), "train.epochs": 3})
    folder = tmp_path / "run"
    runs.write_config(folder, cfg)
    run_training(cfg, folder, load_teacher(cfg, digits_teacher), LoopContext())
    state = folder / runs.STATE_DIR / runs.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    result = CliRunner().invoke(app, ["train", "--resume", str(folder)])
    assert result.exit_code == 0, result.output
    assert "is unreadable (" in result.output and "resuming from the previous state instead (epoch 1)" in result.output
    assert [row["epoch"] for row in runs.read_metrics(folder)] == [1, 2, 3]
    assert runs.read_final(folder)["best_epoch"] in (1, 2, 3)

    for torn in (state, folder / runs.PREVIOUS_STATE_FILE):
        torn.write_bytes(b"torn")
    result = CliRunner().invoke(app, ["train", "--resume", str(folder)])
    assert result.exit_code == 2 and "No training state to resume from" in result.output
    assert "Traceback" not in result.output


def test_the_loop_accounts_for_its_compute_cumulatively_across_a_resume(digits_teacher: Path, tmp_path: Path):
    cfg = small_config(**{"teacher.checkpoint": str(digits_teacher), "train.epochs": 3,
                          "train.max_steps_per_epoch": 4})
    teacher = load_teacher(cfg, digits_teacher)
    folder = tmp_path / "run"

    def interrupt(epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, folder, teacher, LoopContext(on_epoch_start=interrupt))
    run_training(cfg, folder, teacher, LoopContext(resume_from=folder / runs.STATE_DIR))
    rows = runs.read_metrics(folder)
    per_epoch = 4 * cfg.data.batch_size
    assert [row["cost_images"] for row in rows] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert [row["cost_attack_passes"] for row in rows] == [n * per_epoch * cfg.attack.steps for n in (1, 2, 3)]
    device = [row["cost_device_s"] for row in rows]
    wall = [row["cost_wall_s"] for row in rows]
    assert 0 < device[0] < device[1] < device[2] and 0 < wall[0] < wall[1] < wall[2]
    final = runs.last_report(folder)
    natural = small_config(**{"method.name": "natural", "train.epochs": 1, "train.max_steps_per_epoch": 2})
    run_training(natural, tmp_path / "natural", None, LoopContext())
    assert runs.read_metrics(tmp_path / "natural")[0]["cost_attack_passes"] == 0, "no inner attack, no passes"
    assert final["epoch"] == 3
