"""The engine: the training loop and everything that runs it (teachers, Ray Train, Ray Tune trials).

Importing the package sets Ray's environment defaults before any module below imports Ray, so that a Ray
started here keeps its files inside the run: no auth token in ``~/.ray`` (local clusters), session files in
a private temporary folder, quick health checks of Train workers, and Tune's plain output. Values already
set in the environment win.
"""

import os
import signal
import tempfile
import threading

RAY_ENVIRONMENT = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TMPDIR": os.path.join(tempfile.gettempdir(), f"crdnd-ray-{os.getuid()}"),
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_DEDUP_LOGS": "0",
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_RESULT_BUFFER_LENGTH": "1",
}
for _name, _value in RAY_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)


def interrupt_on_sigterm() -> None:
    """Make SIGTERM end the work as Ctrl-C does: it runs whatever handles SIGINT at that moment (Ray Tune's
    graceful stop during a sweep, Ray Train's abort, else KeyboardInterrupt), so partial results are written
    and unfinished runs are marked killed. Installed by the CLI, and again after ``ray.init`` (which installs
    its own SIGTERM handler in the driver). Only the main thread can install signal handlers."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
