"""Tests of ``crdnd_ray.tracking.server``: the MLflow UI on loopback, refused binds, Ctrl-C stops it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from conftest import free_port  # noqa: E402
from crdnd_ray.config import TrackingConfig  # noqa: E402
from crdnd_ray.tracking.server import serve_ui  # noqa: E402
from crdnd_ray.tracking.store import Recorder  # noqa: E402


def test_serve_ui_warns_on_a_public_bind_and_refuses_a_busy_port(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = serve_ui(port=port, host="0.0.0.0", tracking_uri=f"sqlite:///{tmp_path / 'ui.db'}")
    captured = capsys.readouterr()
    assert code == 2
    assert "Warning: binding the MLflow UI to 0.0.0.0 exposes every run" in captured.err
    assert f"cannot listen on 0.0.0.0:{port}" in captured.err and "--port" in captured.err
    assert not (tmp_path / "ui.db").exists()


def _processes_mentioning(text: str) -> list[int]:
    """PIDs of the processes whose command line contains ``text`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ui_prints_the_runs_link_quietly_and_a_signal_stops_its_whole_process_tree(sqlite_uri: str, tmp_path: Path,
                                                                                  stop: int) -> None:
    recorder = Recorder(TrackingConfig(uri=sqlite_uri), "shown")
    port = free_port()
    with open(tmp_path / "ui.err", "w") as errors:
        process = subprocess.Popen([sys.executable, "-m", "crdnd_ray.cli", "ui", "--port", str(port),
                                    "--tracking-uri", "sqlite:///mlflow.db", "--experiment", "shown"],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        first = process.stdout.readline()
        second = process.stdout.readline()
        assert first.startswith(f"MLflow UI for sqlite:///{tmp_path / 'mlflow.db'} at http://127.0.0.1:{port}")
        assert second.strip() == (f"experiment 'shown', all runs: http://127.0.0.1:{port}/#/experiments/"
                                  f"{recorder.experiment_id}?workflowType=machine_learning")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=shown",
                         timeout=10) as answer:
            assert json.loads(answer.read())["experiment"]["experiment_id"] == recorder.experiment_id
        assert len(_processes_mentioning(f"--port {port}")) >= 1
        process.send_signal(stop)
        assert process.wait(30) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _processes_mentioning(f"--port {port}"):
            time.sleep(0.2)
        assert not _processes_mentioning(f"--port {port}"), "a process of the server's tree outlived the UI"
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "the MLflow server still listens"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (tmp_path / "ui.err").read_text() == "", "no warning at start: the server's own output is in its log"
    assert (tmp_path / "mlflow-ui.log").stat().st_size > 0
    assert not (tmp_path / "mlruns").exists()
    assert os.path.exists(tmp_path / "mlflow.db")
