"""The libraries' own log lines (Ray, Optuna, MLflow, Alembic) go to the run's log file, not the terminal.

The terminal shows crdnd-ray's progress and one line per problem; the full story, tracebacks of failed
trials included, is in ``<output folder>/crdnd-ray.log``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["LIBRARY_LOGGERS", "LOG_FILE", "route_library_logs"]

LOG_FILE = "crdnd-ray.log"
LIBRARY_LOGGERS = ("ray", "optuna", "mlflow", "alembic", "urllib3", "filelock", "matplotlib", "py.warnings")
"""The loggers whose records belong in the log file."""

_HANDLERS: dict[Path, logging.FileHandler] = {}


def route_library_logs(folder: Path) -> Path:
    """Send the records of :data:`LIBRARY_LOGGERS` (INFO and up) to ``folder/crdnd-ray.log``; return its path.

    Their own console handlers are removed (Optuna's default handler too), and MLflow is told not to install
    its own when it is imported later (``MLFLOW_CONFIGURE_LOGGING``). Calling it again, as after ``ray.init``
    (which sets up Ray's handlers anew), only removes what came back.
    """
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
    path = (Path(folder) / LOG_FILE).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.captureWarnings(True)
    try:
        import optuna

        optuna.logging.disable_default_handler()
    except ImportError:
        pass
    if path not in _HANDLERS:
        _HANDLERS[path] = logging.FileHandler(path)
        _HANDLERS[path].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(_HANDLERS[path])
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return path
