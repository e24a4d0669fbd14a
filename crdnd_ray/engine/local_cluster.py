"""A Ray cluster of several nodes on this machine, started with the Ray CLI: the cluster path without a cluster.

Each node is a ``ray start`` in a session (process group) of its own, with its own temp dir, free ports, a
custom resource named after it (``{"node_a": 1}``) and the quick health checks below, so that a node whose
processes are killed is declared dead within about a second. Join it with ``scaling.address`` (or
``RAY_ADDRESS``) set to :attr:`LocalCluster.address`. ``hidden`` folders are covered, for every node's
processes, by an empty tmpfs in a mount namespace of the node (root only): what the driver keeps there, a
node cannot read, as on a machine that does not share the driver's disk.

Stopping a node signals its process group and every descendant of it (Ray's workers run in sessions of
their own), never ``ray stop``, which would stop every Ray instance of the machine. Used by the cluster
tests and ``benchmarks/cluster_overhead.py``; ``python -m crdnd_ray.engine.local_cluster`` starts one and
prints its address until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crdnd_ray.processes import stop_tree

__all__ = ["HEALTH_CHECK_ENVIRONMENT", "LocalCluster", "Node"]

HEALTH_CHECK_ENVIRONMENT = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}
"""How often the head checks each node: a node that stops answering is dead after about 1.5 s (default 15 s)."""
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _free_ports(count: int) -> list[int]:
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _option(command: str, name: str) -> str:
    """The value of ``--name=value`` in a command line (empty when absent)."""
    for part in command.split():
        if part.startswith(f"--{name}="):
            return part.split("=", 1)[1]
    return ""


@dataclass
class Node:
    """One ``ray start`` of a :class:`LocalCluster`."""

    name: str
    """The node's name, also a custom resource it offers once (``{name: 1}``)."""
    temp_dir: Path
    log_file: Path
    pgid: int | None = None
    """Its process group: the session that ``ray start`` ran in, kept by every daemon of the node."""

    def raylet(self) -> tuple[int, str] | None:
        """The node's raylet (process id, command line), found by its socket in the node's temp dir."""
        marker = f"--raylet_socket_name={self.temp_dir}/"
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and marker in (command := _cmdline(int(entry.name))):
                return int(entry.name), command
        return None

    @property
    def node_id(self) -> str:
        """The node's Ray node id (hex), read from its raylet's command line; empty when it is not running."""
        found = self.raylet()
        return _option(found[1], "node_id") if found else ""


class LocalCluster:
    """Ray nodes on this machine (the first is the head), ``cpus`` logical CPUs and ``resources`` each.

    Use it as a context manager, or call :meth:`start` and :meth:`shutdown`. ``folder`` holds each node's
    temp dir and log (Unix socket paths below it must stay short); by default a new folder in /tmp, removed
    again by :meth:`shutdown`.
    """

    def __init__(self, names: Sequence[str] = ("node_a", "node_b"), *, cpus: float = 1.0,
                 resources: dict[str, float] | None = None, hidden: Sequence[Path] = (),
                 folder: Path | None = None, object_store_bytes: int = 256 * 2**20) -> None:
        if hidden and (os.geteuid() != 0 or shutil.which("unshare") is None):
            raise PermissionError("Hiding folders from Ray nodes needs root and the 'unshare' program (util-linux): "
                                  "each node runs in a mount namespace with an empty tmpfs over every hidden folder.")
        self.owns_folder = folder is None
        self.folder = Path(folder or tempfile.mkdtemp(prefix="crdnd-cluster-", dir="/tmp"))
        self.nodes = {name: Node(name, self.folder / name, self.folder / f"{name}.log") for name in names}
        self.head = self.nodes[names[0]]
        self.cpus, self.resources, self.object_store_bytes = cpus, dict(resources or {}), object_store_bytes
        self.hidden = [Path(path).resolve() for path in hidden]
        self.address = ""
        ray = Path(sys.executable).with_name("ray")
        self.ray = str(ray) if ray.exists() else shutil.which("ray") or "ray"

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def start(self) -> LocalCluster:
        """Start every node (the head first) and return once all have joined; stops them again on failure."""
        try:
            for name in self.nodes:
                self.start_node(name)
        except BaseException:
            self.shutdown()
            raise
        return self

    def environment(self) -> dict[str, str]:
        """The environment of every node: this process's (without ``RAY_ADDRESS``), local auth off, quick
        health checks, and this package first on ``PYTHONPATH`` so Ray's workers import the same code."""
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        env.update({"RAY_AUTH_MODE": "disabled", **HEALTH_CHECK_ENVIRONMENT})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
        return env

    def start_node(self, name: str, timeout_s: float = 180.0) -> Node:
        """Start (or start again, as a new node id) the node ``name`` and wait until it runs."""
        node = self.nodes[name]
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        agent_port, gcs_port, dashboard_port, client_port = _free_ports(4)
        command = [self.ray, "start", f"--temp-dir={node.temp_dir}", f"--num-cpus={self.cpus:g}", "--num-gpus=0",
                   f"--resources={json.dumps({name: 1, **self.resources})}",
                   f"--dashboard-agent-listen-port={agent_port}", "--min-worker-port=0", "--max-worker-port=0",
                   f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats"]
        if node is self.head:
            command += ["--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
                        f"--ray-client-server-port={client_port}", "--dashboard-host=127.0.0.1"]
        else:
            command.append(f"--address={self.address}")
        if self.hidden:
            mounts = [f"mount -t tmpfs -o size=1m,mode=0700 crdnd-hidden {shlex.quote(str(path))}"
                      for path in self.hidden]
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       " && ".join([*mounts, f"exec {shlex.join(command)}"])]
        with open(node.log_file, "ab") as log:
            process = subprocess.Popen(command, env=self.environment(), stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        node.pgid = process.pid
        try:
            code = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        raylet = node.raylet()
        if code != 0 or raylet is None:
            self.stop_node(name)
            tail = "\n".join(node.log_file.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"The Ray node '{name}' did not start (ray start exit code {code}). The end of "
                               f"{node.log_file}:\n{tail}")
        if node is self.head:
            self.address = _option(raylet[1], "gcs-address")
        return node

    def stop_node(self, name: str, sig: int = signal.SIGTERM, grace_s: float = 5.0) -> list[int]:
        """Stop node ``name``: ``sig`` to its process group and every descendant (SIGKILL is a crash: the
        head notices within about a second), SIGKILL after ``grace_s``. Returns the processes signalled."""
        node = self.nodes[name]
        if node.pgid is None:
            return []
        stopped = stop_tree(node.pgid, sig, grace_s)
        node.pgid = None
        return stopped

    def node_ids(self) -> dict[str, str]:
        """Node name → Ray node id (hex) of every running node."""
        return {name: node_id for name, node in self.nodes.items() if (node_id := node.node_id)}

    def shutdown(self) -> None:
        """Stop every node, the head last, leaving none of their processes (and remove a folder of its own)."""
        for node in [*[n for n in self.nodes.values() if n is not self.head], self.head]:
            self.stop_node(node.name)
        if self.owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    with LocalCluster() as cluster:
        print(f"Ray cluster at {cluster.address} with nodes {cluster.node_ids()}; join it with "
              f"--set scaling.address={cluster.address}. Ctrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
