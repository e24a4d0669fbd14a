"""The run-folder contract: what a run's folder holds, how it is read and written, and the one status rule.

A **run folder** (the output of ``crdnd-ray train``, or ``trials/<trial id>/`` inside a sweep or ablation):

- ``config.yaml``: the resolved config of the run;
- ``metrics.jsonl``: one JSON object per finished epoch (a torn last line, left by a crash in the middle of a
  write, is skipped by every reader);
- ``final_metrics.json``: ``{"best": {...}, "last": {...}, "best_epoch": n}``, the attack suite on the best-PGD
  and the last checkpoint; it exists exactly when the run finished;
- ``best.pt`` and ``last.pt``: student checkpoints; ``checkpoint/state.pt``: the full training state to resume,
  and ``state.previous.pt``: the one before it, in case the newest is torn by a crash;
- ``run.json``: facts for the tracking store (the MLflow run id and URI), so a resumed run continues its run;
- ``placement.jsonl``: where the run ran on Ray, one line per start or restart: the Ray node id of each rank.

A **sweep or ablation folder** holds ``config.yaml``, ``run.json`` (the MLflow parent run and the kind),
``trials/<trial id>/`` run folders and the result tables.

The status of a run is decided in one place, :func:`run_status`, from its last report.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from crdnd_ray.config import RunConfig, load_config

__all__ = [
    "ARTIFACT_FILES",
    "FINAL_MARKER",
    "BEST_CHECKPOINT",
    "CONFIG_FILE",
    "FINAL_FILE",
    "LAST_CHECKPOINT",
    "METRICS_FILE",
    "PLACEMENT_FILE",
    "RUN_INFO_FILE",
    "RunStatus",
    "PREVIOUS_STATE_FILE",
    "STATE_DIR",
    "STATE_FILE",
    "add_placement",
    "flatten_final",
    "is_final",
    "last_report",
    "read_config",
    "read_final",
    "read_metrics",
    "read_placements",
    "read_run_info",
    "read_state",
    "run_status",
    "update_run_info",
    "write_config",
    "write_final",
    "write_metrics",
    "write_state",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
FINAL_FILE = "final_metrics.json"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
STATE_DIR = "checkpoint"
STATE_FILE = "state.pt"
PREVIOUS_STATE_FILE = "state.previous.pt"
RUN_INFO_FILE = "run.json"
PLACEMENT_FILE = "placement.jsonl"
ARTIFACT_FILES = (CONFIG_FILE, BEST_CHECKPOINT, FINAL_FILE, METRICS_FILE)
"""The files of a run folder that are uploaded to the tracking store when the run ends (when present)."""

RunStatus = Literal["running", "finished", "stopped_early", "failed", "killed"]
FINAL_MARKER = "best_epoch"
"""The key that only a run's last report carries: its final metrics arrived."""


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def write_config(folder: Path, cfg: RunConfig) -> Path:
    """Write the fully resolved ``cfg`` as ``config.yaml`` (unset values left out)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_FILE
    _write_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path


def read_config(folder: Path) -> RunConfig:
    """The config a run folder was written with (ConfigError when it is missing or invalid)."""
    return load_config(Path(folder) / CONFIG_FILE)


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The per-epoch rows of ``metrics.jsonl``; lines that do not parse (a torn last line) are skipped."""
    return _read_jsonl(Path(folder) / METRICS_FILE)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file with one per line, skipping lines that do not parse (a torn last line)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` with ``history`` atomically (a reader never sees half a file)."""
    _write_atomic(Path(folder) / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in history))


def write_final(folder: Path, best: dict[str, float], last: dict[str, float], best_epoch: int) -> dict[str, Any]:
    """Write ``final_metrics.json`` and return its flat form (see :func:`flatten_final`)."""
    final = {"best": best, "last": last, FINAL_MARKER: best_epoch}
    _write_atomic(Path(folder) / FINAL_FILE, json.dumps(final, indent=2))
    return flatten_final(final)


def read_final(folder: Path) -> dict[str, Any] | None:
    """The flat final metrics of a finished run, or None when it has not finished."""
    path = Path(folder) / FINAL_FILE
    if not path.is_file():
        return None
    try:
        return flatten_final(json.loads(path.read_text()))
    except (json.JSONDecodeError, AttributeError):
        return None


def flatten_final(final: dict[str, Any]) -> dict[str, Any]:
    """``{"best": {"pgd20_acc": 50}, ..., "best_epoch": 3}`` → ``{"best_pgd20_acc": 50, ..., "best_epoch": 3}``."""
    flat: dict[str, Any] = {}
    for key, value in final.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{name}": number for name, number in value.items()})
        else:
            flat[key] = value
    return flat


def last_report(folder: Path) -> dict[str, Any] | None:
    """What the run reported last, rebuilt from its folder: the last epoch row plus the final metrics."""
    history = read_metrics(folder)
    final = read_final(folder)
    if not history and final is None:
        return None
    return {**(history[-1] if history else {}), **(final or {})}


def is_final(report: dict[str, Any] | None) -> bool:
    """Whether ``report`` carries the run's final metrics (only the last report of a finished run does)."""
    return bool(report) and FINAL_MARKER in report


def run_status(report: dict[str, Any] | None, *, ended: bool, error: str | None = None,
               interrupted: bool = False) -> tuple[RunStatus, str]:
    """The one status rule: ``(status, reason)`` of a run from its last report.

    ``failed`` when it ended with ``error``; ``finished`` when its final metrics arrived; ``killed`` when the
    user interrupted it (Ctrl-C, SIGTERM) before that; ``running`` while it goes on; otherwise it
    ``stopped_early`` (a scheduler such as ASHA ended it), and the reason names the last epoch it completed.
    """
    if error is not None:
        return "failed", error
    if is_final(report):
        return "finished", ""
    epoch = (report or {}).get("epoch")
    reached = (f"after epoch {int(epoch)}" if isinstance(epoch, (int, float)) and not isinstance(epoch, bool)
               and math.isfinite(epoch) else "before its first epoch ended")
    if interrupted:
        return "killed", f"Interrupted {reached}; --resume continues it from its last checkpoint."
    if not ended:
        return "running", ""
    return "stopped_early", f"The scheduler stopped the run {reached}."


def read_run_info(folder: Path) -> dict[str, Any]:
    """The facts of ``run.json`` (empty when the folder has none)."""
    path = Path(folder) / RUN_INFO_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def update_run_info(folder: Path, **facts: Any) -> dict[str, Any]:
    """Merge ``facts`` into ``run.json`` and return the result."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = {**read_run_info(folder), **facts}
    _write_atomic(folder / RUN_INFO_FILE, json.dumps(info, indent=2))
    return info


def write_state(folder: Path, state: dict[str, Any]) -> Path:
    """Write the full training state as ``checkpoint/state.pt`` (atomically) and return ``checkpoint/``.

    The state it replaces is kept as ``state.previous.pt`` in the run folder, outside ``checkpoint/`` (which
    Ray copies to its storage each epoch), so a torn newest state never loses the run.
    """
    import torch

    directory = Path(folder) / STATE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    current = directory / STATE_FILE
    temporary = directory / (STATE_FILE + ".tmp")
    torch.save(state, temporary)
    if current.exists():
        os.replace(current, Path(folder) / PREVIOUS_STATE_FILE)
    temporary.replace(current)
    return directory


def read_state(checkpoint_dir: Path, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The training state to resume from: ``checkpoint_dir/state.pt``, or the previous state of its run folder
    when the newest cannot be read (``progress`` says so). CheckpointError when neither can."""
    import torch

    from crdnd_ray.checkpoints import CheckpointError

    checkpoint_dir = Path(checkpoint_dir)
    problems = []
    for path in (checkpoint_dir / STATE_FILE, checkpoint_dir.parent / PREVIOUS_STATE_FILE):
        if not path.is_file():
            problems.append(f"'{path}' does not exist")
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a torn file raises several types
            problems.append(f"'{path}' is unreadable ({type(error).__name__})")
            continue
        if problems and progress:
            progress(f"{problems[0]}; resuming from the previous state instead (epoch {state['epoch']})")
        return state
    raise CheckpointError(
        f"No training state to resume from: {'; '.join(problems)}. Start the run again without --resume, in a "
        "new output folder."
    )


def add_placement(folder: Path, node_ids: list[str]) -> None:
    """Append one start of the run to ``placement.jsonl``: the time and the Ray node id of each rank, in rank
    order (written by rank 0, which gathers the others' over the process group)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / PLACEMENT_FILE, "a") as handle:
        handle.write(json.dumps({"started_at": time.time(), "nodes": list(node_ids)}) + "\n")


def read_placements(folder: Path) -> list[dict[str, Any]]:
    """Every start of the run in ``placement.jsonl``, oldest first (``started_at``, ``nodes`` by rank)."""
    return _read_jsonl(Path(folder) / PLACEMENT_FILE)
