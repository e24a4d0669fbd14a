"""The MLflow server and UI: start ``mlflow server`` (loopback by default), wait until it is healthy, stop its
whole process tree, and ``crdnd-ray ui``. :mod:`crdnd_ray.tracking.postgres` runs the same server on PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from crdnd_ray.processes import stop_tree
from crdnd_ray.tracking.store import DEFAULT_TRACKING_URI, is_loopback, is_server, normalize_tracking_uri, sqlite_path

__all__ = ["port_problem", "serve_ui", "start_server", "stop_server"]


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on right now (the OS error), or None when it is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return str(error)
    return None


def start_server(port: int, host: str = "127.0.0.1", backend_uri: str = DEFAULT_TRACKING_URI,
                 artifacts_dir: Path | str | None = None, log_file: Path | str | None = None,
                 timeout_s: float = 60.0, allowed_hosts: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` (one worker, no job runner) and wait until ``/health`` answers.

    The server runs under this interpreter (``sys.executable -m mlflow server``) in a session of its own and
    serves artifacts (``--serve-artifacts``) from ``artifacts_dir`` (default: ``mlartifacts/`` next to a SQLite
    database). ``allowed_hosts`` goes to ``--allowed-hosts``: needed when clients reach the server by a name
    that is neither localhost nor a private IP (a Kubernetes Service, for example). Its output goes to
    ``log_file`` when given, else to this process's standard error (standard output stays for the URLs).
    Returns the process and the server's URL; raises RuntimeError (and stops the process) when it does not
    become healthy within ``timeout_s`` (creating MLflow's schema in an empty database takes 10-20 s).
    """
    backend_uri = normalize_tracking_uri(backend_uri)
    if artifacts_dir is None:
        db = sqlite_path(backend_uri)
        artifacts_dir = (db.parent if db else Path.cwd()) / "mlartifacts"
    artifacts = Path(artifacts_dir).expanduser().resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
               "--serve-artifacts", "--artifacts-destination", artifacts.as_uri(), "--host", host,
               "--port", str(port), "--workers", "1"]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_handle = open(log_file, "ab") if log_file is not None else None
    try:
        process = subprocess.Popen(command, env=env, stdout=log_handle or sys.__stderr__.fileno(),
                                   stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log_handle is not None:
            log_handle.close()
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") or is_loopback(host) else shown
    health = f"http://{probe_host}:{port}/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with opener.open(health, timeout=2) as answer:
                if answer.status == 200:
                    return process, url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    stop_server(process)
    tail = ""
    if log_file is not None and Path(log_file).is_file():
        tail = "\n" + "\n".join(Path(log_file).read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(
        f"The MLflow server on {url} did not become healthy within {timeout_s:.0f} s "
        f"(exit code {process.returncode}). Check that port {port} is free and the backend store "
        f"{backend_uri} is readable.{tail}"
    )


def stop_server(process: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """Stop a server started by :func:`start_server` and every process of its tree (SIGTERM, then SIGKILL
    after ``timeout_s``); return its exit code."""
    stop_tree(process.pid, signal.SIGTERM, timeout_s)
    return int(process.wait(timeout_s) or 0)


def serve_ui(port: int = 5000, host: str = "127.0.0.1", tracking_uri: str = DEFAULT_TRACKING_URI,
             experiment: str | None = None) -> int:
    """Serve the MLflow UI for a tracking store, print its URL, and block until Ctrl-C; returns the exit code.

    A loopback bind is the default; any other host prints a warning because the UI has no authentication.
    When ``tracking_uri`` already is an ``http(s)`` server, nothing is started: its URL is printed.
    """
    if is_server(tracking_uri):
        print(f"The tracking store is already an MLflow server; open {tracking_uri.rstrip('/')} in a browser.")
        return 0
    uri = normalize_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    experiment_id = None
    if db is not None and not db.exists():
        print(f"Note: {db} does not exist yet; the UI starts on an empty store. Run 'crdnd-ray train' or "
              "'crdnd-ray sweep' in the same directory (or pass --tracking-uri) to fill it.", file=sys.stderr)
    elif experiment is not None:
        from mlflow import MlflowClient

        found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
        if found is None:
            print(f"Warning: there is no experiment '{experiment}' in {uri}; opening the experiment list.",
                  file=sys.stderr)
        else:
            experiment_id = found.experiment_id
    if not is_loopback(host):
        print(f"Warning: binding the MLflow UI to {host} exposes every run and artifact, without "
              "authentication, to anyone who can reach this machine. Use --host 127.0.0.1 (and an SSH tunnel) "
              "unless you mean it.", file=sys.stderr)
    problem = port_problem("0.0.0.0" if host in ("", "0.0.0.0") else host, port)
    if problem:
        print(f"Error: cannot listen on {host}:{port} ({problem}). Pick another port with --port.", file=sys.stderr)
        return 2
    try:
        process, url = start_server(port, host, uri)
    except RuntimeError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    shown = url if not host.startswith("0.0.0.0") else f"http://127.0.0.1:{port}"
    print(f"MLflow UI for {uri} at {shown}  (Ctrl-C to stop)", flush=True)
    if experiment_id is not None:
        print(f"Experiment '{experiment}': {shown}/#/experiments/{experiment_id}", flush=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        stop_server(process)
        return 0
