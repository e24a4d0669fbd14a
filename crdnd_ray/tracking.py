"""MLflow recording: experiments, parent and child runs, per-epoch metrics, artifacts, and the UI server.

This is the one module that talks to MLflow for writing. Every write goes through an explicit
``mlflow.MlflowClient`` bound to one tracking URI, so several :class:`Recorder` objects (for example two
stores in one test) can coexist without MLflow's global "active run" state.

Where things go:

- ``tracking.uri`` is ``sqlite:///mlflow.db`` by default (a file in the working directory; the URI is made
  absolute when the recorder is created) or an ``http(s)://`` ``mlflow server``.
- Artifacts of an experiment this module creates go to ``tracking.artifact_location`` when it is set;
  otherwise, for a SQLite store, to ``mlartifacts/<experiment>`` next to the database file; for a tracking
  server, to the server's default (its proxied ``mlflow-artifacts:/`` store). Nothing is written to
  ``./mlruns``.

What a run holds: params (the resolved config flattened to dotted keys, and each searched parameter a second
time under ``sampled.<key>``), per-epoch metrics with ``step=epoch``, the final ``best_*``/``last_*``
metrics, tags (``status``, ``status_reason``, ``run_kind`` on parents, ``trial_id`` on trials, the git commit,
host and device) and artifacts (resolved ``config.yaml``, ``best.pt``, ``final_metrics.json``,
``metrics.jsonl`` and ``learning_curve.png``).

Exactly one process writes during a sweep or an ablation: the Tune driver, through :class:`TrialRecorder`
(a ``ray.tune.Callback``). ``TrialRecorder`` is built on first access so that importing this module does not
import Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from crdnd_ray.config import TrackingConfig

__all__ = [
    "DEFAULT_TRACKING_URI",
    "RUN_FOLDER_FILES",
    "Recorder",
    "RunStatus",
    "TrialInfo",
    "TrialRecorder",
    "common_tags",
    "default_artifact_location",
    "download_artifact",
    "final_metrics_flat",
    "log_finished_run",
    "normalize_tracking_uri",
    "read_history",
    "serve_ui",
    "sqlite_path",
    "start_server",
    "stop_server",
]

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""The embedded default store: a SQLite file in the working directory."""

RUN_FOLDER_FILES = ("config.yaml", "best.pt", "final_metrics.json", "metrics.jsonl")
"""Files of a run's output folder that :meth:`Recorder.log_run_folder` uploads (when present)."""

LEARNING_CURVE = "learning_curve.png"

RunStatus = Literal["finished", "stopped_early", "failed"]

_MLFLOW_STATUS = {"finished": "FINISHED", "stopped_early": "FINISHED", "failed": "FAILED"}
_BATCH_PARAMS_TAGS = 100
_BATCH_METRICS = 1000
_PARAM_VALUE_LIMIT = 6000
_TAG_VALUE_LIMIT = 8000
_RETRIES = 8
_TUNE_AUTO_KEYS = frozenset({
    "training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore", "timesteps_total",
    "timesteps_since_restore", "iterations_since_restore", "episodes_total", "timestamp", "pid", "node_ip",
    "hostname", "date", "config", "done", "trial_id", "experiment_tag", "experiment_id", "checkpoint_dir_name",
    "should_checkpoint", "warmup_time",
})


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, resolved against the working directory; None otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///"):].split("?", 1)[0]
    if not raw or raw == ":memory:":
        return None
    return Path(raw).expanduser().resolve()


def normalize_tracking_uri(uri: str | None) -> str:
    """The tracking URI with a SQLite file made absolute (so it means the same file in every process)."""
    uri = (uri or DEFAULT_TRACKING_URI).strip()
    path = sqlite_path(uri)
    if path is None:
        if "://" not in uri and not uri.startswith("sqlite:"):
            raise ValueError(
                f"The tracking URI '{uri}' is neither a database URI nor a server address. Use "
                "'sqlite:///mlflow.db' (a local file) or 'http://host:port' (an mlflow server)."
            )
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else ""
    return f"sqlite:///{path.as_posix()}" + (f"?{query}" if query else "")


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def default_artifact_location(tracking_uri: str, experiment: str, configured: str | None = None) -> str | None:
    """The artifact location to give a new experiment.

    ``configured`` (``tracking.artifact_location``) wins; a local path becomes an absolute ``file://`` URI.
    A SQLite store keeps artifacts in ``mlartifacts/<experiment>`` next to its database file. For a tracking
    server (or any other store) None is returned, so the server's default (proxied) store is used.
    """
    if configured:
        if "://" in configured or configured.startswith(("mlflow-artifacts:", "s3:", "gs:")):
            return configured
        return Path(configured).expanduser().resolve().as_uri()
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in experiment) or "experiment"
    return (db.parent / "mlartifacts" / safe).as_uri()


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


def final_metrics_flat(final: dict[str, Any]) -> dict[str, float]:
    """Flatten ``final_metrics.json`` (``{"best": {...}, "last": {...}, "best_epoch": n}``) to ``best_*``/``last_*``."""
    flat: dict[str, Any] = {}
    for key, value in final.items():
        if isinstance(value, dict):
            for inner, number in value.items():
                flat[f"{key}_{inner}"] = number
        else:
            flat[key] = value
    return _numeric(flat)


def _is_final_key(key: str) -> bool:
    return key.startswith(("best_", "last_"))


def _epoch_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """An epoch row without Tune's bookkeeping, wall-clock stamps (``*_at``) and the final ``best_*``/``last_*``."""
    return {key: value for key, value in row.items()
            if key not in _TUNE_AUTO_KEYS and not key.endswith("_at") and not _is_final_key(key)}


def _retry(call: Callable[[], Any]) -> Any:
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


def _check_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, with a clear message, when an ``http(s)`` tracking server does not answer ``/health``."""
    from urllib.parse import urlparse

    host = urlparse(uri).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
    try:
        with urllib.request.build_opener(*handlers).open(f"{uri.rstrip('/')}/health", timeout=timeout_s) as answer:
            if answer.status == 200:
                return
            problem = f"HTTP {answer.status}"
    except (urllib.error.URLError, OSError) as error:
        problem = str(getattr(error, "reason", error))
    raise ConnectionError(
        f"The MLflow tracking server at {uri} does not answer ({problem}). Start it (for example "
        "'mlflow server --backend-store-uri postgresql://... --host 0.0.0.0 --port 5000') or set "
        "tracking.uri to 'sqlite:///mlflow.db' to record into a local file."
    )


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
        if _is_server(self.tracking_uri):
            _check_server(self.tracking_uri)
        with _folder_lock(db.parent if db is not None else None):
            self.client: MlflowClient = MlflowClient(tracking_uri=self.tracking_uri)
            self.experiment_id: str = self._get_or_create_experiment(configured)
        experiment_obj = _retry(lambda: self.client.get_experiment(self.experiment_id))
        self.artifact_location: str = experiment_obj.artifact_location

    def _get_or_create_experiment(self, configured: str | None) -> str:
        from mlflow.exceptions import MlflowException

        name = self.experiment_name
        for _ in range(_RETRIES):
            existing = _retry(lambda: self.client.get_experiment_by_name(name))
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
                return _retry(lambda: self.client.create_experiment(name, artifact_location=location))
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
        run = _retry(lambda: self.client.create_run(self.experiment_id, tags=all_tags, run_name=name))
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params (values stringified and truncated to MLflow's limit) in batches of 100."""
        from mlflow.entities import Param

        entries = [Param(str(key), _stringify(value, _PARAM_VALUE_LIMIT)) for key, value in params.items()]
        for chunk in _chunks(entries, _BATCH_PARAMS_TAGS):
            _retry(lambda chunk=chunk: self.client.log_batch(run_id, params=chunk))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set several tags at once (values stringified and truncated)."""
        from mlflow.entities import RunTag

        entries = [RunTag(str(k), _stringify(v, _TAG_VALUE_LIMIT)) for k, v in tags.items() if v is not None]
        for chunk in _chunks(entries, _BATCH_PARAMS_TAGS):
            _retry(lambda chunk=chunk: self.client.log_batch(run_id, tags=chunk))

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
            _retry(lambda chunk=chunk: self.client.log_batch(run_id, metrics=chunk))

    def log_metrics(self, run_id: str, metrics: dict[str, Any]) -> None:
        """Log final metrics (step 0); non-numeric and non-finite values are skipped."""
        self.log_epoch(run_id, metrics, step=0)

    def finish(self, run_id: str, status: RunStatus, reason: str | None = None) -> None:
        """End a run: tags ``status`` (and ``status_reason``) and MLflow status FINISHED or FAILED."""
        if status not in _MLFLOW_STATUS:
            raise ValueError(f"The run status '{status}' is not one of {', '.join(_MLFLOW_STATUS)}.")
        if reason is None and "status_reason" in _retry(lambda: self.client.get_run(run_id)).data.tags:
            _retry(lambda: self.client.delete_tag(run_id, "status_reason"))
        self.set_tags(run_id, {"status": status, "status_reason": reason})
        _retry(lambda: self.client.set_terminated(run_id, status=_MLFLOW_STATUS[status]))

    def log_artifacts(self, run_id: str, paths: Iterable[Path | str], artifact_path: str | None = None) -> list[str]:
        """Upload files (or folders); missing paths are skipped. Returns the names uploaded."""
        logged = []
        for item in paths:
            path = Path(item)
            if path.is_file():
                _retry(lambda path=path: self.client.log_artifact(run_id, str(path), artifact_path))
            elif path.is_dir():
                target = f"{artifact_path}/{path.name}" if artifact_path else path.name
                _retry(lambda path=path, target=target: self.client.log_artifacts(run_id, str(path), target))
            else:
                continue
            logged.append(path.name)
        return logged

    def log_run_folder(self, run_id: str, folder: Path | str) -> list[str]:
        """Upload a training run's files (:data:`RUN_FOLDER_FILES`) and a learning-curve PNG of metrics.jsonl."""
        folder = Path(folder)
        logged = self.log_artifacts(run_id, [folder / name for name in RUN_FOLDER_FILES])
        history = read_history(folder / "metrics.jsonl")
        if history:
            from crdnd_ray.report import learning_curves

            scratch = Path(tempfile.mkdtemp(prefix="crdnd-curve-"))
            try:
                plot = learning_curves(history, scratch / LEARNING_CURVE)
                logged += self.log_artifacts(run_id, [plot])
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return logged

    def find_child(self, parent_run_id: str, trial_id: str) -> str | None:
        """The id of an existing child run of ``parent_run_id`` tagged with ``trial_id``, if any."""
        query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.trial_id = '{trial_id}'"
        runs = _retry(lambda: self.client.search_runs([self.experiment_id], filter_string=query, max_results=1))
        return runs[0].info.run_id if runs else None


def read_history(path: Path) -> list[dict[str, Any]]:
    """The epoch rows of a ``metrics.jsonl`` file (unreadable lines are skipped); [] when missing."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def log_finished_run(recorder: Recorder, cfg_dict: dict[str, Any], folder: Path | str, name: str,
                     tags: dict[str, Any], parent_run_id: str | None = None, sampled: dict[str, Any] | None = None,
                     status: RunStatus | None = None, reason: str | None = None) -> str:
    """Record a whole run after the fact from its output folder and return the MLflow run id.

    Params are the flattened resolved config, per-epoch metrics come from ``metrics.jsonl`` (``step=epoch``),
    final metrics from ``final_metrics.json`` (as ``best_*``/``last_*``), plus the folder's artifacts.
    ``status`` defaults to ``finished`` when ``final_metrics.json`` exists and ``stopped_early`` otherwise.
    """
    from crdnd_ray.config import flatten

    folder = Path(folder)
    run_id = recorder.start_run(name, flatten(cfg_dict), tags, parent_run_id=parent_run_id, sampled=sampled)
    try:
        for position, row in enumerate(read_history(folder / "metrics.jsonl")):
            epoch = row.get("epoch", position)
            recorder.log_epoch(run_id, _epoch_metrics(row), step=int(epoch) if isinstance(epoch, (int, float)) else position)
        final_path = folder / "final_metrics.json"
        final = final_metrics_flat(json.loads(final_path.read_text())) if final_path.is_file() else {}
        if final:
            recorder.log_metrics(run_id, final)
        recorder.log_run_folder(run_id, folder)
    except Exception as error:
        recorder.finish(run_id, "failed", f"Recording the run folder {folder} failed: {error}")
        raise
    if status is None:
        status = "finished" if final else "stopped_early"
    recorder.finish(run_id, status, reason)
    return run_id


def download_artifact(tracking: TrackingConfig, run_id: str, artifact: str) -> Path:
    """Download one artifact of ``run_id`` into a temporary folder and return its local path."""
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=normalize_tracking_uri(tracking.uri))
    return Path(client.download_artifacts(run_id, artifact, tempfile.mkdtemp(prefix="crdnd-ray-artifact-")))


@dataclass
class TrialInfo:
    """What :class:`TrialRecorder` needs to know about a Tune trial to open its MLflow run."""

    name: str
    params: dict[str, Any]
    sampled: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None


def _error_text(trial: Any, max_lines: int = 30) -> str:
    """The trial's error (``trial.error_file``, else ``trial.get_error()``): its last line (the exception),
    then the text shortened to its head and tail."""
    text = ""
    try:
        error_file = trial.error_file
    except Exception:  # noqa: BLE001 - the local staging path needs a running Ray session
        error_file = None
    if error_file and Path(error_file).is_file():
        text = Path(error_file).read_text(errors="replace")
    if not text.strip():
        try:
            got = trial.get_error() if hasattr(trial, "get_error") else None
        except Exception:  # noqa: BLE001 - storage may be gone
            got = None
        text = str(got) if got else ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "The trial failed without an error message."
    summary = lines[-1].strip()
    if len(lines) > max_lines:
        lines = lines[: max_lines - 6] + ["..."] + lines[-5:]
    return summary + "\n\n" + "\n".join(lines)


class _TrialRecorderMixin:
    """The logic of :class:`TrialRecorder`; every hook catches its errors so recording never stops Tune."""

    def __init__(self, recorder: Recorder, parent_run_id: str, describe_trial: Callable[[Any], TrialInfo]) -> None:
        super().__init__()
        self.recorder = recorder
        self.parent_run_id = parent_run_id
        self.describe_trial = describe_trial
        self.runs: dict[str, str] = {}
        self.infos: dict[str, TrialInfo] = {}
        self.final_seen: set[str] = set()
        self.last_epoch: dict[str, int] = {}
        self.logged_steps: dict[str, set[int]] = {}

    def _info(self, trial: Any) -> TrialInfo:
        info = self.infos.get(trial.trial_id)
        if info is None:
            info = self.describe_trial(trial)
            self.infos[trial.trial_id] = info
        return info

    def run_id(self, trial: Any) -> str:
        """The MLflow run of ``trial``: from the mapping, an existing child tagged with its id, or a new one."""
        trial_id = trial.trial_id
        if trial_id in self.runs:
            return self.runs[trial_id]
        info = self._info(trial)
        existing = self.recorder.find_child(self.parent_run_id, trial_id)
        if existing is not None:
            history = _retry(lambda: self.recorder.client.get_metric_history(existing, "epoch"))
            self.logged_steps[trial_id] = {int(point.step) for point in history}
            _retry(lambda: self.recorder.client.update_run(existing, status="RUNNING"))
            self.recorder.set_tags(existing, {"status": "running", "resumed": "true"})
            self.runs[trial_id] = existing
            return existing
        run = self.recorder.start_run(info.name, info.params, {**info.tags, "trial_id": trial_id},
                                      parent_run_id=self.parent_run_id, sampled=info.sampled)
        self.runs[trial_id] = run
        return run

    def _guard(self, what: str, trial: Any, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:  # noqa: BLE001 - a recording problem must not fail the sweep
            logger.exception("MLflow recording of trial %s failed while %s.", getattr(trial, "trial_id", "?"), what)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """Open (or reuse) the trial's child run."""
        self._guard("opening its run", trial, lambda: self.run_id(trial))

    def on_trial_restore(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """Reuse the child run of a restored trial."""
        self._guard("reopening its run", trial, lambda: self.run_id(trial))

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        """Log the epoch's metrics at ``step=result['epoch']``; log ``best_*``/``last_*`` as final metrics.

        An epoch already recorded (a restored trial repeating epochs after its checkpoint) is not logged twice.
        """

        def record() -> None:
            run = self.run_id(trial)
            epoch_rows = _epoch_metrics(result)
            step = result.get("epoch")
            if not isinstance(step, (int, float)) or isinstance(step, bool):
                step = int(result.get("training_iteration", 1)) - 1
            self.last_epoch[trial.trial_id] = int(step)
            logged = self.logged_steps.setdefault(trial.trial_id, set())
            if int(step) not in logged:
                self.recorder.log_epoch(run, epoch_rows, step=int(step))
                logged.add(int(step))
            final = {k: v for k, v in result.items() if _is_final_key(k)}
            if any(k.startswith("best_") for k in final):
                self.recorder.log_metrics(run, final)
                self.final_seen.add(trial.trial_id)

        self._guard("logging a result", trial, record)

    def _has_final(self, trial: Any, run: str) -> bool:
        """Whether final metrics arrived: in a result, already in MLflow (resume), or in final_metrics.json."""
        if trial.trial_id in self.final_seen:
            return True
        metrics = _retry(lambda: self.recorder.client.get_run(run)).data.metrics
        if any(key.startswith("best_") for key in metrics):
            return True
        folder = self._info(trial).output_dir
        final_path = Path(folder) / "final_metrics.json" if folder is not None else None
        if final_path is not None and final_path.is_file():
            final = final_metrics_flat(json.loads(final_path.read_text()))
            if final:
                self.recorder.log_metrics(run, final)
                return True
        return False

    def _upload_folder(self, trial: Any, run: str) -> None:
        folder = self._info(trial).output_dir
        if folder is not None:
            self._guard("uploading its run folder", trial, lambda: self.recorder.log_run_folder(run, folder))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """Upload the run folder; status ``finished`` if final metrics arrived, else ``stopped_early``."""

        def record() -> None:
            run = self.run_id(trial)
            self._upload_folder(trial, run)
            if self._has_final(trial, run):
                self.recorder.finish(run, "finished")
            else:
                epoch = self.last_epoch.get(trial.trial_id)
                where = f" after epoch {epoch}" if epoch is not None else ""
                self.recorder.finish(run, "stopped_early", f"The scheduler stopped the trial{where}.")

        self._guard("finishing its run", trial, record)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """Note a failure that Tune will retry."""
        self._guard("noting a retry", trial, lambda: self.recorder.set_tags(
            self.run_id(trial), {"status": "retrying", "last_failure": _error_text(trial)}))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """Upload what the run folder holds and mark the run FAILED with the trial's error as reason."""

        def record() -> None:
            run = self.run_id(trial)
            self._upload_folder(trial, run)
            self.recorder.finish(run, "failed", _error_text(trial))

        self._guard("marking its run failed", trial, record)


@functools.lru_cache(maxsize=1)
def _trial_recorder_class() -> type:
    from ray.tune import Callback

    class TrialRecorder(_TrialRecorderMixin, Callback):
        """Ray Tune callback that records each trial as a child MLflow run of a sweep or ablation parent.

        It runs in the Tune driver, the only process that writes to the tracking store. A trial restored on
        resume reuses its child run (found by the ``trial_id`` tag under the parent) instead of a duplicate.
        """

    TrialRecorder.__module__ = __name__
    TrialRecorder.__qualname__ = "TrialRecorder"
    return TrialRecorder


def __getattr__(name: str) -> Any:
    if name == "TrialRecorder":
        return _trial_recorder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _free_port_error(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return str(error)
    return None


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def start_server(port: int, host: str = "127.0.0.1", backend_uri: str = DEFAULT_TRACKING_URI,
                 artifacts_dir: Path | str | None = None, log_file: Path | str | None = None,
                 timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` (one worker, no job runner) and wait until ``/health`` answers.

    The server runs under this interpreter (``sys.executable -m mlflow server``) with artifacts proxied to
    ``artifacts_dir`` (default: ``mlartifacts/`` next to a SQLite database). Its output goes to ``log_file``
    when given, else to this process's standard error (standard output stays for the URLs). Returns the process and the server's URL; raises
    RuntimeError (and stops the process) when it does not become healthy within ``timeout_s`` (≤ 60 s).
    """
    backend_uri = normalize_tracking_uri(backend_uri)
    if artifacts_dir is None:
        db = sqlite_path(backend_uri)
        artifacts_dir = (db.parent if db else Path.cwd()) / "mlartifacts"
    artifacts = Path(artifacts_dir).expanduser().resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
               "--artifacts-destination", artifacts.as_uri(), "--host", host, "--port", str(port),
               "--workers", "1"]
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
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") or _is_loopback(host) else shown
    health = f"http://{probe_host}:{port}/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + min(timeout_s, 60.0)
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
        f"The MLflow server on {url} did not become healthy within {min(timeout_s, 60.0):.0f} s "
        f"(exit code {process.returncode}). Check that port {port} is free and the backend store "
        f"{backend_uri} is readable.{tail}"
    )


def stop_server(process: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """Stop a server started by :func:`start_server` (its whole process group) and return its exit code."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                process.kill()
            process.wait(timeout_s)
    return int(process.returncode or 0)


def serve_ui(port: int = 5000, host: str = "127.0.0.1", tracking_uri: str = DEFAULT_TRACKING_URI,
             experiment: str | None = None) -> int:
    """Serve the MLflow UI for a tracking store, print its URL, and block until Ctrl-C; returns the exit code.

    A loopback bind is the default; any other host prints a warning because the UI has no authentication.
    When ``tracking_uri`` already is an ``http(s)`` server, nothing is started: its URL is printed.
    """
    if _is_server(tracking_uri):
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
    if not _is_loopback(host):
        print(f"Warning: binding the MLflow UI to {host} exposes every run and artifact, without "
              "authentication, to anyone who can reach this machine. Use --host 127.0.0.1 (and an SSH tunnel) "
              "unless you mean it.", file=sys.stderr)
    problem = _free_port_error("0.0.0.0" if host in ("", "0.0.0.0") else host, port)
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
