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


def test_serve_ui_prints_urls_and_stops_on_ctrl_c(sqlite_uri: str, tmp_path: Path) -> None:
    recorder = Recorder(TrackingConfig(uri=sqlite_uri), "shown")
    port = free_port()
    code = ("import sys; from crdnd_ray.tracking.server import serve_ui; "
            f"sys.exit(serve_ui(port={port}, tracking_uri='sqlite:///mlflow.db', experiment='shown'))")
    with open(tmp_path / "ui.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=log, text=True)
    try:
        first = process.stdout.readline()
        second = process.stdout.readline()
        assert first.startswith(f"MLflow UI for sqlite:///{tmp_path / 'mlflow.db'} at http://127.0.0.1:{port}")
        assert second.strip().endswith(f"http://127.0.0.1:{port}/#/experiments/{recorder.experiment_id}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=shown",
                         timeout=10) as answer:
            assert json.loads(answer.read())["experiment"]["experiment_id"] == recorder.experiment_id
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) != 0:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the MLflow server still listens after Ctrl-C")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert not (tmp_path / "mlruns").exists()
    assert os.path.exists(tmp_path / "mlflow.db")
