"""Tests of the run-folder contract (``crdnd_ray.runs``): readers, writers, and the one status rule."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_run_folder
from crdnd_ray import runs
from crdnd_ray.checkpoints import CheckpointError
from crdnd_ray.config import ConfigError, RunConfig


def test_a_torn_last_line_is_skipped_everywhere(tmp_path):
    write_run_folder(tmp_path, epochs=3, final=False)
    with open(tmp_path / runs.METRICS_FILE, "a") as handle:
        handle.write('{"epoch": 4, "loss": 0.')
    assert [row["epoch"] for row in runs.read_metrics(tmp_path)] == [1, 2, 3]
    assert runs.last_report(tmp_path)["epoch"] == 3
    assert runs.run_status(runs.last_report(tmp_path), ended=True)[0] == "stopped_early"
    assert runs.read_metrics(tmp_path / "absent") == [] and runs.last_report(tmp_path / "absent") is None


def test_metrics_and_final_metrics_round_trip(tmp_path):
    history = [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 1.0}]
    runs.write_metrics(tmp_path, history)
    assert runs.read_metrics(tmp_path) == history
    assert runs.read_final(tmp_path) is None
    flat = runs.write_final(tmp_path, {"pgd20_acc": 40.0}, {"pgd20_acc": 38.0}, best_epoch=0)
    assert flat == {"best_pgd20_acc": 40.0, "last_pgd20_acc": 38.0, "best_epoch": 0}
    assert runs.read_final(tmp_path) == flat
    assert json.loads((tmp_path / runs.FINAL_FILE).read_text())["best_epoch"] == 0
    assert runs.last_report(tmp_path) == {"epoch": 1, "loss": 1.0, **flat}
    assert not list(tmp_path.glob("*.tmp"))


def test_config_round_trip_and_a_missing_config_is_a_config_error(tmp_path):
    cfg = RunConfig().with_overrides({"train.epochs": 3, "method.temperature": 2.5})
    runs.write_config(tmp_path, cfg)
    assert runs.read_config(tmp_path) == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        runs.read_config(tmp_path / "nowhere")


@pytest.mark.parametrize(("report", "ended", "error", "expected"), [
    ({"epoch": 4, "best_epoch": 2}, True, None, ("finished", "")),
    ({"epoch": 4, "best_epoch": 2}, False, None, ("finished", "")),
    ({"epoch": 1}, False, None, ("running", "")),
    ({"epoch": 1}, True, None, ("stopped_early", "The scheduler stopped the run after epoch 1.")),
    (None, True, None, ("stopped_early", "The scheduler stopped the run before its first epoch ended.")),
    ({"epoch": 4, "best_epoch": 2}, True, "RuntimeError: boom", ("failed", "RuntimeError: boom")),
    (None, True, "ValueError: bad", ("failed", "ValueError: bad")),
])
def test_the_one_status_rule(report, ended, error, expected):
    assert runs.run_status(report, ended=ended, error=error) == expected


def test_run_info_merges_facts(tmp_path):
    assert runs.read_run_info(tmp_path) == {}
    runs.update_run_info(tmp_path, kind="sweep")
    assert runs.update_run_info(tmp_path, mlflow_run_id="abc") == {"kind": "sweep", "mlflow_run_id": "abc"}
    (tmp_path / runs.RUN_INFO_FILE).write_text("{not json")
    assert runs.read_run_info(tmp_path) == {}


def test_a_torn_newest_state_falls_back_to_the_previous_one_and_says_so(tmp_path):
    first = runs.write_state(tmp_path, {"epoch": 0, "weights": torch.zeros(3)})
    runs.write_state(tmp_path, {"epoch": 1, "weights": torch.ones(3)})
    assert (tmp_path / runs.PREVIOUS_STATE_FILE).is_file()
    assert runs.read_state(first)["epoch"] == 1
    newest = first / runs.STATE_FILE
    newest.write_bytes(newest.read_bytes()[:40])
    said: list[str] = []
    state = runs.read_state(first, said.append)
    assert state["epoch"] == 0 and torch.equal(state["weights"], torch.zeros(3))
    assert len(said) == 1 and "unreadable" in said[0] and "previous state" in said[0] and "epoch 0" in said[0]
    (tmp_path / runs.PREVIOUS_STATE_FILE).write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="No training state to resume from.*unreadable.*without --resume"):
        runs.read_state(first)
