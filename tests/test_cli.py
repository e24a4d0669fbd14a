"""The ``crdnd-ray`` console script as a user runs it: every command listed, bad input refused before any work
with exit 2 and one paragraph, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLI, REPO, free_port



def test_help_lists_every_command():
    done = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("train", "teacher", "evaluate", "sweep", "ablate", "report", "ui"):
        assert command in done.stdout, command


def test_the_console_script_prints_no_traceback(tmp_path):
    """The installed ``crdnd-ray`` itself (not only the in-process runner): exit 2, one line, no traceback."""
    script = Path(sys.executable).with_name("crdnd-ray")
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  epochz: 3\n")
    done = subprocess.run([str(script), "teacher", str(config), "--output", str(tmp_path / "out"), "--set", "tracking.enabled=false"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "train.epochz" in lines[0] and "line 2" in lines[0] and "Did you mean 'epochs'?" in lines[0]
    assert not (tmp_path / "out").exists(), "nothing is written for a bad config"


@pytest.mark.parametrize("command", [["train"], ["sweep"], ["ablate"]])
def test_the_cli_refuses_an_unknown_method_in_seconds_with_exit_2(tmp_path, command):
    source = REPO / ("ablations" if command == ["ablate"] else "search_spaces") / "digits.yaml"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "crdnd_ray.cli", *command, str(source), "--set", "method.name=crdn",
                           "--output", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.perf_counter() - started
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Did you mean 'crdnd'?" in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    print(f"\n{command[0]}: refused in {elapsed:.1f} s")


def _refused(tmp_path: Path, args: list[str], *needles: str) -> str:
    """Run ``crdnd-ray ARGS`` with a private teacher cache: exit 2, one paragraph naming every needle, no
    traceback, no output folder and no teacher trained."""
    cache = tmp_path / "teacher-cache"
    env = {**os.environ, "CRDND_RAY_CACHE": str(cache)}
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args], cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    elapsed = time.perf_counter() - started
    message = " ".join(done.stderr.split())
    assert done.returncode == 2, done.stdout + done.stderr
    assert message.startswith("error:") and "Traceback" not in done.stderr + done.stdout, done.stderr
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / "out").exists() and not cache.exists(), "refused before any work"
    assert elapsed < 60, f"took {elapsed:.0f} s"
    return message


DIGITS = str(REPO / "search_spaces" / "digits.yaml")


def test_a_typo_in_the_final_attacks_is_refused_before_training(tmp_path):
    _refused(tmp_path, ["train", DIGITS, "--output", "out", "--set", "eval.final_attacks=[clean, pgd2x]"],
             "eval.final_attacks names 'pgd2x'", "pgd<K>")


@pytest.mark.parametrize("command", ["train", "sweep", "ablate"])
def test_an_unreachable_tracking_server_is_refused_before_the_teacher_is_trained(tmp_path, command):
    source = str(REPO / ("ablations" if command == "ablate" else "search_spaces") / "digits.yaml")
    _refused(tmp_path, [command, source, "--output", "out", "--set", f"tracking.uri=http://127.0.0.1:{free_port()}"],
             "does not answer", "tracking.enabled: false")


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    message = _refused(tmp_path, ["train", DIGITS, "--output", "a-file/run", "--set", "tracking.enabled=false"],
                       "cannot be written", "--output")
    assert "a-file" in message


def test_a_teacher_checkpoint_that_does_not_fit_teacher_kwargs_is_refused(tmp_path):
    from crdnd_ray.checkpoints import save_model
    from crdnd_ray.models import build_model

    path = save_model(tmp_path / "wide.pt", build_model("small_cnn", 10, in_channels=1, width=32), "small_cnn",
                      {"width": 32}, num_classes=10, in_channels=1)
    _refused(tmp_path, ["train", DIGITS, "--output", "out", "--set", "tracking.enabled=false",
                        "--set", f"teacher.checkpoint={path}", "--set", "teacher.kwargs={width: 16}"],
             "'width': 32", "teacher.kwargs: {'width': 32}")


def test_missing_cifar_data_is_refused_before_any_work(tmp_path):
    _refused(tmp_path, ["train", str(REPO / "search_spaces" / "cifar10.yaml"), "--output", "out",
                        "--set", "tracking.enabled=false", "--set", f"data.root={tmp_path / 'nothing'}",
                        "--set", "teacher.checkpoint=null"],
             "cifar-10-batches-py", "data.download")


def test_an_asha_grace_period_longer_than_the_run_is_refused_by_the_dry_run_too(tmp_path):
    for extra in ([], ["--dry-run"]):
        _refused(tmp_path, ["sweep", DIGITS, "--output", "out", "--set", "train.epochs=2", *extra],
                 "grace_period=3 is longer than the 2 epochs")


def test_the_dry_run_lists_what_this_machine_lacks_as_warnings(tmp_path):
    done = subprocess.run([*CLI, "sweep", str(REPO / "search_spaces" / "cifar100.yaml"), "--dry-run",
                           "--set", f"tracking.uri=http://127.0.0.1:{free_port()}",
                           "--set", f"data.root={tmp_path / 'nothing'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    warnings = " ".join(json.loads(done.stdout)["plan"]["details"]["warnings"])
    assert "cifar-100-python" in warnings and "does not answer" in warnings


@pytest.mark.slow
def test_verify_a_run_folder_prints_every_check_and_records_the_verdicts(tmp_path, digits_teacher):
    from mlflow import MlflowClient

    from crdnd_ray import runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trained = subprocess.run([*CLI, "train", DIGITS, "--output", "run", "--set", f"tracking.uri={uri}",
                              "--set", f"teacher.checkpoint={digits_teacher}", "--set", "train.epochs=2",
                              "--set", "eval.final_limit=48", "--set", "eval.epoch_limit=48"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    done = subprocess.run([*CLI, "verify", "run", "--limit", "48", "--no-transfer"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for check in ("ordering", "eps_growth", "more_iterations", "autoattack_gap"):
        assert f" {check}: " in done.stdout, check
    assert "AutoAttack" in done.stdout and (tmp_path / "run" / "verify.json").is_file()
    run = MlflowClient(uri).get_run(runs.read_run_info(tmp_path / "run")["mlflow_run_id"])
    assert run.data.tags["verify"] in ("pass", "warn") and "verify_autoattack_acc" in run.data.metrics
    refused = subprocess.run([*CLI, "verify", "not-a-run"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "neither a folder nor an MLflow run id" in " ".join(refused.stderr.split())
