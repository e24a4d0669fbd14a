"""MLflow tracking: the store and its :class:`Recorder`, one run's :class:`RunRecord`, the server and UI."""

from crdnd_ray.tracking.record import RunRecord
from crdnd_ray.tracking.server import serve_ui, start_server, stop_server
from crdnd_ray.tracking.store import Recorder, common_tags, download_artifact
from crdnd_ray.tracking.uris import DEFAULT_TRACKING_URI, default_artifact_location, normalize_tracking_uri, sqlite_path

__all__ = ["DEFAULT_TRACKING_URI", "Recorder", "RunRecord", "common_tags", "default_artifact_location",
           "download_artifact", "normalize_tracking_uri", "serve_ui", "sqlite_path", "start_server", "stop_server"]
