"""A PostgreSQL-backed MLflow tracking server on one machine: PostgreSQL in a folder plus ``mlflow server``.

SQLite is fine for one writer; a sweep whose trials (or several drivers) write at the same time wants a
real database behind ``mlflow server``. This module runs both from one folder::

    <folder>/
      postgres/        the PostgreSQL cluster (owned by the user PostgreSQL runs as, mode 0700)
        data/          initdb's data directory
        run/           its Unix socket (no TCP unless asked for)
        postgres.log   the server's log
        superuser.password
      artifacts/       the artifacts ``mlflow server --serve-artifacts`` stores (``mlflow-artifacts:/``)
      mlflow.log       the MLflow server's log

PostgreSQL refuses to run as root. When this process is root, the cluster is created and run as the system
user ``postgres`` (created by Debian's ``postgresql`` package; another one can be named with ``os_user``):
``initdb`` and ``pg_ctl`` are started with ``subprocess``'s ``user=``/``group=`` (no ``su``/``runuser``, no
PAM), the ``postgres/`` folder is handed to that user, and ``<folder>`` itself gets the "others may enter"
bit so that user can reach it. Every folder above ``<folder>`` must already be enterable by that user
(``/tmp``, ``/srv`` and ``/var/lib`` are; pytest's ``/tmp/pytest-of-root`` is not).

By default PostgreSQL listens on no TCP port at all: only a Unix socket in a private folder, so only this
user (and root) can connect, with ``trust`` authentication. ``listen="127.0.0.1"`` (or another address) adds
a TCP listener that requires the superuser's password (SCRAM), kept in ``postgres/superuser.password``.

The MLflow server runs under this interpreter (``sys.executable -m mlflow server``), one worker, no job
runner, artifacts proxied to ``<folder>/artifacts``, bound to 127.0.0.1 unless asked otherwise. It reaches
PostgreSQL through SQLAlchemy's ``postgresql+psycopg`` driver, so ``psycopg`` (version 3) must be installed
(``pip install 'psycopg[binary]'``; it is a dependency of this project).

Entry points: :func:`start_tracking_server` (returns a :class:`TrackingServer`, also a context manager) and
:func:`serve`, which blocks until SIGINT/SIGTERM and then stops both servers (the future
``crdnd-ray server`` command). The lower-level :func:`start_postgres`, :func:`create_database`,
:func:`stop_postgres`, :func:`start_mlflow_server` and :func:`stop_mlflow_server` can be used on their own.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SUPERUSER",
    "MlflowServer",
    "PostgresCluster",
    "PostgresNotFound",
    "TrackingServer",
    "create_database",
    "find_pg_binary",
    "process_tree",
    "serve",
    "start_mlflow_server",
    "start_postgres",
    "start_tracking_server",
    "stop_mlflow_server",
    "stop_postgres",
    "stop_tracking_server",
]

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

    Searched on ``PATH``, then in ``pg_config --bindir``, then in ``/usr/lib/postgresql/<version>/bin``
    (Debian's layout, newest version first). Any other program is taken from ``initdb``'s folder first, so
    all of them come from one installation (Debian's ``/usr/bin/psql`` is only a version-picking wrapper).
    Raises :class:`PostgresNotFound` with how to install it.
    """
    if name != "initdb":
        with contextlib.suppress(PostgresNotFound):
            beside = find_pg_binary("initdb").resolve().parent / name
            if beside.is_file() and os.access(beside, os.X_OK):
                return beside
    found = shutil.which(name)
    if found:
        return Path(found)
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            bindir = subprocess.run([pg_config, "--bindir"], check=False, capture_output=True, text=True,
                                    timeout=10).stdout
            if bindir.strip():
                candidates.append(Path(bindir.strip()))

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for folder in candidates:
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

    @property
    def other(self) -> bool:
        return self.name is not None

    def popen_args(self) -> dict[str, Any]:
        if not self.other:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}


def _resolve_user(os_user: str | None) -> _RunAs:
    if os.geteuid() != 0:
        if os_user is not None and os_user != pwd.getpwuid(os.geteuid()).pw_name:
            raise PermissionError(
                f"Only root can run PostgreSQL as another user ('{os_user}'). Leave os_user unset to run it "
                "as yourself."
            )
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
    groups = tuple(sorted(set(os.getgrouplist(name, entry.pw_gid))))
    return _RunAs(name, entry.pw_uid, entry.pw_gid, groups)


def _may_enter(directory: Path, user: _RunAs) -> bool:
    info = directory.stat()
    if info.st_uid == user.uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in (user.gid, *user.groups):
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _make_reachable(folder: Path, user: _RunAs) -> None:
    """Let ``user`` enter ``folder``: add the "others may enter" bit to ``folder`` itself if needed, and
    fail with a clear message when a folder above it shuts that user out."""
    if not user.other:
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


def _chown(path: Path, user: _RunAs) -> None:
    if user.other:
        os.chown(path, user.uid, user.gid)


def _write_owned(path: Path, text: str, user: _RunAs, mode: int = 0o600) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    path.chmod(mode)
    _chown(path, user)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _port_problem(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "0.0.0.0", port))
        except OSError as error:
            return str(error)
    return None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _process_state(pid: int) -> str | None:
    """The state letter of a process (``R``, ``S``, ``Z``, ...) from ``/proc``, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw.rsplit(")", 1)[1].split()[0]


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid → (parent pid, process group, state) of every process visible in ``/proc``."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live (non-zombie) descendants, and every live member of process group ``pid``.

    PostgreSQL's children put themselves in process groups of their own (``setsid``), so a postmaster's
    process group alone does not cover them; its descendants do.
    """
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid] + [other for other, (_, group, _) in table.items() if group == pid]
    while todo:
        current = todo.pop()
        if current in found or current not in table:
            continue
        found.add(current)
        todo.extend(children.get(current, []))
    return sorted(p for p in found if table[p][2] != "Z")


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if _process_state(pid) not in (None, "Z")]


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` is alive (or the time is up); return those still alive."""
    deadline = time.monotonic() + timeout_s
    while (left := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _terminate_tree(root: int, first: int, timeout_s: float) -> None:
    """Signal ``first`` to ``root``'s process group, wait, then SIGKILL whatever of its tree is left."""
    tree = process_tree(root)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root, first)
    left = _wait_gone(tree, timeout_s)
    tree = sorted(set(left) | set(process_tree(root)))
    if tree:
        _signal_all(tree, signal.SIGKILL)
        _wait_gone(tree, 5.0)


@dataclass
class PostgresCluster:
    """A running PostgreSQL cluster started by :func:`start_postgres`."""

    folder: Path
    """The cluster's own folder (``<server folder>/postgres``)."""
    port: int
    """The port: of the TCP listener, and the number in the Unix socket's name (``.s.PGSQL.<port>``)."""
    socket_dir: Path
    listen: str | None = None
    """The TCP address PostgreSQL listens on, or None for the Unix socket only."""
    os_user: str | None = None
    """The OS user the server runs as; None when it is this process's user."""
    pid: int | None = None
    """The postmaster's process id (also its process group: ``pg_ctl`` starts it in a new session)."""
    throwaway: bool = False
    _temporary_socket_dir: bool = field(default=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_file(self) -> Path:
        return self.folder / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.folder / "superuser.password"

    def uri(self, database: str = "postgres", driver: str = "psycopg") -> str:
        """A SQLAlchemy URI for ``database`` through the Unix socket (no password needed).

        ``driver`` is SQLAlchemy's driver name: ``psycopg`` (psycopg 3, the default) or ``psycopg2``.
        """
        query = urllib.parse.urlencode({"host": str(self.socket_dir), "port": str(self.port)}, safe="/")
        return f"postgresql+{driver}://{SUPERUSER}@/{database}?{query}"

    def tcp_uri(self, database: str = "postgres", driver: str = "psycopg", host: str | None = None) -> str:
        """A SQLAlchemy URI for ``database`` over TCP with the superuser's password (needs ``listen``)."""
        if self.listen is None:
            raise ValueError("This cluster listens on no TCP address; start it with listen='127.0.0.1'.")
        password = urllib.parse.quote(self.password_file.read_text().strip(), safe="")
        where = host or ("127.0.0.1" if self.listen in ("0.0.0.0", "*", "") else self.listen)
        return f"postgresql+{driver}://{SUPERUSER}:{password}@{where}:{self.port}/{database}"

    def running(self) -> bool:
        """Whether the postmaster is alive."""
        return self.pid is not None and _process_state(self.pid) not in (None, "Z")


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
        first = (data_dir / "postmaster.pid").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    pid = int(first) if first.strip().isdigit() else None
    return pid if pid is not None and _process_state(pid) not in (None, "Z") else None


def _socket_dir(cluster_folder: Path, user: _RunAs) -> tuple[Path, bool]:
    """``<cluster>/run``, or a short private folder in the temp dir when that path would be too long for a
    Unix socket (about 107 bytes on Linux)."""
    wanted = cluster_folder / "run"
    if len(str(wanted / ".s.PGSQL.65535.lock")) <= _SOCKET_PATH_LIMIT:
        wanted.mkdir(mode=0o700, exist_ok=True)
        _chown(wanted, user)
        return wanted, False
    short = Path(tempfile.mkdtemp(prefix="crdnd-pg-", dir="/tmp"))
    _chown(short, user)
    return short, True


def start_postgres(folder: str | Path, *, port: int | None = None, listen: str | None = None,
                   os_user: str | None = None, throwaway: bool = False, timeout_s: float = 60.0) -> PostgresCluster:
    """Start (creating it on first use) the PostgreSQL cluster in ``<folder>/postgres``; wait until it is ready.

    ``port`` defaults to a free one. ``listen`` adds a TCP listener on that address (password required);
    by default there is only a Unix socket. ``throwaway=True`` turns durability off (``fsync``,
    ``synchronous_commit``, ``full_page_writes``) for tests and scratch runs; the data are still kept in the
    folder. Raises :class:`PostgresNotFound` when PostgreSQL is not installed, PermissionError when the
    server user cannot reach the folder, RuntimeError (with the log's tail) when it does not start.
    """
    initdb, pg_ctl = find_pg_binary("initdb"), find_pg_binary("pg_ctl")
    user = _resolve_user(os_user)
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    _make_reachable(folder, user)
    cluster_folder = folder / "postgres"
    cluster_folder.mkdir(mode=0o700, exist_ok=True)
    cluster_folder.chmod(0o700)
    _chown(cluster_folder, user)
    data_dir = cluster_folder / "data"
    running = _postmaster_pid(data_dir)
    if running is not None:
        raise RuntimeError(
            f"A PostgreSQL server (process {running}) is already running on {data_dir}. Stop it first with "
            f"crdnd_ray.pgserver.stop_postgres('{folder}') (or 'pg_ctl stop -D {data_dir}' as the user "
            "that owns it)."
        )
    password_file = cluster_folder / "superuser.password"
    if not (data_dir / "PG_VERSION").is_file():
        if data_dir.exists() and any(data_dir.iterdir()):
            raise RuntimeError(
                f"{data_dir} is not empty but holds no PostgreSQL cluster (no PG_VERSION). Remove it or choose "
                "another server folder."
            )
        _write_owned(password_file, secrets.token_urlsafe(24) + "\n", user)
        command = [initdb, "-D", data_dir, "-U", SUPERUSER, "--encoding=UTF8", "--locale=C",
                   "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={password_file}"]
        if throwaway:
            command.append("--no-sync")
        _run(command, user, cluster_folder, timeout_s=max(timeout_s, 120.0), what="initdb")
        conf = data_dir / "postgresql.conf"
        with conf.open("a") as handle:
            handle.write("\n# Written at each start by crdnd_ray.pgserver (port, socket, listen address).\n"
                         "include_if_exists = 'crdnd.conf'\n")
    socket_dir, temporary = _socket_dir(cluster_folder, user)
    port = port or _free_port()
    settings = {
        "port": str(port),
        "listen_addresses": f"'{listen or ''}'",
        "unix_socket_directories": f"'{socket_dir}'",
        "unix_socket_permissions": "0700",
    }
    if throwaway:
        settings.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
    _write_owned(data_dir / "crdnd.conf", "".join(f"{key} = {value}\n" for key, value in settings.items()),
                 user, mode=0o600)
    cluster = PostgresCluster(cluster_folder, port, socket_dir, listen, user.name, None, throwaway, temporary)
    try:
        _run([pg_ctl, "start", "-D", data_dir, "-l", cluster.log_file, "-w", "-t", str(int(timeout_s)), "-s"],
             user, cluster_folder, timeout_s=timeout_s + 15, what="pg_ctl start")
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        _cleanup_socket_dir(cluster)
        raise RuntimeError(
            f"PostgreSQL did not start on {data_dir} ({error}). The end of {cluster.log_file}:\n"
            f"{_tail(cluster.log_file)}"
        ) from None
    cluster.pid = _postmaster_pid(data_dir)
    return cluster


def _cleanup_socket_dir(cluster: PostgresCluster) -> None:
    if cluster._temporary_socket_dir:
        shutil.rmtree(cluster.socket_dir, ignore_errors=True)


def stop_postgres(cluster: PostgresCluster | str | Path, timeout_s: float = 30.0) -> None:
    """Stop a cluster (``pg_ctl stop -m fast``), given the object or the server folder it runs in.

    When ``pg_ctl`` does not finish in time, the postmaster gets SIGQUIT (immediate shutdown), then it and
    every descendant SIGKILL. Returns once none of its processes is left. A cluster that is not running is
    left alone.
    """
    if isinstance(cluster, PostgresCluster):
        cluster_folder, user_name = cluster.folder, cluster.os_user
    else:
        cluster_folder = Path(cluster).expanduser().resolve() / "postgres"
        user_name = None
        if os.geteuid() == 0 and cluster_folder.exists():
            user_name = pwd.getpwuid(cluster_folder.stat().st_uid).pw_name
            user_name = None if user_name == "root" else user_name
    data_dir = cluster_folder / "data"
    pid = _postmaster_pid(data_dir)
    if pid is None and isinstance(cluster, PostgresCluster) and cluster.running():
        pid = cluster.pid
    if pid is not None:
        tree = process_tree(pid)
        user = _resolve_user(user_name)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, PostgresNotFound):
            _run([find_pg_binary("pg_ctl"), "stop", "-D", data_dir, "-m", "fast", "-w", "-t", str(int(timeout_s)),
                  "-s"], user, cluster_folder, timeout_s=timeout_s + 5, what="pg_ctl stop")
        left = _wait_gone(tree, 5.0)
        if left:
            _terminate_tree(pid, signal.SIGQUIT, 5.0)
            _signal_all(left, signal.SIGKILL)
            _wait_gone(left, 5.0)
    if isinstance(cluster, PostgresCluster):
        _cleanup_socket_dir(cluster)
        cluster.pid = None


def _client_env(cluster: PostgresCluster) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update({"PGHOST": str(cluster.socket_dir), "PGPORT": str(cluster.port), "PGUSER": SUPERUSER,
                "PGCONNECT_TIMEOUT": "10"})
    return env


def create_database(cluster: PostgresCluster, name: str = "mlflow") -> bool:
    """Create database ``name`` in the cluster unless it exists; return whether it was created."""
    if not _DB_NAME.match(name):
        raise ValueError(
            f"'{name}' is not a plain database name. Use letters, digits and underscores (up to 63), "
            "starting with a letter or underscore, for example 'mlflow'."
        )
    psql, createdb = find_pg_binary("psql"), find_pg_binary("createdb")
    me = _resolve_user(None)
    env = _client_env(cluster)
    exists = _run([psql, "-X", "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
                  me, cluster.folder.parent, 30, "psql (looking up the database)", env).stdout.strip()
    if exists == "1":
        return False
    _run([createdb, name], me, cluster.folder.parent, 30, f"createdb {name}", env)
    return True


@dataclass
class MlflowServer:
    """A running ``mlflow server`` started by :func:`start_mlflow_server`."""

    process: subprocess.Popen
    url: str
    log_file: Path | None

    @property
    def pgid(self) -> int:
        """Its process group (the server was started in a new session)."""
        return self.process.pid


def _require_driver(backend_uri: str) -> None:
    scheme = backend_uri.split("://", 1)[0]
    module = {"postgresql+psycopg": "psycopg", "postgresql": None, "postgresql+psycopg2": "psycopg2"}.get(scheme)
    if module is None:
        return
    try:
        __import__(module)
    except ImportError:
        package = "psycopg[binary]" if module == "psycopg" else "psycopg2-binary"
        raise RuntimeError(
            f"The backend store {scheme}:// needs the Python package '{module}', which is not installed. "
            f"Install it with: pip install '{package}'."
        ) from None


def start_mlflow_server(backend_uri: str, artifacts_dir: str | Path, *, host: str = "127.0.0.1",
                        port: int = 5000, allowed_hosts: str | None = None, log_file: str | Path | None = None,
                        timeout_s: float = 120.0) -> MlflowServer:
    """Start ``mlflow server`` (one worker, no job runner, proxied artifacts) and wait until ``/health`` answers.

    Artifacts uploaded through the server go to ``artifacts_dir``. The first start on an empty database
    creates MLflow's schema, which takes a while (about 10-20 s on a small machine). ``allowed_hosts`` is
    passed to ``--allowed-hosts``: needed when clients reach the server by a name that is neither localhost
    nor a private IP (a Kubernetes Service name, for example). Raises RuntimeError (with the log's tail, and
    the process stopped) when the server does not become healthy within ``timeout_s``.
    """
    _require_driver(backend_uri)
    problem = _port_problem(host, port)
    if problem:
        raise RuntimeError(f"Cannot start the MLflow server on {host}:{port} ({problem}). Choose another port.")
    artifacts = Path(artifacts_dir).expanduser().resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
               "--serve-artifacts", "--artifacts-destination", artifacts.as_uri(),
               "--host", host, "--port", str(port), "--workers", "1"]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = Path(log_file).expanduser().resolve() if log_file is not None else None
    handle = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 - handed to the child
    try:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                   stdout=handle if handle is not None else sys.__stderr__.fileno(),
                                   stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if handle is not None:
            handle.close()
    shown = f"[{host}]" if ":" in host else host
    server = MlflowServer(process, f"http://{shown}:{port}", log_path)
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else shown)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with opener.open(f"http://{probe}:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    stop_mlflow_server(server)
    tail = f" The end of {log_path}:\n{_tail(log_path)}" if log_path is not None else ""
    raise RuntimeError(
        f"The MLflow server on {server.url} did not become healthy within {timeout_s:.0f} s (exit code "
        f"{process.returncode}).{tail}"
    )


def stop_mlflow_server(server: MlflowServer, timeout_s: float = 15.0) -> int:
    """Stop the server's process group and every descendant (SIGTERM, then SIGKILL); return its exit code."""
    process = server.process
    tree = process_tree(server.pgid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pgid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
    left = _wait_gone(sorted(set(tree) | set(process_tree(server.pgid))), 5.0)
    if left or process.poll() is None:
        _terminate_tree(server.pgid, signal.SIGKILL, 5.0)
        _signal_all(left, signal.SIGKILL)
        _wait_gone(left, 5.0)
        process.wait(timeout_s)
    return int(process.returncode or 0)


@dataclass
class TrackingServer:
    """PostgreSQL plus ``mlflow server`` on it, started by :func:`start_tracking_server`."""

    folder: Path
    postgres: PostgresCluster
    mlflow: MlflowServer
    database: str

    @property
    def url(self) -> str:
        """The tracking URI clients use (``tracking.uri``)."""
        return self.mlflow.url

    @property
    def backend_uri(self) -> str:
        return self.postgres.uri(self.database)

    def stop(self) -> None:
        """Stop the MLflow server, then PostgreSQL."""
        stop_tracking_server(self)

    def __enter__(self) -> TrackingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_tracking_server(folder: str | Path, *, port: int = 5000, host: str = "127.0.0.1",
                          database: str = "mlflow", allowed_hosts: str | None = None, pg_port: int | None = None,
                          pg_listen: str | None = None, os_user: str | None = None, throwaway: bool = False,
                          timeout_s: float = 120.0) -> TrackingServer:
    """Start PostgreSQL in ``<folder>/postgres`` (creating it and ``database`` on first use), then
    ``mlflow server`` on it with artifacts in ``<folder>/artifacts`` and its log in ``<folder>/mlflow.log``.

    The same folder can be started again later: runs, metrics and artifacts are kept. When the MLflow
    server fails to start, PostgreSQL is stopped again before the error is raised.
    """
    folder = Path(folder).expanduser().resolve()
    _require_driver("postgresql+psycopg://")
    problem = _port_problem(host, port)
    if problem:
        raise RuntimeError(f"Cannot start the MLflow server on {host}:{port} ({problem}). Choose another port.")
    cluster = start_postgres(folder, port=pg_port, listen=pg_listen, os_user=os_user, throwaway=throwaway,
                             timeout_s=min(timeout_s, 60.0))
    try:
        create_database(cluster, database)
        server = start_mlflow_server(cluster.uri(database), folder / "artifacts", host=host, port=port,
                                     allowed_hosts=allowed_hosts, log_file=folder / "mlflow.log",
                                     timeout_s=timeout_s)
    except BaseException:
        stop_postgres(cluster)
        raise
    return TrackingServer(folder, cluster, server, database)


def stop_tracking_server(server: TrackingServer) -> None:
    """Stop the MLflow server (its process group), then PostgreSQL (``pg_ctl stop -m fast``)."""
    try:
        stop_mlflow_server(server.mlflow)
    finally:
        stop_postgres(server.postgres)


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt while the block runs (main thread only)."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _ignored_signals() -> Iterator[None]:
    """Ignore SIGINT, SIGTERM and SIGHUP while the block runs (main thread only), so that a second Ctrl-C
    does not cut a shutdown short."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(folder: str | Path, port: int = 5000, host: str = "127.0.0.1", *, database: str = "mlflow",
          allowed_hosts: str | None = None, os_user: str | None = None) -> int:
    """Run PostgreSQL and an MLflow server on it from ``folder`` until SIGINT or SIGTERM; return an exit code.

    Prints the tracking URI to give sweeps (``--set tracking.uri=...``). A host other than loopback gets a
    warning: the server has no authentication. When either server dies on its own, the other is stopped
    and 1 is returned; after Ctrl-C/SIGTERM both are stopped and 0 is returned. Errors while starting are
    printed and give 1 (2 for a busy port).
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"Warning: binding the MLflow server to {host} exposes every run and artifact, without "
              "authentication, to anyone who can reach this machine.", file=sys.stderr, flush=True)
    try:
        with _stop_signals():
            server = start_tracking_server(folder, port=port, host=host, database=database,
                                           allowed_hosts=allowed_hosts, os_user=os_user)
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, PermissionError, PostgresNotFound, ValueError) as error:
        print(f"Error: {error}", file=sys.stderr, flush=True)
        return 2 if "Choose another port" in str(error) else 1
    print(f"MLflow tracking server at {server.url} (PostgreSQL in {server.postgres.folder}, artifacts in "
          f"{server.folder / 'artifacts'}). Use --set tracking.uri={server.url}. Ctrl-C stops it.", flush=True)
    code = 0
    try:
        with _stop_signals():
            while True:
                if server.mlflow.process.poll() is not None:
                    print(f"Error: the MLflow server stopped (exit code {server.mlflow.process.returncode}); "
                          f"see {server.mlflow.log_file}.", file=sys.stderr, flush=True)
                    code = 1
                    break
                if not server.postgres.running():
                    print(f"Error: PostgreSQL stopped; see {server.postgres.log_file}.", file=sys.stderr, flush=True)
                    code = 1
                    break
                time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        with _ignored_signals():
            server.stop()
    print("Stopped the MLflow server and PostgreSQL.", flush=True)
    return code
