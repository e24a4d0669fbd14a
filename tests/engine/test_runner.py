"""`crdnd-ray train` end to end on digits: output files, and distillation beats natural training."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest
from typer.testing import CliRunner

from conftest import CLI, REPO, loss_steps, small_config, start_cli, wait_until
from crdnd_ray.cli import app
from crdnd_ray.engine.runner import train_run
from crdnd_ray.tracking import links

pytestmark = pytest.mark.slow


def test_train_command_writes_checkpoints_metrics_and_final_metrics(tmp_path, digits_teacher):
    result = CliRunner().invoke(app, [
        "train", str(REPO / "search_spaces" / "digits.yaml"), "--output", str(tmp_path / "run"),
        "--set", "tracking.enabled=false", "--set", f"teacher.checkpoint={digits_teacher}", "--set", "train.epochs=2",
        "--set", "eval.final_limit=64", "--set", "eval.epoch_limit=64"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in epochs] == [1, 2]
    assert {"loss", "kd_adv", "kd_nat", "contrast", "epoch_clean_acc", "epoch_pgd20_acc", "lr", "images_per_s"} <= set(epochs[0])
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


def test_train_records_while_it_trains_and_resume_continues_the_same_mlflow_run(tmp_path, digits_teacher,
                                                                               monkeypatch):
    from mlflow import MlflowClient

    from crdnd_ray import runs
    from crdnd_ray.engine import runner

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = small_config(**{"teacher.checkpoint": str(digits_teacher), "train.epochs": 4, "tracking.enabled": True,
                          "tracking.uri": uri, "experiment.name": "resumed-train"})
    folder = tmp_path / "run"
    runs.write_config(folder, cfg)
    seen: list[int] = []
    original = runner.run_training

    def interrupted(cfg, output_dir, teacher, context):
        def stop(epoch: int) -> None:
            if epoch == 2:
                raise KeyboardInterrupt
        context.on_epoch_start = stop
        inner = context.report

        def report(row, checkpoint):
            seen.append(len(MlflowClient(uri).get_metric_history(runs.read_run_info(folder)["mlflow_run_id"],
                                                                 "loss")))
            inner(row, checkpoint)
        context.report = report
        return original(cfg, output_dir, teacher, context)

    monkeypatch.setattr(runner, "run_training", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, folder)
    monkeypatch.undo()
    assert seen == [0, 1], "each epoch reaches MLflow while the run trains, before the next one"
    client = MlflowClient(uri)
    run_id = runs.read_run_info(folder)["mlflow_run_id"]
    assert client.get_run(run_id).data.tags["status"] == "killed"

    result = CliRunner().invoke(app, ["train", "--resume", str(folder)])
    assert result.exit_code == 0, result.output
    experiment = client.get_experiment_by_name("resumed-train")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
    assert sorted(p.step for p in client.get_metric_history(run_id, "epoch_pgd20_acc")) == [1, 2, 3, 4]
    assert run.data.metrics["best_pgd20_acc"] == runs.read_final(folder)["best_pgd20_acc"]
    assert undescribed_metrics(experiment.tags[links.NOTE_TAG], run.data.metrics) == []


def undescribed_metrics(description: str, metrics: dict) -> list[str]:
    """The metric names that no name of the experiment description's table covers (``<attack>`` matching any)."""
    named = re.findall(r"`([a-z0-9_<>]+)`", description)
    patterns = [re.compile("^" + re.sub(r"<\w+>", r"\\w+", name) + "$") for name in named]
    return sorted(metric for metric in metrics if not any(pattern.match(metric) for pattern in patterns))


def test_sigterm_ends_a_training_run_as_killed_and_resume_finishes_the_same_mlflow_run(tmp_path, digits_teacher):
    from mlflow import MlflowClient

    from crdnd_ray import runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "run"
    args = ["train", str(REPO / "search_spaces" / "digits.yaml"), "--output", str(folder),
            "--set", f"tracking.uri={uri}", "--set", f"teacher.checkpoint={digits_teacher}", "--set", "train.epochs=6",
            "--set", "eval.epoch_limit=32", "--set", "eval.final_limit=32", "--set", "attack.steps=2"]
    process = start_cli(args, tmp_path, tmp_path / "log")
    wait_until(lambda: len(runs.read_metrics(folder)) >= 2, 180, "two epochs")
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(60) == 130
    output = (tmp_path / "log").read_text()
    assert f"crdnd-ray train --resume {folder}" in " ".join(output.split()) and "Traceback" not in output
    run_id = runs.read_run_info(folder)["mlflow_run_id"]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["status"] == "killed"
    assert "--resume" in run.data.tags["status_reason"]

    resumed = subprocess.run([*CLI, "train", "--resume", str(folder)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
    assert loss_steps(uri, run) == list(range(1, 7))
