"""Tests of ``crdnd_ray.tracking.sync`` and of recording through an outage: a real ``mlflow server`` is killed in
the middle of a real sweep, which must go on without waiting for it; ``crdnd-ray sync`` then sends what it
missed. No mocks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from conftest import CLI, REPO, free_port, loss_steps, mlflow_runs, start_cli, wait_until  # noqa: E402
from crdnd_ray.tracking.server import start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.slow


def _server(tmp_path: Path, port: int):
    return start_server(port, "127.0.0.1", f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts",
                        log_file=tmp_path / "server.log")


def test_a_killed_tracking_server_never_blocks_a_sweep_and_sync_sends_what_it_missed(tmp_path, empty_store,
                                                                                    digits_teacher):
    shutil.copy(empty_store, tmp_path / "server.db")
    port = free_port()
    process, url = _server(tmp_path, port)
    folder = tmp_path / "sweep"
    sweep = start_cli(["sweep", str(REPO / "search_spaces" / "digits.yaml"), "--output", str(folder),
                       "--set", f"tracking.uri={url}", "--set", f"teacher.checkpoint={digits_teacher}",
                       "--set", "train.epochs=3", "--set", "eval.epoch_limit=32", "--set", "eval.final_limit=32",
                       "--set", "attack.steps=2", "--set", "search.num_samples=4", "--set", "search.max_concurrent=1",
                       "--set", "search.scheduler.kind=none", "--set", "eval.final_attacks=[clean]",
                       "--set", "eval.verify=false", "--set", "train.max_steps_per_epoch=6"],
                      tmp_path, tmp_path / "log")
    try:
        wait_until(lambda: any(folder.glob("trials/*/final_metrics.json")), 240, "the first finished trial")
        os.killpg(process.pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        assert sweep.wait(300) == 0, (tmp_path / "log").read_text()
        after_outage = time.perf_counter() - killed_at
    finally:
        if sweep.poll() is None:
            sweep.kill()
        stop_server(process)
    output = (tmp_path / "log").read_text()
    assert output.count("warning: the tracking store") == 1, output
    assert "Traceback" not in output and f"crdnd-ray sync {folder}" in output
    assert after_outage < 150, f"the sweep needed {after_outage:.0f} s after the store went down"
    assert len(list(folder.glob("trials/*/final_metrics.json"))) == 4

    process, url = _server(tmp_path, port)
    try:
        synced = subprocess.run([*CLI, "sync", str(folder)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert synced.returncode == 0, synced.stderr
        parent, children = mlflow_runs(url, folder)
        assert parent.info.status == "FINISHED" and len(children) == 4
        for child in children.values():
            assert child.info.status == "FINISHED" and child.data.tags["status"] == "finished"
            assert loss_steps(url, child) == [1, 2, 3] and "best_clean_acc" in child.data.metrics
        again = subprocess.run([*CLI, "sync", str(folder)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert " 0 run(s) sent or repaired" in again.stdout, again.stdout
    finally:
        stop_server(process)
