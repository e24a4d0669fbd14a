"""``crdnd-ray report``: the comparison table of a sweep, an ablation or plain runs, in the terminal and as
files, with its plots.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from crdnd_ray import plots
from crdnd_ray.analysis import metric_mode
from crdnd_ray.report.query import check_experiment, client_for, latest_parent, runs_frame
from crdnd_ray.tables import cell_text, is_numeric_column, markdown_table, write_table
from crdnd_ray.tracking.store import normalize_tracking_uri

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FORMATS", "format_table", "report_command", "summary_plots"]

FORMATS = ("table", "md", "csv", "parquet")
"""Formats of ``crdnd-ray report --format``."""

_SUFFIX = {"md": ".md", "csv": ".csv", "parquet": ".parquet", "table": ".md"}


def format_table(frame: pd.DataFrame, fmt: str = "table", title: str | None = None) -> str:
    """The table as text for the terminal: ``table`` (a rich table), ``md`` or ``csv``."""
    if fmt == "md":
        return (f"**{title}**\n\n" if title else "") + markdown_table(frame)
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt != "table":
        raise ValueError(f"The table format '{fmt}' is not one of table, md, csv.")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in frame.columns:
        table.add_column(str(name), justify="right" if is_numeric_column(frame, name) else "left", overflow="fold",
                         min_width=32 if name == "run_id" else None)
    for row in frame.itertuples(index=False, name=None):
        table.add_row(*(cell_text(v, "-") for v in row))
    buffer = io.StringIO()
    natural = 1 + sum(3 + max([len(str(name))] + [len(cell_text(v, "-")) for v in frame[name]]) for name in frame.columns)
    width = max(shutil.get_terminal_size((120, 24)).columns, natural, len(title or ""))
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(table)
    return buffer.getvalue()




def _first_present(frame: pd.DataFrame, *names: str) -> str | None:
    import pandas as pd

    for name in names:
        if name in frame.columns and pd.to_numeric(frame[name], errors="coerce").notna().any():
            return name
    return None


def summary_plots(frame: pd.DataFrame, folder: Path | str, metric: str | None = None, mode: str | None = None,
                  params: Sequence[str] | None = None, prefix: str = "") -> list[Path]:
    """The report's plots for a runs table: history, parameter vs metric, clean-vs-robust Pareto front, and
    (when a ``variant`` column exists) mean ± std per variant over its seed runs (a tuned ablation's tuning
    trials, ``stage`` ``tuning``, are left out). Returns the PNG files written."""
    import pandas as pd

    folder = Path(folder)
    written: list[Path] = []
    if frame.empty:
        return written
    metric = metric if metric and metric in frame.columns else _first_present(
        frame, "best_pgd20_acc", "pgd20_acc", *frame.attrs.get("metrics", []))
    if metric is None:
        return written
    mode = mode or metric_mode(metric)
    written.append(plots.optimisation_history(frame, metric, mode, folder / f"{prefix}history.png"))
    params = list(params if params is not None else frame.attrs.get("sampled") or frame.attrs.get("params", []))
    params = [p for p in params if p in frame.columns]
    if params:
        written.append(plots.param_vs_metric(frame, params[:9], metric, folder / f"{prefix}params.png"))
    clean = _first_present(frame, "best_clean_acc", "clean_acc")
    robust = _first_present(frame, "best_pgd20_acc", "pgd20_acc")
    if clean and robust:
        written.append(plots.pareto_front(frame, clean, robust, folder / f"{prefix}pareto.png"))
    if "variant" in frame.columns:
        shown = [m for m in frame.attrs.get("metrics", [metric]) if m in frame.columns and m.endswith("_acc")]
        seeds = frame[frame["stage"] != "tuning"] if "stage" in frame.columns else frame
        rows = []
        for variant, group in seeds.groupby(seeds["variant"].astype(str), sort=False):
            for name in shown or [metric]:
                values = pd.to_numeric(group[name], errors="coerce").dropna()
                if len(values):
                    rows.append({"variant": variant, "metric": name, "mean": values.mean(),
                                 "std": values.std(ddof=1) if len(values) > 1 else 0.0})
        if rows:
            written.append(plots.bar_plot_with_errors(pd.DataFrame(rows), folder / f"{prefix}variants.png"))
    return written


def report_command(experiment: str, run: str | None, metrics: list[str] | None, fmt: str, output: Path | None,
                   tracking_uri: str = "sqlite:///mlflow.db") -> None:
    """What ``crdnd-ray report`` does: print the comparison table and write the table file and plots.

    ``run`` is a parent run id (its children are compared) or any run id; without it the experiment's most
    recent sweep or ablation parent is used, or all top-level runs when there is none. The table is written
    to ``output`` (format from its suffix, else ``fmt``) with the plots beside it as ``<stem>_*.png``; without
    ``output`` the plots go to ``report/`` in the working directory (and a ``parquet`` table to
    ``report/runs.parquet``). Raises ValueError with a full-sentence message for an unknown experiment, run
    id, metric or format.
    """
    from mlflow.exceptions import MlflowException

    if fmt not in FORMATS:
        raise ValueError(f"The format '{fmt}' is not one of {', '.join(FORMATS)}.")
    uri = normalize_tracking_uri(tracking_uri)
    experiment_id = check_experiment(uri, experiment)
    client = client_for(uri)
    if run is not None:
        try:
            chosen = client.get_run(run)
        except MlflowException:
            raise ValueError(
                f"There is no run with id '{run}' in the MLflow store {uri}. Copy a run id from "
                f"'crdnd-ray report --experiment {experiment}' or from the MLflow UI."
            ) from None
        if chosen.info.experiment_id != experiment_id:
            raise ValueError(
                f"The run '{run}' belongs to another experiment (id {chosen.info.experiment_id}), not to "
                f"'{experiment}'. Pass that run's experiment with --experiment."
            )
        frame = runs_frame(uri, experiment, parent_run_id=run, metrics=metrics)
        title = f"{chosen.data.tags.get('run_kind', 'run')} {chosen.info.run_name} ({run})"
        if frame.empty:
            frame = runs_frame(uri, experiment, metrics=metrics, run_ids=[run])
    else:
        parent = latest_parent(client, experiment_id)
        if parent is not None:
            frame = runs_frame(uri, experiment, parent_run_id=parent.info.run_id, metrics=metrics)
            title = (f"latest {parent.data.tags.get('run_kind')} of '{experiment}': {parent.info.run_name} "
                     f"({parent.info.run_id})")
        else:
            frame = runs_frame(uri, experiment, metrics=metrics, top_level=True)
            title = f"runs of '{experiment}'"
    title += f", {len(frame)} run(s)"
    print(format_table(frame, fmt if fmt in ("table", "md", "csv") else "table", title=title))
    if frame.empty:
        print(f"The experiment '{experiment}' holds no runs here yet; record some with 'crdnd-ray train', "
              "'crdnd-ray sweep' or 'crdnd-ray ablate'.")
    if output is not None:
        output = Path(output)
        if not output.suffix:
            output = output.with_suffix(_SUFFIX[fmt])
        written = [write_table(frame, output)]
        plots_folder, prefix = output.parent, f"{output.stem}_"
    else:
        plots_folder, prefix = Path("report"), ""
        written = [write_table(frame, plots_folder / "runs.parquet")] if fmt == "parquet" else []
    chosen_metric = metrics[0] if metrics else None
    written += summary_plots(frame, plots_folder, metric=chosen_metric, prefix=prefix)
    for path in written:
        print(f"wrote {path}")
