"""Tests of crdnd_ray.engine.loop without Ray: the deferred divergence check and the train loader.

The loop no longer synchronises with the device at every step: the loss is summed on the device and
checked every ``FINITE_CHECK_STEPS`` steps and at the end of the epoch. These tests make a run diverge on
purpose (a teacher whose weights are NaN, or an absurd learning rate) and check that it still stops, in
the right epoch and step window, before anything of that epoch is written.
"""

from __future__ import annotations

import pytest
import torch
from conftest import small_config

from crdnd_ray.engine import loop
from crdnd_ray.engine.loop import DivergedError, LoopContext, read_metrics, run_training
from crdnd_ray.models import build_model

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
    with pytest.raises(DivergedError, match=r"at epoch 0, between steps 0 and 3\. Lower train\.lr"):
        run_training(cfg, tmp_path / "run", small_teacher(float("nan")), LoopContext())
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == []


def test_divergence_found_at_the_end_of_an_epoch_names_its_last_window(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "FINITE_CHECK_STEPS", 8)
    cfg = small_config(**QUICK, **{"method.name": "natural", "train.lr": 1e30, "train.max_steps_per_epoch": 13})
    with pytest.raises(DivergedError, match=r"at epoch 0, between steps 0 and 7\."):
        run_training(cfg, tmp_path / "run", None, LoopContext())


def test_epoch_metrics_are_the_mean_of_finite_steps(tmp_path):
    cfg = small_config(**QUICK, **{"method.name": "rslad", "train.max_steps_per_epoch": 3})
    run_training(cfg, tmp_path / "run", small_teacher(), LoopContext())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [0, 1]
    for row in rows:
        assert {"loss", "kd_adv", "kd_nat", "adv_acc", "teacher_acc"} <= set(row)
        assert row["loss"] == pytest.approx(0.1 * (5 / 6 * row["kd_adv"] + 1 / 6 * row["kd_nat"]), rel=1e-5)
        assert 0.0 <= row["adv_acc"] <= 1.0


def test_a_training_set_smaller_than_one_batch_is_refused(tmp_path):
    cfg = small_config(**QUICK, **{"method.name": "natural", "data.train_limit": 40, "data.batch_size": 64})
    with pytest.raises(ValueError, match="fewer than one batch of 64.*Lower data.batch_size"):
        run_training(cfg, tmp_path / "run", None, LoopContext())
