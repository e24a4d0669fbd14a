"""Processes of this machine read from ``/proc``: the tree of a process, and stopping a whole tree for good.

The servers of :mod:`crdnd_ray.tracking` (``mlflow server``, PostgreSQL) and the Ray nodes of
:mod:`crdnd_ray.engine.local_cluster` each run as a process group of their own, but some of their children
open sessions of their own (PostgreSQL's backends, Ray's worker processes), so signalling the group alone
leaves them behind. :func:`stop_tree` signals the group and every descendant.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["alive", "process_state", "process_tree", "stop_tree", "wait_gone"]


def process_state(pid: int) -> str | None:
    """The state letter of a process (``R``, ``S``, ``Z``, ...), or None when it does not exist."""
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
    """``pid``, the live members of process group ``pid``, and all their live (non-zombie) descendants."""
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


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run (zombies count as gone)."""
    return [pid for pid in pids if process_state(pid) not in (None, "Z")]


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` runs or ``timeout_s`` has passed; return those still running."""
    deadline = time.monotonic() + timeout_s
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_tree(root: int, first: int = signal.SIGTERM, grace_s: float = 10.0, also: Iterable[int] = ()) -> list[int]:
    """Stop ``root``'s process tree (see :func:`process_tree`) and the processes ``also``: ``first`` to the
    group and to every member, up to ``grace_s`` seconds to exit, then SIGKILL for whatever is left (also
    members that appeared meanwhile). Returns the processes signalled; none runs afterwards (5 s at most).
    """
    tree = sorted(set(process_tree(root)) | set(alive(list(also))))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root, first)
    _signal(tree, first)
    left = sorted(set(wait_gone(tree, grace_s)) | set(process_tree(root)))
    if left:
        _signal(left, signal.SIGKILL)
        wait_gone(left, 5.0)
    return sorted(set(tree) | set(left))
