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
from typing import TYPE_CHECKING

from crdnd_ray.processes import stop_tree
from crdnd_ray.tracking import links
from crdnd_ray.tracking.store import latest_parent
from crdnd_ray.tracking.uris import DEFAULT_TRACKING_URI, is_loopback, is_server, normalize_tracking_uri, sqlite_path

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["port_problem", "serve_ui", "start_server", "stop_server", "ui_links"]


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


def ui_links(client: MlflowClient, server: str, experiment: str | None = None) -> list[tuple[str, str]]:
    """``(label, url)`` of what to open: the experiment's runs table and, for its latest sweep or ablation, the
    trials ranked with their parameters and metrics (the saved view the sweep wrote), its parallel-coordinates
    chart and the compare page of its trials. ``experiment`` None means the latest sweep's or ablation's."""
    experiments = client.search_experiments()
    if experiment is not None:
        experiments = [e for e in experiments if e.name == experiment]
    parent = latest_parent(client, [e.experiment_id for e in experiments]) if experiments else None
    chosen = next((e for e in experiments if parent is not None and e.experiment_id == parent.info.experiment_id),
                  experiments[0] if len(experiments) == 1 else None)
    if chosen is None:
        return []
    shown = [(f"experiment '{chosen.name}', all runs", links.experiment_url(server, chosen.experiment_id))]
    if parent is None:
        return shown
    kind, name = parent.data.tags.get("run_kind", "sweep"), parent.info.run_name
    key = f"{kind}-{parent.info.run_id}"
    if links.SAVED_VIEW_TAG_PREFIX + key in chosen.tags:
        shown.append((f"latest {kind} '{name}': trials ranked, with parameters and metrics",
                      links.runs_url(server, chosen.experiment_id, view_key=key)))
        shown.append((f"latest {kind} '{name}': parallel coordinates",
                      links.runs_url(server, chosen.experiment_id, view_key=key, mode="CHART")))
    children = client.search_runs([chosen.experiment_id], links.children_filter(parent.info.run_id), max_results=100)
    if children:
        shown.append((f"latest {kind} '{name}': compare its {len(children)} trials",
                      links.compare_url(server, [child.info.run_id for child in children], [chosen.experiment_id])))
    return shown


def serve_ui(port: int = 5000, host: str = "127.0.0.1", tracking_uri: str = DEFAULT_TRACKING_URI,
             experiment: str | None = None) -> int:
    """Serve the MLflow UI for a tracking store, print the links to open, and block until Ctrl-C (or SIGTERM,
    through the CLI) stops the server's whole process tree; returns the exit code.

    The server's own output goes to ``mlflow-ui.log`` beside the store, not the terminal. A loopback bind is
    the default; any other host prints a warning because the UI has no authentication. When ``tracking_uri``
    already is an ``http(s)`` server, nothing is started: its links are printed.
    """
    from mlflow import MlflowClient

    uri = tracking_uri if is_server(tracking_uri) else normalize_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        print(f"Note: {db} does not exist yet; the UI starts on an empty store. Run 'crdnd-ray train' or "
              "'crdnd-ray sweep' in the same directory (or pass --tracking-uri) to fill it.", file=sys.stderr)
    if is_server(uri):
        for label, link in ui_links(MlflowClient(uri), uri.rstrip("/"), experiment):
            print(f"{label}: {link}")
        return 0
    if not is_loopback(host):
        print(f"Warning: binding the MLflow UI to {host} exposes every run and artifact, without "
              "authentication, to anyone who can reach this machine. Use --host 127.0.0.1 (and an SSH tunnel) "
              "unless you mean it.", file=sys.stderr)
    problem = port_problem("0.0.0.0" if host in ("", "0.0.0.0") else host, port)
    if problem:
        print(f"Error: cannot listen on {host}:{port} ({problem}). Pick another port with --port.", file=sys.stderr)
        return 2
    log_file = (db.parent if db is not None else Path.cwd()) / "mlflow-ui.log"
    try:
        process, url = start_server(port, host, uri, log_file=log_file)
    except RuntimeError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    shown = url if not host.startswith("0.0.0.0") else f"http://127.0.0.1:{port}"
    print(f"MLflow UI for {uri} at {shown}  (Ctrl-C to stop; server log: {log_file})", flush=True)
    try:
        if db is not None and db.exists():
            for label, link in ui_links(MlflowClient(uri), shown, experiment):
                print(f"{label}: {link}", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(process)
