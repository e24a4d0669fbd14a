"""The MLflow tracking store's writes: safe calls (retries, locks, outages) and the :class:`Recorder` that
creates experiments and runs and writes params, metrics, tags and artifacts. Where the store is, and whether
it answers, is :mod:`crdnd_ray.tracking.uris`.

Every write goes through an explicit ``mlflow.MlflowClient`` bound to one tracking URI, so several recorders
(two stores in one test) can coexist without MLflow's global "active run" state.

Importing this module imports neither MLflow nor Ray.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from crdnd_ray.tracking.links import (EXPERIMENT_DESCRIPTION, MLFLOW_STATUS, NOTE_TAG, RUN_COLOR_TAG,
                                      run_color_tags)
from crdnd_ray.tracking.uris import (DEFAULT_TRACKING_URI, TrackingUnavailable, check_server,
                                     default_artifact_location, is_server, normalize_tracking_uri, sqlite_path)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from crdnd_ray.config import TrackingConfig

__all__ = ["OUTAGE_COOLDOWN_S", "Recorder", "common_tags", "download_artifact", "latest_parent", "retry"]

logger = logging.getLogger(__name__)

for _name, _value in (("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                      ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")):
    os.environ.setdefault(_name, _value)

OUTAGE_COOLDOWN_S = 30.0
"""After a store stopped answering, calls fail at once for this long before one is tried again."""

_down_until: dict[str, float] = {}
"""Tracking URIs that stopped answering, and until when calls to them fail at once."""


_BATCH_PARAMS_TAGS = 100
_BATCH_METRICS = 1000
_PARAM_VALUE_LIMIT = 6000
_TAG_VALUE_LIMIT = 8000
_RETRIES = 8


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else "unknown"


@functools.lru_cache(maxsize=1)
def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a tag must never break recording
        pass
    return "cpu"


def common_tags() -> dict[str, str]:
    """Tags every run carries: the project's git commit (``unknown`` outside a repository), host and device."""
    return {"git_commit": _git_commit(), "host": platform.node() or "unknown", "device": _device()}


def _stringify(value: Any, limit: int) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple, dict)):
        try:
            text = json.dumps(value, default=str)
        except (TypeError, ValueError):
            text = str(value)
    else:
        text = str(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    kept: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                import numpy as np

                if not isinstance(value, np.number) or isinstance(value, np.bool_):
                    continue
            except ImportError:
                continue
        number = float(value)
        if math.isfinite(number):
            kept[str(key)] = number
    return kept


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def retry(call: Callable[[], Any]) -> Any:
    """Run an MLflow call, retrying with backoff while SQLite reports that the database is locked."""
    delay = 0.05
    for attempt in range(_RETRIES):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - MLflow wraps SQLAlchemy errors in several types
            text = str(error).lower()
            transient = "database is locked" in text or "database table is locked" in text
            if not transient or attempt == _RETRIES - 1:
                raise
            logger.debug("The tracking store is locked; retrying in %.2f s.", delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _folder_lock(folder: Path | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on a folder (POSIX), so that processes opening a fresh SQLite store one
    after the other do not run MLflow's schema migrations at the same time. A no-op where unsupported."""
    if folder is None:
        yield
        return
    try:
        import fcntl

        descriptor = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def _is_outage(error: BaseException) -> bool:
    """Whether ``error`` means the store is unreachable (rather than a bad request)."""
    text = f"{type(error).__name__}: {error}".lower()
    return any(word in text for word in ("connection", "max retries", "timed out", "timeout",
                                         "unable to open database", "temporarily unavailable", "name or service"))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Recorder:
    """Writes runs of one experiment into one MLflow tracking store.

    Built from the config's ``tracking`` section and the experiment name; the experiment is fetched or
    created (race-safe) once, with the artifact location of :func:`default_artifact_location`.
    """

    def __init__(self, tracking: TrackingConfig | None = None, experiment: str = "crdnd-digits") -> None:
        from mlflow import MlflowClient

        uri = tracking.uri if tracking is not None else DEFAULT_TRACKING_URI
        configured = tracking.artifact_location if tracking is not None else None
        self.tracking_uri: str = normalize_tracking_uri(uri)
        self.experiment_name: str = experiment
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        if is_server(self.tracking_uri):
            check_server(self.tracking_uri)
        with _folder_lock(db.parent if db is not None else None):
            self.client: MlflowClient = MlflowClient(tracking_uri=self.tracking_uri)
            self.experiment_id: str = self._get_or_create_experiment(configured)
        experiment_obj = self.call(lambda: self.client.get_experiment(self.experiment_id))
        self.artifact_location: str = experiment_obj.artifact_location
        if NOTE_TAG not in experiment_obj.tags:
            self.set_experiment_tag(NOTE_TAG, EXPERIMENT_DESCRIPTION)

    def call(self, action: Callable[[], Any]) -> Any:
        """Run one MLflow call; raise TrackingUnavailable at once while the store is known to be down.

        A call that finds the store unreachable starts an outage: one warning line, then every call fails
        at once for :data:`OUTAGE_COOLDOWN_S` seconds, so training never waits on the store. The first call
        that succeeds afterwards ends it (one line). Records missed meanwhile stay in the run folders.
        """
        uri = self.tracking_uri
        if time.monotonic() < _down_until.get(uri, 0.0):
            raise TrackingUnavailable(f"The tracking store {uri} is not answering (retried every "
                                      f"{OUTAGE_COOLDOWN_S:.0f} s).")
        try:
            result = retry(action)
        except Exception as error:  # noqa: BLE001 - MLflow wraps network errors in several types
            if not _is_outage(error):
                raise
            if uri not in _down_until:
                _say(f"warning: the tracking store {uri} does not answer ({type(error).__name__}); training goes on, "
                     "its records stay in the run folders and are sent when it is back (or with "
                     "'crdnd-ray sync FOLDER').")
            _down_until[uri] = time.monotonic() + OUTAGE_COOLDOWN_S
            raise TrackingUnavailable(f"The tracking store {uri} does not answer: {error}") from None
        if _down_until.pop(uri, None) is not None:
            _say(f"the tracking store {uri} answers again; the missed records are being sent.")
        return result

    def _get_or_create_experiment(self, configured: str | None) -> str:
        from mlflow.exceptions import MlflowException

        name = self.experiment_name
        for _ in range(_RETRIES):
            existing = self.call(lambda: self.client.get_experiment_by_name(name))
            if existing is not None:
                if existing.lifecycle_stage != "active":
                    raise ValueError(
                        f"The MLflow experiment '{name}' in {self.tracking_uri} was deleted. Restore it with "
                        f"'mlflow experiments restore --experiment-id {existing.experiment_id}' (with "
                        "MLFLOW_TRACKING_URI set to the same store) or choose another experiment.name."
                    )
                return existing.experiment_id
            location = default_artifact_location(self.tracking_uri, name, configured)
            try:
                return self.call(lambda: self.client.create_experiment(name, artifact_location=location))
            except MlflowException as error:
                text = str(error).lower()
                if "already exists" not in text and "unique constraint" not in text:
                    raise
                time.sleep(0.05)
        raise RuntimeError(f"Could not get or create the MLflow experiment '{name}' in {self.tracking_uri}.")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("client", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from mlflow import MlflowClient

        self.__dict__.update(state)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)

    def common_tags(self) -> dict[str, str]:
        """The git commit, host and device tags (see :func:`common_tags`)."""
        return common_tags()

    def _create(self, name: str, tags: dict[str, Any]) -> str:
        all_tags = {**self.common_tags(), **{str(k): v for k, v in tags.items() if v is not None},
                    "status": "running"}
        all_tags = {key: _stringify(value, _TAG_VALUE_LIMIT) for key, value in all_tags.items()}
        run = self.call(lambda: self.client.create_run(self.experiment_id, tags=all_tags, run_name=name))
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params (values stringified and truncated to MLflow's limit) in batches of 100."""
        from mlflow.entities import Param

        entries = [Param(str(key), _stringify(value, _PARAM_VALUE_LIMIT)) for key, value in params.items()]
        for chunk in _chunks(entries, _BATCH_PARAMS_TAGS):
            self.call(lambda chunk=chunk: self.client.log_batch(run_id, params=chunk))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set several tags at once (values stringified and truncated)."""
        from mlflow.entities import RunTag

        entries = [RunTag(str(k), _stringify(v, _TAG_VALUE_LIMIT)) for k, v in tags.items() if v is not None]
        for chunk in _chunks(entries, _BATCH_PARAMS_TAGS):
            self.call(lambda chunk=chunk: self.client.log_batch(run_id, tags=chunk))

    def start_parent(self, kind: str, name: str, params: dict[str, Any], tags: dict[str, Any]) -> str:
        """Create the parent run of a ``sweep`` or ``ablation`` (tag ``run_kind``) and return its id."""
        run_id = self._create(name, {**tags, "run_kind": kind})
        self.log_params(run_id, params)
        return run_id

    def start_run(self, name: str, params: dict[str, Any], tags: dict[str, Any], parent_run_id: str | None = None,
                  sampled: dict[str, Any] | None = None) -> str:
        """Create a run (a child of ``parent_run_id`` when given) with flat dotted ``params``.

        Each ``sampled`` (searched) parameter is logged twice: under its own key and as ``sampled.<key>``.
        """
        run_tags = dict(tags)
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run_tags.setdefault("run_kind", "trial" if parent_run_id else "train")
        run_id = self._create(name, run_tags)
        sampled = sampled or {}
        self.log_params(run_id, {**params, **sampled, **{f"sampled.{k}": v for k, v in sampled.items()}})
        return run_id

    def log_epoch(self, run_id: str, metrics: dict[str, Any], step: int) -> None:
        """Log one epoch's numeric, finite metrics at ``step`` in one batch call."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        entries = [Metric(key, value, stamp, int(step)) for key, value in _numeric(metrics).items()]
        for chunk in _chunks(entries, _BATCH_METRICS):
            self.call(lambda chunk=chunk: self.client.log_batch(run_id, metrics=chunk))

    def log_metrics(self, run_id: str, metrics: dict[str, Any]) -> None:
        """Log final metrics (step 0); non-numeric and non-finite values are skipped."""
        self.log_epoch(run_id, metrics, step=0)

    def finish(self, run_id: str, status: str, reason: str | None = None) -> None:
        """End a run: tags ``status`` (and ``status_reason``) and its MLflow status (:data:`links.MLFLOW_STATUS`:
        a run stopped early is KILLED, not a green FINISHED, and greyed out by its run colour)."""
        if status not in MLFLOW_STATUS:
            raise ValueError(f"The run status '{status}' is not one of {', '.join(MLFLOW_STATUS)}.")
        colors = run_color_tags(status)
        tags = self.call(lambda: self.client.get_run(run_id)).data.tags
        for stale in ("status_reason" if not reason else None, RUN_COLOR_TAG if not colors else None):
            if stale in tags:
                self.call(lambda stale=stale: self.client.delete_tag(run_id, stale))
        self.set_tags(run_id, {"status": status, "status_reason": reason or None, **colors})
        self.call(lambda: self.client.set_terminated(run_id, status=MLFLOW_STATUS[status]))

    def set_experiment_tag(self, key: str, value: str) -> None:
        """Set one tag of this recorder's experiment (a saved UI view, the description)."""
        self.call(lambda: self.client.set_experiment_tag(self.experiment_id, key, value))

    def log_artifacts(self, run_id: str, paths: Iterable[Path | str], artifact_path: str | None = None) -> list[str]:
        """Upload files (or folders); missing paths are skipped. Returns the names uploaded."""
        logged = []
        for item in paths:
            path = Path(item)
            if path.is_file():
                self.call(lambda path=path: self.client.log_artifact(run_id, str(path), artifact_path))
            elif path.is_dir():
                target = f"{artifact_path}/{path.name}" if artifact_path else path.name
                self.call(lambda path=path, target=target: self.client.log_artifacts(run_id, str(path), target))
            else:
                continue
            logged.append(path.name)
        return logged

    def find_child(self, parent_run_id: str, trial_id: str) -> str | None:
        """The id of an existing child run of ``parent_run_id`` tagged with ``trial_id``, if any."""
        query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.trial_id = '{trial_id}'"
        runs = self.call(lambda: self.client.search_runs([self.experiment_id], filter_string=query, max_results=1))
        return runs[0].info.run_id if runs else None


def download_artifact(tracking: TrackingConfig, run_id: str, artifact: str) -> Path:
    """Download one artifact of ``run_id`` into a temporary folder and return its local path."""
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=normalize_tracking_uri(tracking.uri))
    return Path(client.download_artifacts(run_id, artifact, tempfile.mkdtemp(prefix="crdnd-ray-artifact-")))


def latest_parent(client: MlflowClient, experiment_ids: list[str]) -> Any | None:
    """The most recently started sweep or ablation parent run of these experiments (an MLflow ``Run``), or None."""
    newest = None
    for kind in ("sweep", "ablation"):
        found = client.search_runs(experiment_ids, filter_string=f"tags.run_kind = '{kind}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found and (newest is None or found[0].info.start_time > newest.info.start_time):
            newest = found[0]
    return newest
