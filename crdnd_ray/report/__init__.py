"""Reading recorded runs back from MLflow: queries (``query``) and the ``report`` command (``compare``)."""

from crdnd_ray.report.compare import FORMATS, format_table, report_command, summary_plots
from crdnd_ray.report.query import check_experiment, default_metrics, runs_frame

__all__ = ["FORMATS", "check_experiment", "default_metrics", "format_table", "report_command",
           "runs_frame", "summary_plots"]
