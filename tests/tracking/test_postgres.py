"""MLflow on PostgreSQL (``crdnd_ray.tracking.postgres``, ``crdnd-ray server``): a real sweep and a real ablation
record into it at the same time and nothing is lost; ``report`` and ``ui`` read it; SIGTERM stops every process
and the data outlive the server.

The server tests need PostgreSQL's programs (``initdb``, ``pg_ctl``; Debian package ``postgresql``, which
``.ci/run`` installs) and are skipped with that reason where they are missing. The server folder is made with
``tempfile.mkdtemp`` in /tmp, not pytest's ``tmp_path``: when the tests run as root, PostgreSQL runs as the
user ``postgres``, which cannot enter ``/tmp/pytest-of-root`` (mode 0700), and a Unix socket's path must stay
short. The sweep and the ablation are two ``crdnd-ray`` processes that join one Ray node started for them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import REPO, free_port
from typer.testing import CliRunner

from crdnd_ray import runs
from crdnd_ray.cli import app
from crdnd_ray.processes import alive, process_tree, stop_tree, wait_gone
from crdnd_ray.tracking import postgres
from crdnd_ray.tracking.postgres import PostgresCluster, PostgresNotFound

SMALL = ["teacher.training.epochs=4", "train.epochs=2", "eval.epoch_limit=64", "eval.final_limit=64",
         "attack.steps=3"]
"""The digits files shrunk for tests (as ``conftest.small_config``)."""
SWEEP = ["search.num_samples=2", "search.scheduler.kind=none", "eval.verify=false"]
ABLATION = ["ablation.seeds=[0]", "ablation.variants={crdnd: {}, no_contrastive: {method.contrastive.kind: none}}",
            "ablation.tune=null"]
RUN_FILES = {"config.yaml", "best.pt", "final_metrics.json", "metrics.jsonl", "learning_curve.png"}


def _postgres_missing() -> str | None:
    try:
        postgres.find_pg_binary("initdb")
        postgres.find_pg_binary("pg_ctl")
    except PostgresNotFound:
        return ("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
                "install it with 'apt-get install -y postgresql' to run the MLflow-on-PostgreSQL tests.")
    return None


needs_postgres = pytest.mark.skipif(_postgres_missing() is not None, reason=_postgres_missing() or "")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **extra}


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (the server folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in command and state != "Z":
            found.append(f"{entry.name}: {command.strip()}")
    return found


def _assert_gone(pids: list[int], folder: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (alive(pids) or _processes_mentioning(str(folder))):
        time.sleep(0.2)
    assert alive(pids) == [], f"processes left after stop: {alive(pids)}"
    assert _processes_mentioning(str(folder)) == []


def _start_server_command(folder: Path, port: int) -> tuple[subprocess.Popen, list[str]]:
    """``crdnd-ray server FOLDER --port PORT`` until it prints its URL (a watchdog kills it after 15 min)."""
    process = subprocess.Popen([sys.executable, "-m", "crdnd_ray.cli", "server", str(folder), "--port", str(port)],
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    watchdog = threading.Timer(900, lambda: process.poll() is None and stop_tree(process.pid, signal.SIGKILL, 0))
    watchdog.daemon = True
    watchdog.start()
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "MLflow tracking server at" in line:
            break
    assert process.poll() is None, "".join(lines)
    return process, lines


def test_uri_goes_through_the_unix_socket() -> None:
    from sqlalchemy.engine import make_url

    cluster = PostgresCluster(Path("/srv/mlflow/postgres"), 5433, Path("/srv/mlflow/postgres/run"))
    url = make_url(cluster.uri("mlflow"))
    assert (url.drivername, url.username, url.host, url.database) == ("postgresql+psycopg", "crdnd", None, "mlflow")
    assert dict(url.query) == {"host": "/srv/mlflow/postgres/run", "port": "5433"}


def test_database_names_are_checked_before_anything_runs() -> None:
    cluster = PostgresCluster(Path("/nonexistent/postgres"), 5433, Path("/nonexistent/postgres/run"))
    with pytest.raises(ValueError, match="plain database name"):
        postgres.create_database(cluster, "mlflow; DROP DATABASE postgres")


def test_server_command_refuses_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["server", "/nonexistent/never-created", "--port", str(port)])
    assert result.exit_code == 2
    assert f"Cannot start the MLflow server on 127.0.0.1:{port}" in result.output
    assert "Choose another port" in result.output
    assert not Path("/nonexistent/never-created").exists()


@needs_postgres
@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_a_folder_the_postgres_user_cannot_reach_is_a_clear_error() -> None:
    outer = Path(tempfile.mkdtemp(prefix="crdnd-pgtest-", dir="/tmp"))
    try:
        outer.chmod(0o700)
        with pytest.raises(PermissionError, match="chmod o\\+x"):
            postgres.start_postgres(outer / "server")
    finally:
        shutil.rmtree(outer, ignore_errors=True)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory):
    """``crdnd-ray server`` on a fresh folder, and a digits sweep and ablation recorded into it at once.

    Both commands join one Ray node and share one empty teacher cache, so they also race for the teacher.
    The node offers 4 logical CPUs, so that both commands' trials run at once on the 2-core machine.
    """
    from crdnd_ray.engine.local_cluster import LocalCluster

    folder = Path(tempfile.mkdtemp(prefix="crdnd-pgtest-", dir="/tmp"))
    work = tmp_path_factory.mktemp("pg-commands")
    server, lines = _start_server_command(folder, free_port())
    url = lines[-1].split(" at ", 1)[1].split()[0]
    try:
        with LocalCluster(["node_a"], cpus=4) as cluster:
            common = [f"scaling.address={cluster.address}", f"tracking.uri={url}", *SMALL]
            env = _env(CRDND_RAY_CACHE=str(work / "teachers"))
            commands = {"sweep": ["sweep", str(REPO / "search_spaces/digits.yaml"), *SWEEP],
                        "ablation": ["ablate", str(REPO / "ablations/digits.yaml"), *ABLATION]}
            started = {}
            for kind, command in commands.items():
                sets = [part for key in common + command[2:] for part in ("--set", key)]
                started[kind] = subprocess.Popen([sys.executable, "-m", "crdnd_ray.cli", *command[:2], *sets,
                                                  "--output", str(work / kind)], cwd=work, env=env,
                                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            outputs = {kind: process.communicate(timeout=600)[0] for kind, process in started.items()}
            codes = {kind: process.returncode for kind, process in started.items()}
        yield SimpleNamespace(url=url, folder=folder, work=work, server=server, outputs=outputs, codes=codes)
    finally:
        if server.poll() is None:
            stop_tree(server.pid, signal.SIGTERM, 60)
            server.wait()
        postgres.stop_postgres(folder)
        shutil.rmtree(folder, ignore_errors=True)


def _children(client, parent_id: str) -> dict[str, object]:
    parent = client.get_run(parent_id)
    found = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                               max_results=100)
    return {run.data.tags["trial_id"]: run for run in found}


@pytest.mark.slow
@needs_postgres
@pytest.mark.parametrize("kind, table", [("sweep", "results.csv"), ("ablation", "cells.csv")])
def test_a_sweep_and_an_ablation_at_once_lose_nothing(recorded: SimpleNamespace, kind: str, table: str) -> None:
    from mlflow import MlflowClient

    assert recorded.codes[kind] == 0, recorded.outputs[kind]
    trained = [name for name, text in recorded.outputs.items() if "training the teacher" in text]
    assert len(trained) == 1 and len(list((recorded.work / "teachers").glob("*/teacher.pt"))) == 1
    client = MlflowClient(tracking_uri=recorded.url)
    folder = recorded.work / kind
    parent_id = runs.read_run_info(folder)["mlflow_run_id"]
    rows = pd.read_csv(folder / table)
    children = _children(client, parent_id)
    assert sorted(children) == sorted(rows["trial_id"]) and len(children) == 2
    parent = client.get_run(parent_id)
    assert (parent.info.status, parent.data.tags["status"]) == ("FINISHED", "finished")
    for trial_id, run in children.items():
        final = runs.read_final(folder / "trials" / trial_id)
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
        for name in ("epoch_pgd20_acc", "epoch_clean_acc", "loss"):
            history = client.get_metric_history(run.info.run_id, name)
            assert sorted(point.step for point in history) == [1, 2], name
        assert {key: run.data.metrics[key] for key in final} == pytest.approx(final)
        assert {item.path for item in client.list_artifacts(run.info.run_id)} == RUN_FILES
        stored = recorded.folder / "artifacts" / run.info.experiment_id / run.info.run_id / "artifacts"
        assert {path.name for path in stored.iterdir()} == RUN_FILES
    spans = {}
    for name in ("sweep", "ablation"):
        parent_of_kind = runs.read_run_info(recorded.work / name)["mlflow_run_id"]
        infos = [run.info for run in _children(client, parent_of_kind).values()]
        spans[name] = (min(info.start_time for info in infos), max(info.end_time for info in infos))
    assert spans["sweep"][0] < spans["ablation"][1] and spans["ablation"][0] < spans["sweep"][1], spans


@pytest.mark.slow
@needs_postgres
def test_report_and_ui_read_the_server(recorded: SimpleNamespace, tmp_path: Path) -> None:
    parent_id = runs.read_run_info(recorded.work / "sweep")["mlflow_run_id"]
    csv = tmp_path / "report.csv"
    report = subprocess.run([sys.executable, "-m", "crdnd_ray.cli", "report", "--experiment", "crdnd-digits",
                             "--run", parent_id, "--tracking-uri", recorded.url, "--format", "csv", "--output",
                             str(csv)], check=False, env=_env(), cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stdout + report.stderr
    table = pd.read_csv(csv).set_index("run_name")
    results = pd.read_csv(recorded.work / "sweep" / "results.csv").set_index("trial")
    assert sorted(table.index) == sorted(results.index)
    assert table.loc[results.index, "best_pgd20_acc"].tolist() == pytest.approx(results["best_pgd20_acc"].tolist())

    ui = subprocess.run([sys.executable, "-m", "crdnd_ray.cli", "ui", "--tracking-uri", recorded.url], check=False,
                        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ui.returncode == 0 and recorded.url in ui.stdout, ui.stdout + ui.stderr
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(recorded.url + "/", timeout=30) as page:
        assert page.status == 200 and b"<html" in page.read().lower()
    experiment = json.loads(opener.open(f"{recorded.url}/ajax-api/2.0/mlflow/experiments/get-by-name?"
                                        "experiment_name=crdnd-digits", timeout=30).read())["experiment"]
    search = urllib.request.Request(f"{recorded.url}/ajax-api/2.0/mlflow/runs/search", method="POST",
                                    data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
                                    headers={"Content-Type": "application/json"})
    found = json.loads(opener.open(search, timeout=30).read())["runs"]
    assert sorted(run["info"]["run_id"] for run in found) == sorted([parent_id, *table["run_id"]])


@pytest.mark.slow
@needs_postgres
def test_sigterm_stops_every_process_and_the_data_outlive_the_server(recorded: SimpleNamespace) -> None:
    from mlflow import MlflowClient

    sweep = recorded.work / "sweep"
    child = next(iter(_children(MlflowClient(tracking_uri=recorded.url),
                                runs.read_run_info(sweep)["mlflow_run_id"]).values()))
    postmaster = int((recorded.folder / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    processes = sorted(set(process_tree(recorded.server.pid)) | set(process_tree(postmaster)))
    assert len(processes) >= 4
    recorded.server.send_signal(signal.SIGTERM)
    output, _ = recorded.server.communicate(timeout=120)
    assert recorded.server.returncode == 0, output
    assert "Stopped the MLflow server and PostgreSQL." in output
    _assert_gone(processes, recorded.folder)
    assert not (recorded.folder / "postgres" / "data" / "postmaster.pid").exists()

    with postgres.start_tracking_server(recorded.folder, port=free_port()) as again:
        history = MlflowClient(tracking_uri=again.url).get_metric_history(child.info.run_id, "epoch_pgd20_acc")
        rows = runs.read_metrics(sweep / "trials" / child.data.tags["trial_id"])
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
            [(row["epoch"], pytest.approx(row["epoch_pgd20_acc"])) for row in rows]
        processes = process_tree(again.postgres.pid) + process_tree(again.mlflow.pid)
    assert wait_gone(processes, 10) == []
    _assert_gone(processes, recorded.folder)
