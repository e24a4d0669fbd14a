"""`crdnd-ray train` end to end on digits: output files, and distillation beats natural training."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import REPO, small_config
from crdnd_ray.cli import app
from crdnd_ray.engine.runner import train_run

pytestmark = pytest.mark.slow


def test_train_command_writes_checkpoints_metrics_and_final_metrics(tmp_path, digits_teacher):
    result = CliRunner().invoke(app, [
        "train", str(REPO / "search_spaces" / "digits.yaml"), "--output", str(tmp_path / "run"),
        "--set", "tracking.enabled=false", "--set", f"teacher.checkpoint={digits_teacher}", "--set", "train.epochs=2",
        "--set", "eval.final_limit=64", "--set", "eval.epoch_limit=64"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in epochs] == [0, 1]
    assert {"loss", "kd_adv", "kd_nat", "contrast", "clean_acc", "pgd20_acc", "lr", "images_per_s"} <= set(epochs[0])
    final = json.loads((run / "final_metrics.json").read_text())
    for which in ("best", "last"):
        assert set(final[which]) >= {"clean_acc", "fgsm_acc", "pgd20_acc", "cw_acc"}
        assert final[which]["pgd20_acc"] <= final[which]["clean_acc"]
    assert (run / "best.pt").exists() and (run / "last.pt").exists() and (run / "config.yaml").exists()
    assert "best" in result.output and "pgd20" in result.output


def test_distillation_keeps_twenty_points_more_pgd20_than_natural_training(tmp_path, digits_teacher):
    base = small_config(**{"teacher.checkpoint": str(digits_teacher), "train.epochs": 6,
                           "eval.epoch_limit": 128, "eval.final_limit": 225, "attack.steps": 5})
    natural = train_run(base.with_overrides({"method.name": "natural", "train.lr": base.teacher.training.lr}),
                        tmp_path / "natural")
    assert natural["last_clean_acc"] > 90
    for method in ("crdnd", "rslad", "ard"):
        final = train_run(base.with_overrides({"method.name": method}), tmp_path / method)
        assert final["best_pgd20_acc"] >= natural["last_pgd20_acc"] + 20, method
