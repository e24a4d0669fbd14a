"""Making the tracking store agree with the run folders: after an outage, a SIGKILL or an interrupt.

The run folders are the record of truth (``runs.py``): every epoch, the final metrics, and the status that
was decided (``run.json``). :func:`sync_trials` brings a sweep's or ablation's child runs in line with its
result rows (creating a missing run, sending missed epochs, ending a run left RUNNING) and runs at the end
of every sweep, ablation and ``--resume``; :func:`sync_folder` does the same for any output folder, which
is ``crdnd-ray sync FOLDER``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from crdnd_ray import runs
from crdnd_ray.config import TrackingConfig, flatten
from crdnd_ray.tracking.record import RunRecord
from crdnd_ray.tracking.store import Recorder

__all__ = ["RESULT_TABLES", "sync_folder", "sync_trials"]

RESULT_TABLES = {"sweep": "results.csv", "ablation": "cells.csv"}
"""The table of a sweep's or an ablation's folder that holds one row per trial."""

UNFINISHED = ("running", "pending")
RESULT_SUFFIXES = (".csv", ".parquet", ".md", ".png", ".yaml")
"""The files at the top of a sweep's or ablation's folder that its parent run holds (tables, plots, best.yaml)."""


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _agrees(recorder: Recorder, run_id: str, row: dict[str, Any], folder: Path) -> bool:
    """Whether the store already shows the trial as its row and folder say (ended, same status, nothing missed)."""
    if runs.read_run_info(folder).get("tracking_behind"):
        return False
    run = recorder.call(lambda: recorder.client.get_run(run_id))
    return run.info.status != "RUNNING" and run.data.tags.get("status") == row["status"]


def sync_trials(recorder: Recorder, parent_run_id: str, folder: Path, rows: list[dict[str, Any]],
                base_params: dict[str, Any], kind: str, records: dict[str, RunRecord] | None = None) -> int:
    """End every trial's child run as its row says; return how many runs were repaired.

    ``rows`` are the driver's result rows (``trial_id``, ``trial``, ``status``, ``reason``, ``param.*`` and
    the spec's tags). A trial still ``running`` or ``pending`` in its row was interrupted: its run is ended
    as killed. A trial that never started and has no run is left out; a child run left RUNNING by a trial
    that the rows do not know (the driver was killed before Ray Tune saved it) is ended as killed. Raises
    TrackingUnavailable when the store does not answer.
    """
    repaired = 0
    for row in rows:
        trial_id = row["trial_id"]
        trial_folder = Path(folder) / "trials" / trial_id
        record = (records or {}).get(trial_id)
        if record is None:
            run_id = recorder.find_child(parent_run_id, trial_id)
            if run_id is None and row["status"] == "pending":
                continue
            if run_id is not None and _agrees(recorder, run_id, row, trial_folder):
                continue
            if run_id is None:
                sampled = {key[len("param."):]: value for key, value in row.items()
                           if key.startswith("param.") and _present(value)}
                params = {**base_params, **sampled}
                tags = {"trial_id": trial_id, f"{kind}_id": parent_run_id, "kind": kind,
                        "method": str(params.get("method.name")), "seed": str(params.get("experiment.seed")),
                        **{key: row[key] for key in ("variant", "stage", "seed") if _present(row.get(key))}}
                record = RunRecord.start(recorder, str(row["trial"]), params, tags, trial_folder,
                                         parent_run_id=parent_run_id, sampled=sampled)
            else:
                record = RunRecord(recorder, run_id, trial_folder)
        elif _agrees(recorder, record.run_id, row, trial_folder):
            continue
        record.finish(error=str(row["reason"]) if row["status"] == "failed" else None,
                      interrupted=row["status"] in UNFINISHED or row["status"] == "killed")
        repaired += 1
    known = {row["trial_id"] for row in rows}
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    for run in recorder.call(lambda: recorder.client.search_runs([recorder.experiment_id], filter_string=query)):
        trial_id = run.data.tags.get("trial_id")
        if trial_id not in known:
            RunRecord(recorder, run.info.run_id, Path(folder) / "trials" / str(trial_id)).finish(interrupted=True)
            repaired += 1
    return repaired


def _parent(recorder: Recorder, folder: Path, kind: str, params: dict[str, Any]) -> str:
    """The parent run named in ``run.json``, or a new one when the store lacks it."""
    known = runs.read_run_info(folder).get("mlflow_run_id")
    if known and recorder.call(lambda: recorder.client.search_runs(
            [recorder.experiment_id], filter_string=f"attributes.run_id = '{known}'", max_results=1)):
        return known
    parent = recorder.start_parent(kind, f"{kind}-{folder.name}", params, {"output_dir": str(folder)})
    runs.update_run_info(folder, mlflow_run_id=parent, tracking_uri=recorder.tracking_uri)
    return parent


def sync_folder(folder: Path, tracking: TrackingConfig | None = None) -> tuple[str, int]:
    """Make the store agree with an output folder (a ``train`` run, a sweep or an ablation).

    ``tracking`` overrides the folder's ``tracking`` section (to send a run recorded without tracking, or to
    another store). Returns the kind of folder and how many runs were repaired.
    """
    import pandas as pd

    folder = Path(folder).resolve()
    cfg = runs.read_config(folder)
    tracking = tracking or cfg.tracking
    recorder = Recorder(tracking, cfg.experiment.name)
    info = runs.read_run_info(folder)
    kind = info.get("kind", "train")
    if kind == "train":
        known = info.get("mlflow_run_id")
        exists = known and recorder.call(lambda: recorder.client.search_runs(
            [recorder.experiment_id], filter_string=f"attributes.run_id = '{known}'", max_results=1))
        record = (RunRecord(recorder, known, folder) if exists else
                  RunRecord.start(recorder, f"train-{folder.name}", flatten(cfg.run_dict()),
                                  {"method": cfg.method.name, "seed": cfg.experiment.seed,
                                   "output_dir": str(folder)}, folder))
        status = info.get("status")
        record.finish(error=info.get("reason") if status == "failed" else None,
                      interrupted=status in ("killed", *UNFINISHED) or status is None)
        return kind, 1
    table = folder / RESULT_TABLES[kind]
    rows = pd.read_csv(table).to_dict("records") if table.is_file() else []
    parent = _parent(recorder, folder, kind, flatten(cfg.run_dict()))
    repaired = sync_trials(recorder, parent, folder, rows, flatten(cfg.run_dict()), kind)
    if not recorder.call(lambda: recorder.client.list_artifacts(parent)):
        recorder.log_artifacts(parent, sorted(path for path in folder.iterdir() if path.is_file()
                                              and path.suffix in RESULT_SUFFIXES and path.name != runs.CONFIG_FILE))
    done = rows and all(row["status"] not in UNFINISHED for row in rows)
    recorder.finish(parent, "finished" if done else "killed",
                    None if done else f"Interrupted; continue with crdnd-ray {kind} --resume {folder}")
    return kind, repaired
