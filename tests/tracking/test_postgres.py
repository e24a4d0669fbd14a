"""MLflow on PostgreSQL (``crdnd_ray.pgserver``): two processes write nested runs at once and nothing is lost.

The server tests need PostgreSQL's programs (``initdb``, ``pg_ctl``; Debian package ``postgresql``) and are
skipped with that reason where they are missing. Their folders are made with ``tempfile.mkdtemp`` in /tmp,
not pytest's ``tmp_path``: when the tests run as root, PostgreSQL runs as the user ``postgres``, which
cannot enter ``/tmp/pytest-of-root`` (mode 0700), and a Unix socket's path must stay short.
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
import traceback
from pathlib import Path

import pytest

from crdnd_ray import pgserver
from crdnd_ray.pgserver import PostgresCluster, PostgresNotFound

REPO = Path(__file__).resolve().parents[2]
WORKERS = 2
RUNS_PER_WORKER = 3
STEPS = 15


def _postgres_missing() -> str | None:
    try:
        pgserver.find_pg_binary("initdb")
        pgserver.find_pg_binary("pg_ctl")
    except PostgresNotFound:
        return ("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
                "install it with 'apt-get install -y postgresql' to run the MLflow-on-PostgreSQL tests.")
    return None


needs_postgres = pytest.mark.skipif(_postgres_missing() is not None, reason=_postgres_missing() or "")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server_folder():
    folder = Path(tempfile.mkdtemp(prefix="crdnd-pgtest-", dir="/tmp"))
    yield folder
    pgserver.stop_postgres(folder)
    shutil.rmtree(folder, ignore_errors=True)


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


def _params(worker: int, index: int) -> dict[str, str]:
    return {"worker": str(worker), "index": str(index), "method.temperature": str(1.0 + worker + index / 10),
            "method.contrastive.kind": ["infonce", "relation"][index % 2]}


def _loss(worker: int, index: int, step: int) -> float:
    return 1.0 / (1 + step) + worker * 0.01 + index * 0.001


def _write_runs(url: str, experiment_id: str, parent_id: str, worker: int, barrier, results) -> None:
    """One writer process: RUNS_PER_WORKER child runs with params, per-step metrics and two artifacts."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=url)
        barrier.wait(timeout=120)
        run_ids = []
        for index in range(RUNS_PER_WORKER):
            run = client.create_run(experiment_id, run_name=f"w{worker}-r{index}",
                                    tags={"mlflow.parentRunId": parent_id, "worker": str(worker)})
            run_id = run.info.run_id
            for key, value in _params(worker, index).items():
                client.log_param(run_id, key, value)
            for step in range(STEPS):
                client.log_metric(run_id, "loss", _loss(worker, index, step), step=step)
                client.log_metric(run_id, "pgd20_acc", float(worker * 100 + index * 10 + step), step=step)
            with tempfile.TemporaryDirectory() as scratch:
                summary = Path(scratch) / "summary.json"
                summary.write_text(json.dumps({"run": run_id, "worker": worker, "index": index}))
                client.log_artifact(run_id, str(summary))
                curves = Path(scratch) / "curves"
                curves.mkdir()
                (curves / "values.txt").write_text(f"{run_id}\n" + "\n".join(str(s) for s in range(STEPS)))
                client.log_artifacts(run_id, str(curves), artifact_path="curves")
            client.set_terminated(run_id, "FINISHED")
            run_ids.append(run_id)
        results.put((worker, run_ids, None))
    except BaseException:  # noqa: BLE001 - the parent test shows the traceback
        results.put((worker, [], traceback.format_exc()))


def _assert_gone(pids: list[int], folder: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (pgserver._alive(pids) or _processes_mentioning(str(folder))):
        time.sleep(0.2)
    assert pgserver._alive(pids) == [], f"processes left after stop: {pgserver._alive(pids)}"
    assert _processes_mentioning(str(folder)) == []


def test_uri_goes_through_the_unix_socket() -> None:
    from sqlalchemy.engine import make_url

    cluster = PostgresCluster(Path("/srv/mlflow/postgres"), 5433, Path("/srv/mlflow/postgres/run"))
    url = make_url(cluster.uri("mlflow"))
    assert (url.drivername, url.username, url.host, url.database) == ("postgresql+psycopg", "crdnd", None, "mlflow")
    assert dict(url.query) == {"host": "/srv/mlflow/postgres/run", "port": "5433"}
    with pytest.raises(ValueError, match="listen="):
        cluster.tcp_uri("mlflow")


def test_database_names_are_checked_before_anything_runs() -> None:
    cluster = PostgresCluster(Path("/nonexistent/postgres"), 5433, Path("/nonexistent/postgres/run"))
    with pytest.raises(ValueError, match="plain database name"):
        pgserver.create_database(cluster, "mlflow; DROP DATABASE postgres")


def test_serve_refuses_a_busy_port(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert pgserver.serve("/nonexistent/never-created", port=port) == 2
    assert "Choose another port" in capsys.readouterr().err
    assert not Path("/nonexistent/never-created").exists()


@needs_postgres
@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_a_folder_the_postgres_user_cannot_reach_is_a_clear_error() -> None:
    outer = Path(tempfile.mkdtemp(prefix="crdnd-pgtest-", dir="/tmp"))
    try:
        outer.chmod(0o700)
        with pytest.raises(PermissionError, match="chmod o\\+x"):
            pgserver.start_postgres(outer / "server")
    finally:
        shutil.rmtree(outer, ignore_errors=True)


@pytest.mark.slow
@needs_postgres
def test_two_concurrent_writers_lose_nothing(server_folder: Path, tmp_path: Path) -> None:
    import multiprocessing

    from mlflow import MlflowClient

    server = pgserver.start_tracking_server(server_folder, port=_free_port(), throwaway=True)
    try:
        processes = pgserver.process_tree(server.postgres.pid) + pgserver.process_tree(server.mlflow.pgid)
        assert server.postgres.pid in processes and server.mlflow.pgid in processes
        client = MlflowClient(tracking_uri=server.url)
        experiment_id = client.create_experiment("crdnd-pg-test")
        assert client.get_experiment(experiment_id).artifact_location == f"mlflow-artifacts:/{experiment_id}"
        parent = client.create_run(experiment_id, run_name="sweep", tags={"run_kind": "sweep"}).info.run_id
        client.log_param(parent, "search_space", "digits")

        context = multiprocessing.get_context("spawn")
        barrier, results = context.Barrier(WORKERS), context.Queue()
        writers = [context.Process(target=_write_runs, args=(server.url, experiment_id, parent, worker, barrier,
                                                              results)) for worker in range(WORKERS)]
        for writer in writers:
            writer.start()
        reports = [results.get(timeout=300) for _ in writers]
        for writer in writers:
            writer.join(60)
        errors = [error for _, _, error in reports if error]
        assert errors == [] and [writer.exitcode for writer in writers] == [0] * WORKERS, "\n".join(errors)
        client.set_terminated(parent, "FINISHED")
        written = {worker: ids for worker, ids, _ in reports}

        children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=100)
        assert len(children) == WORKERS * RUNS_PER_WORKER
        assert {run.info.run_id for run in children} == {i for ids in written.values() for i in ids}
        assert len(client.search_runs([experiment_id], max_results=100)) == 1 + WORKERS * RUNS_PER_WORKER

        spans = {}
        for worker, ids in written.items():
            for index, run_id in enumerate(ids):
                run = client.get_run(run_id)
                assert run.info.status == "FINISHED"
                assert run.data.params == _params(worker, index)
                assert run.data.tags["worker"] == str(worker)
                loss = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
                assert [m.step for m in loss] == list(range(STEPS))
                assert [m.value for m in loss] == [_loss(worker, index, step) for step in range(STEPS)]
                acc = client.get_metric_history(run_id, "pgd20_acc")
                assert sorted(m.value for m in acc) == [worker * 100 + index * 10 + s for s in range(STEPS)]
                assert {a.path for a in client.list_artifacts(run_id)} == {"summary.json", "curves"}
                assert [a.path for a in client.list_artifacts(run_id, "curves")] == ["curves/values.txt"]
                local = Path(client.download_artifacts(run_id, "", str(tmp_path / run_id)))
                assert json.loads((local / "summary.json").read_text()) == {"run": run_id, "worker": worker,
                                                                              "index": index}
                assert (local / "curves" / "values.txt").read_text().splitlines()[0] == run_id
                stored = server_folder / "artifacts" / experiment_id / run_id / "artifacts"
                assert sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()) == [
                    "curves/values.txt", "summary.json"]
                starts, ends = spans.setdefault(worker, ([], []))
                starts.append(run.info.start_time)
                ends.append(run.info.end_time)
        (a_starts, a_ends), (b_starts, b_ends) = spans[0], spans[1]
        assert min(a_starts) < max(b_ends) and min(b_starts) < max(a_ends), "the two writers did not overlap"
        processes = sorted(set(processes) | set(pgserver.process_tree(server.postgres.pid))
                           | set(pgserver.process_tree(server.mlflow.pgid)))
    finally:
        server.stop()
    _assert_gone(processes, server_folder)
    assert not (server_folder / "postgres" / "data" / "postmaster.pid").exists()


@pytest.mark.slow
@needs_postgres
def test_serve_stops_everything_on_sigterm_and_keeps_the_data(server_folder: Path) -> None:
    from mlflow import MlflowClient

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    code = "import sys; from crdnd_ray.pgserver import serve; sys.exit(serve(sys.argv[1], int(sys.argv[2])))"
    process = subprocess.Popen([sys.executable, "-c", code, str(server_folder), str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(300, lambda: os.killpg(process.pid, signal.SIGKILL))
    watchdog.start()
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "MLflow tracking server at" in line or process.poll() is not None:
                break
        assert f"--set tracking.uri=http://127.0.0.1:{port}" in "".join(lines), "".join(lines)
        url = f"http://127.0.0.1:{port}"
        client = MlflowClient(tracking_uri=url)
        run_id = client.create_run(client.create_experiment("kept")).info.run_id
        client.log_metric(run_id, "pgd20_acc", 42.0, step=3)
        postmaster = int((server_folder / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
        processes = sorted(set(pgserver.process_tree(process.pid)) | set(pgserver.process_tree(postmaster)))
        assert len(processes) >= 4
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, "".join(lines) + output
    assert "Stopped the MLflow server and PostgreSQL." in output
    _assert_gone(processes, server_folder)

    with pgserver.start_tracking_server(server_folder, port=_free_port()) as again:
        history = MlflowClient(tracking_uri=again.url).get_metric_history(run_id, "pgd20_acc")
        assert [(m.step, m.value) for m in history] == [(3, 42.0)]
        processes = pgserver.process_tree(again.postgres.pid) + pgserver.process_tree(again.mlflow.pgid)
    _assert_gone(processes, server_folder)
