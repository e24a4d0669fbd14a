"""MLflow on PostgreSQL on one machine: a PostgreSQL cluster in a folder, and ``mlflow server`` on it.

SQLite is fine for one writer; sweeps and ablations that record at the same time (or drivers on several
machines) want a real database behind ``mlflow server``. :func:`serve` (``crdnd-ray server FOLDER``) runs
both from one folder::

    <folder>/
      postgres/        the cluster (owned by the user PostgreSQL runs as, mode 0700)
        data/          initdb's data directory
        run/           its Unix socket (PostgreSQL listens on no TCP port)
        postgres.log   its log
      artifacts/       what the MLflow server stores for ``mlflow-artifacts:/`` (``--serve-artifacts``)
      mlflow.log       the MLflow server's log

PostgreSQL refuses to run as root. When this process is root, the cluster runs as the system user
``postgres`` (made by Debian's ``postgresql`` package; ``os_user`` names another): ``initdb`` and ``pg_ctl``
are started with ``subprocess``'s ``user=``/``group=``, the ``postgres/`` folder is handed to that user, and
``<folder>`` gets the "others may enter" bit. Every folder above ``<folder>`` must already be enterable by
that user (``/tmp``, ``/srv`` and ``/var/lib`` are; pytest's ``/tmp/pytest-of-root`` is not).

Only this user (and root) can connect: the socket lives in a private folder, with ``trust`` authentication.
The MLflow server is :func:`crdnd_ray.tracking.server.start_server`, reaching PostgreSQL through SQLAlchemy's
``postgresql+psycopg`` driver (``psycopg`` 3, a dependency of this project).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crdnd_ray.processes import process_state, process_tree, stop_tree, wait_gone
from crdnd_ray.tracking.server import port_problem, start_server, stop_server
from crdnd_ray.tracking.uris import is_loopback

__all__ = ["SUPERUSER", "PostgresCluster", "PostgresNotFound", "TrackingServer", "create_database",
           "find_pg_binary", "serve", "start_postgres", "start_tracking_server", "stop_postgres"]

SUPERUSER = "crdnd"
"""The PostgreSQL superuser role that ``initdb`` creates in every cluster of this module."""

_SOCKET_PATH_LIMIT = 100
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_INSTALL_HINT = (
    "Install PostgreSQL (Debian/Ubuntu: 'apt-get install -y postgresql'; its programs live in "
    "/usr/lib/postgresql/<version>/bin, which is searched) or put the folder that holds 'initdb' and "
    "'pg_ctl' on PATH."
)


class PostgresNotFound(RuntimeError):
    """PostgreSQL's server programs (``initdb``, ``pg_ctl``, ``postgres``) are not installed or not found."""


def find_pg_binary(name: str) -> Path:
    """The path of a PostgreSQL program (``initdb``, ``pg_ctl``, ``psql``, ``createdb``, ...).

    Searched on ``PATH``, then in ``/usr/lib/postgresql/<version>/bin`` (Debian's layout, newest first). Any
    other program is taken from ``initdb``'s folder first, so all of them come from one installation
    (Debian's ``/usr/bin/psql`` is only a version-picking wrapper). Raises :class:`PostgresNotFound`.
    """
    if name != "initdb":
        with contextlib.suppress(PostgresNotFound):
            beside = find_pg_binary("initdb").resolve().parent / name
            if beside.is_file() and os.access(beside, os.X_OK):
                return beside
    found = shutil.which(name)
    if found:
        return Path(found)

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)

    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True):
        program = folder / name
        if program.is_file() and os.access(program, os.X_OK):
            return program
    raise PostgresNotFound(f"The PostgreSQL program '{name}' was not found. {_INSTALL_HINT}")


@dataclass(frozen=True)
class _RunAs:
    """The OS user PostgreSQL runs as; ``name=None`` means this process's own user."""

    name: str | None
    uid: int
    gid: int
    groups: tuple[int, ...]

    def popen_args(self) -> dict[str, Any]:
        return {} if self.name is None else {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def chown(self, path: Path) -> None:
        if self.name is not None:
            os.chown(path, self.uid, self.gid)


def _resolve_user(os_user: str | None) -> _RunAs:
    if os.geteuid() != 0:
        if os_user is not None and os_user != pwd.getpwuid(os.geteuid()).pw_name:
            raise PermissionError(f"Only root can run PostgreSQL as another user ('{os_user}'). Leave os_user "
                                  "unset to run it as yourself.")
        return _RunAs(None, os.geteuid(), os.getegid(), ())
    name = os_user or "postgres"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PermissionError(
            f"PostgreSQL refuses to run as root, and there is no user '{name}' to run it as. Install Debian's "
            "'postgresql' package (it creates the user 'postgres'), create one with 'useradd --system "
            f"--home-dir /var/lib/postgresql {name}', or pass os_user='<an existing user>'."
        ) from None
    if entry.pw_uid == 0:
        raise PermissionError(f"The user '{name}' is root; PostgreSQL refuses to run as root. Name another user.")
    return _RunAs(name, entry.pw_uid, entry.pw_gid, tuple(sorted(set(os.getgrouplist(name, entry.pw_gid)))))


def _may_enter(directory: Path, user: _RunAs) -> bool:
    info = directory.stat()
    if info.st_uid == user.uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in (user.gid, *user.groups):
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _make_reachable(folder: Path, user: _RunAs) -> None:
    """Let ``user`` enter ``folder`` (adding "others may enter" to ``folder`` itself if needed); fail with a
    clear message when a folder above it shuts that user out."""
    if user.name is None:
        return
    for directory in reversed(folder.parents):
        if not _may_enter(directory, user):
            mode = stat.S_IMODE(directory.stat().st_mode)
            raise PermissionError(
                f"PostgreSQL runs as the user '{user.name}' (it refuses to run as root), which cannot enter "
                f"{directory} (mode {mode:04o}) on the way to {folder}. Put the server folder somewhere that "
                f"user can reach (for example under /srv, /var/lib or /tmp), or run 'chmod o+x {directory}'."
            )
    if not _may_enter(folder, user):
        folder.chmod(stat.S_IMODE(folder.stat().st_mode) | stat.S_IXOTH)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class PostgresCluster:
    """A running PostgreSQL cluster started by :func:`start_postgres`."""

    folder: Path
    """The cluster's own folder (``<server folder>/postgres``)."""
    port: int
    """The number in the Unix socket's name (``.s.PGSQL.<port>``); no TCP port is opened."""
    socket_dir: Path
    os_user: str | None = None
    """The OS user the server runs as; None when it is this process's user."""
    pid: int | None = None
    """The postmaster's process id."""
    temporary_socket_dir: bool = False

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_file(self) -> Path:
        return self.folder / "postgres.log"

    def uri(self, database: str = "postgres") -> str:
        """The SQLAlchemy URI of ``database`` through the Unix socket (psycopg 3, no password)."""
        query = urllib.parse.urlencode({"host": str(self.socket_dir), "port": str(self.port)}, safe="/")
        return f"postgresql+psycopg://{SUPERUSER}@/{database}?{query}"

    def running(self) -> bool:
        """Whether the postmaster is alive."""
        return self.pid is not None and process_state(self.pid) not in (None, "Z")


def _run(command: list[Any], user: _RunAs, cwd: Path, timeout_s: float, what: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(part) for part in command], check=False, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s, env=env, **user.popen_args())
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit code {done.returncode}):\n{(done.stdout + done.stderr).strip()}")
    return done


def _postmaster_pid(data_dir: Path) -> int | None:
    """The process id in ``postmaster.pid`` when that process is alive."""
    try:
        first = (data_dir / "postmaster.pid").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return int(first) if first.isdigit() and process_state(int(first)) not in (None, "Z") else None


def _socket_dir(cluster_folder: Path, user: _RunAs) -> tuple[Path, bool]:
    """``<cluster>/run``, or a short private folder in /tmp when that path is too long for a Unix socket
    (about 107 bytes on Linux); the flag says whether it is such a temporary folder."""
    wanted = cluster_folder / "run"
    if len(str(wanted / ".s.PGSQL.65535.lock")) <= _SOCKET_PATH_LIMIT:
        wanted.mkdir(mode=0o700, exist_ok=True)
        user.chown(wanted)
        return wanted, False
    short = Path(tempfile.mkdtemp(prefix="crdnd-pg-", dir="/tmp"))
    user.chown(short)
    return short, True


def start_postgres(folder: str | Path, *, port: int | None = None, os_user: str | None = None,
                   throwaway: bool = False, timeout_s: float = 60.0) -> PostgresCluster:
    """Start (creating it on first use) the PostgreSQL cluster in ``<folder>/postgres``; wait until it is ready.

    ``port`` (the socket's number) defaults to a free one. ``throwaway=True`` turns durability off
    (``fsync``, ``synchronous_commit``, ``full_page_writes``) for tests and scratch runs. Raises
    :class:`PostgresNotFound` when PostgreSQL is not installed, PermissionError when the server's user cannot
    reach the folder, RuntimeError (with the log's tail) when it does not start.
    """
    initdb, pg_ctl = find_pg_binary("initdb"), find_pg_binary("pg_ctl")
    user = _resolve_user(os_user)
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    _make_reachable(folder, user)
    cluster_folder = folder / "postgres"
    cluster_folder.mkdir(mode=0o700, exist_ok=True)
    cluster_folder.chmod(0o700)
    user.chown(cluster_folder)
    data_dir = cluster_folder / "data"
    running = _postmaster_pid(data_dir)
    if running is not None:
        raise RuntimeError(f"A PostgreSQL server (process {running}) is already running on {data_dir}. Stop it "
                           f"first with crdnd_ray.tracking.postgres.stop_postgres('{folder}').")
    if not (data_dir / "PG_VERSION").is_file():
        if data_dir.exists() and any(data_dir.iterdir()):
            raise RuntimeError(f"{data_dir} is not empty but holds no PostgreSQL cluster (no PG_VERSION). Remove "
                               "it or choose another server folder.")
        command = [initdb, "-D", data_dir, "-U", SUPERUSER, "--encoding=UTF8", "--locale=C", "--auth=trust"]
        _run(command + (["--no-sync"] if throwaway else []), user, cluster_folder, max(timeout_s, 120.0), "initdb")
        with (data_dir / "postgresql.conf").open("a") as handle:
            handle.write("\n# Written at each start by crdnd_ray.tracking.postgres (port, socket).\n"
                         "include_if_exists = 'crdnd.conf'\n")
    socket_dir, temporary = _socket_dir(cluster_folder, user)
    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
    settings = {"port": str(port), "listen_addresses": "''", "unix_socket_directories": f"'{socket_dir}'",
                "unix_socket_permissions": "0700"}
    if throwaway:
        settings.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
    conf = data_dir / "crdnd.conf"
    conf.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
    user.chown(conf)
    cluster = PostgresCluster(cluster_folder, port, socket_dir, user.name, None, temporary)
    try:
        _run([pg_ctl, "start", "-D", data_dir, "-l", cluster.log_file, "-w", "-t", str(int(timeout_s)), "-s"],
             user, cluster_folder, timeout_s + 15, "pg_ctl start")
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        _remove_socket_dir(cluster)
        raise RuntimeError(f"PostgreSQL did not start on {data_dir} ({error}). The end of {cluster.log_file}:\n"
                           f"{_tail(cluster.log_file)}") from None
    cluster.pid = _postmaster_pid(data_dir)
    return cluster


def _remove_socket_dir(cluster: PostgresCluster) -> None:
    if cluster.temporary_socket_dir:
        shutil.rmtree(cluster.socket_dir, ignore_errors=True)


def stop_postgres(cluster: PostgresCluster | str | Path, timeout_s: float = 30.0) -> None:
    """Stop a cluster (``pg_ctl stop -m fast``), given the object or the server folder it runs in.

    When ``pg_ctl`` does not finish in time, the postmaster and every descendant get SIGQUIT (immediate
    shutdown), then SIGKILL. Returns once none of its processes is left; a cluster that is not running is
    left alone.
    """
    if isinstance(cluster, PostgresCluster):
        cluster_folder, user_name = cluster.folder, cluster.os_user
    else:
        cluster_folder, user_name = Path(cluster).expanduser().resolve() / "postgres", None
        if os.geteuid() == 0 and cluster_folder.exists():
            owner = pwd.getpwuid(cluster_folder.stat().st_uid).pw_name
            user_name = None if owner == "root" else owner
    data_dir = cluster_folder / "data"
    pid = _postmaster_pid(data_dir)
    if pid is not None:
        tree = process_tree(pid)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, PostgresNotFound):
            _run([find_pg_binary("pg_ctl"), "stop", "-D", data_dir, "-m", "fast", "-w", "-t", str(int(timeout_s)),
                  "-s"], _resolve_user(user_name), cluster_folder, timeout_s + 5, "pg_ctl stop")
        left = wait_gone(tree, 5.0)
        if left:
            stop_tree(pid, signal.SIGQUIT, 5.0, also=left)
    if isinstance(cluster, PostgresCluster):
        _remove_socket_dir(cluster)
        cluster.pid = None


def create_database(cluster: PostgresCluster, name: str = "mlflow") -> bool:
    """Create database ``name`` in the cluster unless it exists; return whether it was created."""
    if not _DB_NAME.match(name):
        raise ValueError(f"'{name}' is not a plain database name. Use letters, digits and underscores (up to 63), "
                         "starting with a letter or underscore, for example 'mlflow'.")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update({"PGHOST": str(cluster.socket_dir), "PGPORT": str(cluster.port), "PGUSER": SUPERUSER,
                "PGCONNECT_TIMEOUT": "10"})
    me, cwd = _resolve_user(None), cluster.folder.parent
    exists = _run([find_pg_binary("psql"), "-X", "-d", "postgres", "-tAc",
                   f"SELECT 1 FROM pg_database WHERE datname = '{name}'"], me, cwd, 30, "psql", env).stdout.strip()
    if exists == "1":
        return False
    _run([find_pg_binary("createdb"), name], me, cwd, 30, f"createdb {name}", env)
    return True


@dataclass
class TrackingServer:
    """PostgreSQL plus ``mlflow server`` on it, started by :func:`start_tracking_server`; a context manager."""

    folder: Path
    postgres: PostgresCluster
    mlflow: subprocess.Popen
    url: str
    """The tracking URI clients use (``tracking.uri``)."""
    database: str

    @property
    def backend_uri(self) -> str:
        return self.postgres.uri(self.database)

    def stop(self) -> None:
        """Stop the MLflow server (its whole process tree), then PostgreSQL."""
        try:
            stop_server(self.mlflow)
        finally:
            stop_postgres(self.postgres)

    def __enter__(self) -> TrackingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_tracking_server(folder: str | Path, *, port: int = 5000, host: str = "127.0.0.1",
                          database: str = "mlflow", allowed_hosts: str | None = None, os_user: str | None = None,
                          throwaway: bool = False, timeout_s: float = 120.0) -> TrackingServer:
    """Start PostgreSQL in ``<folder>/postgres`` (creating it and ``database`` on first use), then
    ``mlflow server`` on it with artifacts in ``<folder>/artifacts`` and its log in ``<folder>/mlflow.log``.

    The same folder can be started again later: runs, metrics and artifacts are kept. A busy port is a
    RuntimeError ending in "Choose another port." before anything starts; when the MLflow server fails to
    start, PostgreSQL is stopped again before the error is raised.
    """
    folder = Path(folder).expanduser().resolve()
    try:
        import psycopg  # noqa: F401 - SQLAlchemy's postgresql+psycopg driver
    except ImportError:
        raise RuntimeError("MLflow on PostgreSQL needs the Python package 'psycopg' (version 3), which is not "
                           "installed. Install it with: pip install 'psycopg[binary]'.") from None
    problem = port_problem(host, port)
    if problem:
        raise RuntimeError(f"Cannot start the MLflow server on {host}:{port} ({problem}). Choose another port.")
    cluster = start_postgres(folder, os_user=os_user, throwaway=throwaway, timeout_s=min(timeout_s, 60.0))
    try:
        create_database(cluster, database)
        process, url = start_server(port, host, cluster.uri(database), folder / "artifacts",
                                    log_file=folder / "mlflow.log", timeout_s=timeout_s, allowed_hosts=allowed_hosts)
    except BaseException:
        stop_postgres(cluster)
        raise
    return TrackingServer(folder, cluster, process, url, database)


@contextlib.contextmanager
def _signals(handler: Any) -> Iterator[None]:
    """Handle SIGINT, SIGTERM and SIGHUP with ``handler`` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(folder: str | Path, port: int = 5000, host: str = "127.0.0.1", *, database: str = "mlflow",
          allowed_hosts: str | None = None, os_user: str | None = None) -> int:
    """Run PostgreSQL and an MLflow server on it from ``folder`` until SIGINT or SIGTERM; return an exit code.

    Prints the tracking URI to give sweeps (``--set tracking.uri=...``). A host other than loopback gets a
    warning: the server has no authentication. When either server dies on its own, the other is stopped and
    1 is returned; after Ctrl-C/SIGTERM both are stopped (a second signal does not cut that short) and 0 is
    returned. A busy port gives 2, other errors while starting 1, each printed as one paragraph.
    """
    if not is_loopback(host):
        print(f"Warning: binding the MLflow server to {host} exposes every run and artifact, without "
              "authentication, to anyone who can reach this machine.", file=sys.stderr, flush=True)
    try:
        with _signals(_interrupt):
            server = start_tracking_server(folder, port=port, host=host, database=database,
                                           allowed_hosts=allowed_hosts, os_user=os_user)
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, PermissionError, ValueError) as error:
        print(f"Error: {error}", file=sys.stderr, flush=True)
        return 2 if "Choose another port" in str(error) else 1
    print(f"MLflow tracking server at {server.url} (PostgreSQL in {server.postgres.folder}, artifacts in "
          f"{server.folder / 'artifacts'}). Use --set tracking.uri={server.url}. Ctrl-C stops it.", flush=True)
    code = 0
    try:
        with _signals(_interrupt):
            while code == 0:
                if server.mlflow.poll() is not None:
                    print(f"Error: the MLflow server stopped (exit code {server.mlflow.returncode}); see "
                          f"{server.folder / 'mlflow.log'}.", file=sys.stderr, flush=True)
                    code = 1
                elif not server.postgres.running():
                    print(f"Error: PostgreSQL stopped; see {server.postgres.log_file}.", file=sys.stderr, flush=True)
                    code = 1
                else:
                    time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        with _signals(signal.SIG_IGN):
            server.stop()
    print("Stopped the MLflow server and PostgreSQL.", flush=True)
    return code
