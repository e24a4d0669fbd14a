"""The ``crdnd-ray`` console script as a user runs it: every command listed, bad input refused before any work
with exit 2 and one paragraph, never a traceback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

CLI = [sys.executable, "-m", "crdnd_ray.cli"]


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
