"""The sweep engine end to end on digits: ASHA, multi-objective, conditions, NaN trials, resume, dry runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import (CLI, REPO, epochs_done, interrupt_then_resume, loss_steps, mlflow_runs, small_config,
                      start_cli, wait_until)
from crdnd_ray.cli import app
from crdnd_ray.config import ConfigError, load_config
from crdnd_ray.engine.sweep import plan_sweep, resolve_space, run_sweep, validate_space

pytestmark = pytest.mark.slow


def sweep_config(tmp_path: Path, **overrides):
    """A fast digits sweep recording into a temporary SQLite store."""
    base = {
        "tracking.enabled": True,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "train.epochs": 3,
        "train.max_steps_per_epoch": 6,
        "eval.epoch_limit": 64,
        "eval.final_attacks": ["clean", "pgd20"],
        "search.num_samples": 4,
    }
    base.update(overrides)
    return small_config(**base)


def test_asha_stops_a_trial_early_and_later_trials_still_start(tmp_path, ray_session, digits_teacher):
    cfg = sweep_config(
        tmp_path,
        **{"teacher.checkpoint": str(digits_teacher), "train.epochs": 4, "train.max_steps_per_epoch": None,
           "search.metric": "epoch_clean_acc", "search.max_concurrent": 1,
           "search.scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
           "search.space": {"train.lr": {"type": "loguniform", "low": 1e-6, "high": 1.0}}},
    )
    handler = signal.getsignal(signal.SIGINT)
    outcome = run_sweep(cfg, tmp_path / "sweep", printer=lambda line: None)
    assert signal.getsignal(signal.SIGINT) is handler, "Ray Tune's SIGINT handler would swallow a later Ctrl-C"
    statuses = [row["status"] for row in outcome["rows"]]
    assert len(statuses) == 4
    assert "stopped_early" in statuses
    assert all(status in ("finished", "stopped_early") for status in statuses)
    stopped = [row for row in outcome["rows"] if row["status"] == "stopped_early"]
    assert all(row["epochs"] < 4 for row in stopped)
    assert (tmp_path / "sweep" / "best.yaml").exists()


def test_multi_objective_sweep_returns_a_non_dominated_set_and_respects_conditions(tmp_path, ray_session,
                                                                                   digits_teacher):
    cfg = sweep_config(
        tmp_path,
        **{"teacher.checkpoint": str(digits_teacher), "train.epochs": 2,
           "search.metric": ["epoch_clean_acc", "epoch_pgd20_acc"], "search.mode": ["max", "max"],
           "search.scheduler": {"kind": "none"}, "search.sampler": {"kind": "nsga2", "seed": 1},
           "search.num_samples": 5,
           "search.space": {
               "method.compensation.kind": {"type": "choice", "values": ["none", "confidence"]},
               "method.compensation.beta": {"type": "uniform", "low": 0.5, "high": 3.0,
                                            "when": {"method.compensation.kind": ["confidence"]}},
               "train.lr": {"type": "loguniform", "low": 1e-4, "high": 0.3},
           }},
    )
    outcome = run_sweep(cfg, tmp_path / "sweep", printer=lambda line: None)
    rows = outcome["rows"]
    assert len(rows) == 5
    for row in rows:
        has_beta = isinstance(row.get("param.method.compensation.beta"), float) and not np.isnan(
            row["param.method.compensation.beta"])
        assert has_beta == (row["param.method.compensation.kind"] == "confidence")
    front = outcome["pareto"]
    assert front
    finished = [row for row in rows if row["status"] == "finished"]
    for member in front:
        dominated = any(other["epoch_clean_acc"] >= member["epoch_clean_acc"] and other["epoch_pgd20_acc"] >= member["epoch_pgd20_acc"]
                        and (other["epoch_clean_acc"] > member["epoch_clean_acc"] or other["epoch_pgd20_acc"] > member["epoch_pgd20_acc"])
                        for other in finished)
        assert not dominated
    outside = [row for row in finished if row["trial_id"] not in {m["trial_id"] for m in front}]
    for row in outside:
        assert any(m["epoch_clean_acc"] >= row["epoch_clean_acc"] and m["epoch_pgd20_acc"] >= row["epoch_pgd20_acc"] for m in front)
    assert (tmp_path / "sweep" / "pareto.csv").exists()


def test_a_diverging_trial_is_marked_failed_and_the_others_finish(tmp_path, ray_session, digits_teacher):
    cfg = sweep_config(
        tmp_path,
        **{"teacher.checkpoint": str(digits_teacher), "train.epochs": 2, "search.scheduler": {"kind": "none"},
           "search.sampler": {"kind": "random", "seed": 2},
           "search.space": {"train.lr": {"type": "choice", "values": [0.05, 1.0e30]}}},
    )
    outcome = run_sweep(cfg, tmp_path / "sweep", printer=lambda line: None)
    rows = outcome["rows"]
    diverged = [row for row in rows if row["param.train.lr"] > 1]
    healthy = [row for row in rows if row["param.train.lr"] < 1]
    assert diverged and healthy, "the seeded sampler should pick both learning rates"
    assert all(row["status"] == "failed" and ("nan" in row["reason"].lower() or "inf" in row["reason"].lower())
               for row in diverged)
    assert all(row["status"] == "finished" for row in healthy)

    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=[cfg.experiment.name], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{outcome['parent_run_id']}'")
    by_status = {run.data.tags.get("status") for run in runs}
    assert {"failed", "finished"} <= by_status


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, digits_teacher):
    folder = tmp_path / "sweep"
    command = ["sweep", str(REPO / "search_spaces" / "digits.yaml"), "--set", "tracking.enabled=false",
               "--set", f"teacher.checkpoint={digits_teacher}", "--set", "train.epochs=2",
               "--set", "eval.epoch_limit=32", "--set", "eval.final_limit=32", "--set", "search.num_samples=5",
               "--set", "search.max_concurrent=1", "--set", "search.scheduler.kind=none",
               "--set", "eval.final_attacks=[clean]", "--set", "attack.steps=2", "--set", "eval.verify=false"]
    before, after = interrupt_then_resume(command, folder, tmp_path, finished=2)
    assert 2 <= len(before) < 5
    assert len(after) == 5
    for trial_id, mtime in before.items():
        assert after[trial_id] == mtime, f"trial {trial_id} was rerun"
    table = pd.read_csv(folder / "results.csv")
    assert len(table) == 5 and table["trial_id"].is_unique


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "digits"])
def test_search_space_files_validate_with_dry_run(name):
    result = CliRunner().invoke(app, ["sweep", str(REPO / "search_spaces" / f"{name}.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    cfg = load_config(REPO / "search_spaces" / f"{name}.yaml")
    plan = printed["plan"]
    assert plan["kind"] == "sweep" and plan["trials"] == cfg.search.num_samples
    assert plan["epochs"] == cfg.train.epochs and 1 <= plan["concurrent"] <= cfg.search.max_concurrent
    assert set(plan["details"]["space"]) == set(cfg.search.space)
    assert printed["config"] == cfg.run_dict()


@pytest.mark.parametrize("space, message", [
    ({"method.temprature": {"type": "uniform", "low": 1, "high": 2}}, "temprature"),
    ({"method.temperature": {"type": "uniform", "low": 2, "high": 1}}, "empty"),
    ({"method.temperature": {"type": "loguniform", "low": 0, "high": 1}}, "positive"),
    ({"method.temperature": {"type": "uniform", "low": 1, "high": 2, "when": {"method.nothing": [1]}}},
     "method.nothing"),
])
def test_bad_spaces_are_clear_errors_before_anything_starts(space, message):
    with pytest.raises(ConfigError, match=message):
        validate_space(small_config(**{"search.space": space}))


def test_a_condition_on_a_fixed_config_key_is_decided_by_the_config():
    space = {"train.lr": {"type": "loguniform", "low": 0.1, "high": 10.0},
             "method.contrastive.weight": {"type": "loguniform", "low": 0.05, "high": 2.0,
                                           "when": {"method.contrastive.kind": ["infonce", "relation"]}},
             "method.compensation.beta": {"type": "uniform", "low": 0.5, "high": 3.0,
                                          "when": {"method.compensation.kind": ["confidence"]}}}
    cfg = small_config(**{"search.space": space, "method.compensation.kind": "none"})
    resolved = resolve_space(cfg, cfg.search.space, "search.space")
    assert sorted(resolved) == ["method.contrastive.weight", "train.lr"]
    assert resolved["method.contrastive.weight"].when is None
    assert sorted(resolve_space(cfg, cfg.search.space, "search.space", pinned=["train.lr"])) == [
        "method.contrastive.weight"]


def test_a_single_objective_search_needs_a_metric_reported_every_epoch():
    with pytest.raises(ConfigError, match="single-objective Optuna search needs"):
        validate_space(small_config(**{"search.metric": "best_pgd20_acc", "search.scheduler": {"kind": "none"}}))


def test_asha_with_several_objectives_is_refused():
    with pytest.raises(ConfigError, match="ASHA"):
        small_config(**{"search.metric": ["epoch_clean_acc", "epoch_pgd20_acc"], "search.mode": ["max", "max"]})


def test_dry_run_plans_fractional_cpus_that_fit_this_machine():
    cfg = small_config()
    plan = plan_sweep(cfg)
    cpus = float(os.cpu_count() or 1)
    assert plan.trials == cfg.search.num_samples and plan.in_process
    assert plan.details["cluster"] == {"CPU": cpus}
    share = round(min((cpus - 0.01 * cfg.search.max_concurrent) / cfg.search.max_concurrent, 1.0), 3)
    assert f"each worker {{'CPU': {share}}}" in plan.resources
    assert plan.concurrent == min(cfg.search.max_concurrent, int(cpus // (share + 0.01)))
    assert 0 < share < 1 or cpus > cfg.search.max_concurrent


def _fault_sweep_args(teacher: Path, samples: int = 3) -> list[str]:
    return ["sweep", str(REPO / "search_spaces" / "digits.yaml"), "--set", "tracking.uri=sqlite:///mlflow.db",
            "--set", f"teacher.checkpoint={teacher}", "--set", "train.epochs=6", "--set", "eval.epoch_limit=32",
            "--set", "eval.final_limit=32", "--set", "attack.steps=2", "--set", f"search.num_samples={samples}",
            "--set", "search.max_concurrent=1", "--set", "search.scheduler.kind=none",
            "--set", "eval.final_attacks=[clean]", "--set", "eval.verify=false", "--set", "train.max_steps_per_epoch=6"]


def _one_finished_and_one_running(folder: Path) -> bool:
    done = {path.parent.name for path in folder.glob("trials/*/final_metrics.json")}
    return bool(done) and any(count >= 1 and trial not in done for trial, count in epochs_done(folder).items())


@pytest.mark.parametrize("stop", ["SIGTERM to the driver", "Ctrl-C (SIGINT to the process group)"])
def test_a_signal_ends_a_sweep_in_seconds_with_its_tables_and_the_unfinished_run_killed(tmp_path, digits_teacher, stop):
    folder, uri = tmp_path / "sweep", f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = start_cli([*_fault_sweep_args(digits_teacher), "--output", str(folder)], tmp_path, tmp_path / "log")
    wait_until(lambda: _one_finished_and_one_running(folder), 240, "a finished trial and a running one")
    signalled = time.perf_counter()
    if stop.startswith("SIGTERM"):
        os.kill(process.pid, signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGINT)
    assert process.wait(120) == 130
    ended_in = time.perf_counter() - signalled
    output = (tmp_path / "log").read_text()
    assert ended_in < 45, f"took {ended_in:.0f} s to stop"
    assert f"--resume {folder}" in output and "Traceback" not in output
    table = pd.read_csv(folder / "results.csv")
    assert "killed" in set(table["status"]) and "finished" in set(table["status"])
    parent, children = mlflow_runs(uri, folder)
    assert parent.info.status == "KILLED" and parent.data.tags["status"] == "killed"
    killed = [c for c in children.values() if c.data.tags["status"] == "killed"]
    assert killed and all(c.info.status == "KILLED" and "--resume" in c.data.tags["status_reason"] for c in killed)
    assert not [c for c in children.values() if c.info.status == "RUNNING"]

    resumed = subprocess.run([*CLI, *_fault_sweep_args(digits_teacher), "--resume", str(folder)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    parent, children = mlflow_runs(uri, folder)
    assert parent.info.status == "FINISHED" and len(children) == 3
    for child in children.values():
        assert child.info.status == "FINISHED" and child.data.tags["status"] == "finished"
        assert loss_steps(uri, child) == list(range(1, 7)), "every epoch once, none twice"


def test_a_sigkilled_sweep_is_repaired_by_resume(tmp_path, digits_teacher):
    folder, uri = tmp_path / "sweep", f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = start_cli([*_fault_sweep_args(digits_teacher), "--output", str(folder)], tmp_path, tmp_path / "log")
    wait_until(lambda: _one_finished_and_one_running(folder), 240, "a finished trial and a running one")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    parent, children = mlflow_runs(uri, folder)
    assert parent.info.status == "RUNNING" and any(c.info.status == "RUNNING" for c in children.values())

    resumed = subprocess.run([*CLI, *_fault_sweep_args(digits_teacher), "--resume", str(folder)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    parent, children = mlflow_runs(uri, folder)
    assert parent.info.status == "FINISHED"
    assert not [c for c in children.values() if c.info.status == "RUNNING"], "no run is left RUNNING"
    table = pd.read_csv(folder / "results.csv")
    assert (table["status"] == "finished").sum() == 3
    for child in children.values():
        assert child.data.tags["status"] in ("finished", "killed")
        steps = loss_steps(uri, child)
        assert steps == sorted(set(steps)), "no epoch logged twice"


def test_a_sweep_whose_every_trial_fails_exits_1_with_the_reasons(tmp_path, digits_teacher):
    done = subprocess.run([*CLI, *_fault_sweep_args(digits_teacher, samples=2), "--output", str(tmp_path / "sweep"),
                           "--set", "train.epochs=1",
                           "--set", "search.space={train.lr: {type: loguniform, low: 1.0e+29, high: 1.0e+30}}"],
                          cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 1, done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    assert "no trial of the sweep finished (2 of 2 failed" in message and "NaN" in message
    assert "Traceback" not in done.stderr
    assert len(pd.read_csv(tmp_path / "sweep" / "results.csv")) == 2


def test_a_verified_sweep_picks_its_best_by_autoattack_and_its_costs_add_up(tmp_path, ray_session, digits_teacher):
    from mlflow import MlflowClient

    cfg = sweep_config(tmp_path, **{"teacher.checkpoint": str(digits_teacher), "train.epochs": 2,
                                    "search.num_samples": 2, "search.scheduler": {"kind": "none"},
                                    "search.sampler": {"kind": "random", "seed": 3}, "eval.verify": True,
                                    "eval.verify_top": 2, "eval.final_limit": 48, "teacher.training.epochs": 2})
    lines: list[str] = []
    outcome = run_sweep(cfg, tmp_path / "sweep", printer=lines.append)
    verified = [row for row in outcome["rows"] if isinstance(row.get("verify_autoattack_acc"), float)]
    assert len(verified) == 2 and all(row["verify"] in ("pass", "warn") for row in verified)
    assert outcome["best"]["verify_autoattack_acc"] == max(row["verify_autoattack_acc"] for row in verified)
    assert "# best trial " + outcome["best"]["trial_id"] in (tmp_path / "sweep" / "best.yaml").read_text()
    table = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert {"verify_autoattack_acc", "verify", "verify_gap_pgd20_autoattack"} <= set(table.columns)
    assert (tmp_path / "sweep" / "verify" / "surrogate" / "best.pt").is_file(), "one surrogate for the sweep"

    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(outcome["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    for child in children:
        row = next(r for r in outcome["rows"] if r["trial_id"] == child.data.tags["trial_id"])
        assert child.data.metrics["verify_autoattack_acc"] == pytest.approx(row["verify_autoattack_acc"])
        assert child.data.tags["verify"] == row["verify"] and "verify.autoattack_gap" in child.data.tags
        assert "verify.json" in {item.path for item in client.list_artifacts(child.info.run_id)}
    for key in ("cost_images", "cost_device_s", "cost_attack_passes"):
        assert parent.data.metrics[key.replace("cost_", "total_")] == pytest.approx(table[key].sum()), key
    assert table["cost_images"].min() == 2 * 6 * 64, "2 epochs of 6 steps of 64 examples per trial"
    assert any(line.startswith("verifying trial") for line in lines)


def test_the_best_trial_of_a_tie_is_the_one_proposed_first_whatever_the_start_order():
    from crdnd_ray.engine.sweep import best_row

    rows = [{"trial_id": "ab12c_00003", "status": "finished", "epoch_pgd20_acc": 56.25},
            {"trial_id": "ab12c_00001", "status": "finished", "epoch_pgd20_acc": 56.25},
            {"trial_id": "ab12c_00002", "status": "failed", "epoch_pgd20_acc": 90.0},
            {"trial_id": "ab12c_00000", "status": "stopped_early", "epoch_pgd20_acc": 40.0}]
    assert best_row(rows, "epoch_pgd20_acc", "max")["trial_id"] == "ab12c_00001"
    assert best_row(list(reversed(rows)), "epoch_pgd20_acc", "max")["trial_id"] == "ab12c_00001"
    assert best_row(rows, "epoch_pgd20_acc", "min")["trial_id"] == "ab12c_00000"
    assert best_row([rows[2]], "epoch_pgd20_acc", "max") is None
