"""Where the MLflow tracking store is and whether it answers: URIs, artifact locations, reachability checks.

- ``tracking.uri`` is ``sqlite:///mlflow.db`` by default (made absolute, so it means the same file in every
  process) or an ``http(s)://`` ``mlflow server``.
- Artifacts of an experiment created here go to ``tracking.artifact_location`` when it is set; otherwise, for
  a SQLite store, to ``mlartifacts/<experiment>`` next to the database file; for a server, to its proxied
  ``mlflow-artifacts:/`` store. Nothing is written to ``./mlruns``.

Importing this module imports neither MLflow nor Ray.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crdnd_ray.config import TrackingConfig

__all__ = ["DEFAULT_TRACKING_URI", "TrackingUnavailable", "check_server", "check_store", "default_artifact_location",
           "is_loopback", "is_server", "normalize_tracking_uri", "sqlite_path"]


class TrackingUnavailable(Exception):
    """The tracking store does not answer; the message names it and says how to fix or continue."""


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""The embedded default store: a SQLite file in the working directory."""


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


def is_server(uri: str) -> bool:
    """Whether ``uri`` names an ``mlflow server`` (HTTP) rather than a database."""
    return uri.startswith(("http://", "https://"))


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine's loopback interface."""
    return host in ("localhost", "::1") or host.startswith("127.")


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


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a clear message, when an ``http(s)`` tracking server does not answer ``/health``."""
    from urllib.parse import urlparse

    host = urlparse(uri).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if is_loopback(host) else []
    try:
        with urllib.request.build_opener(*handlers).open(f"{uri.rstrip('/')}/health", timeout=timeout_s) as answer:
            if answer.status == 200:
                return
            problem = f"HTTP {answer.status}"
    except (urllib.error.URLError, OSError) as error:
        problem = str(getattr(error, "reason", error))
    raise TrackingUnavailable(
        f"The MLflow tracking server at {uri} does not answer ({problem}). Start it (for example "
        "'crdnd-ray server FOLDER' or 'mlflow server --backend-store-uri postgresql://... --port 5000'), or set "
        "tracking.uri to 'sqlite:///mlflow.db' to record into a local file, or tracking.enabled: false."
    )


def check_store(tracking: TrackingConfig) -> None:
    """Refuse (TrackingUnavailable) a tracking store that cannot be reached or written, before any work."""
    uri = normalize_tracking_uri(tracking.uri)
    if is_server(uri):
        check_server(uri)
        return
    db = sqlite_path(uri)
    if db is None:
        return
    existing = db if db.exists() else db.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise TrackingUnavailable(
            f"The tracking store {uri} cannot be written ('{existing}' is not writable). Point tracking.uri at a "
            "writable place (e.g. --set tracking.uri=sqlite:///mlflow.db in a folder of yours), or set "
            "tracking.enabled: false."
        )
