"""``crdnd-ray report``: the comparison table of a sweep, an ablation or plain runs, in the terminal and as
files, with its plots.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from crdnd_ray import plots
from crdnd_ray.analysis import association, metric_mode
from crdnd_ray.report.query import check_experiment, client_for, runs_frame
from crdnd_ray.tables import cell_text, is_numeric_column, markdown_table, write_table
from crdnd_ray.tracking.store import latest_parent
from crdnd_ray.tracking.uris import normalize_tracking_uri

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FORMATS", "KEY_METRICS", "format_table", "report_command", "summary_plots", "terminal_table"]

FORMATS = ("table", "md", "csv", "parquet")
"""Formats of ``crdnd-ray report --format``."""

_SUFFIX = {"md": ".md", "csv": ".csv", "parquet": ".parquet", "table": ".md"}
KEY_METRICS = ("verify_autoattack_acc", "best_clean_acc", "best_pgd20_acc", "best_cw_acc", "best_autoattack_acc")
"""The final metrics a terminal table shows after the ranking metric, when recorded: the verified AutoAttack
accuracy first, so the searched number is read next to the one that survived a stronger attack."""


def format_table(frame: pd.DataFrame, fmt: str = "table", title: str | None = None) -> str:
    """The whole table as text: ``table`` (a rich table of every column, as wide as it needs), ``md`` or ``csv``."""
    if fmt == "md":
        return (f"**{title}**\n\n" if title else "") + markdown_table(frame)
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt != "table":
        raise ValueError(f"The table format '{fmt}' is not one of table, md, csv.")
    natural = 1 + sum(3 + max([len(str(name))] + [len(cell_text(v, "-")) for v in frame[name]]) for name in frame.columns)
    return _render(frame, list(frame.columns), {name: str(name) for name in frame.columns}, title,
                   max(natural, len(title or "")))


def _render(frame: pd.DataFrame, columns: list[str], labels: dict[str, str], title: str | None, width: int,
            marks: list[str] | None = None) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    if marks is not None:
        table.add_column("", no_wrap=True, min_width=1)
    for name in columns:
        numeric = is_numeric_column(frame, name)
        table.add_column(labels[name], justify="right" if numeric else "left", no_wrap=True,
                         overflow="ellipsis", min_width=min(len(labels[name]), 24))
    for position, row in enumerate(frame[columns].itertuples(index=False, name=None)):
        cells = [f"{v:.2f}" if isinstance(v, float) and is_numeric_column(frame, c) and v == v else cell_text(v, "-")
                 for c, v in zip(columns, row)]
        table.add_row(*([marks[position]] if marks is not None else []), *cells)
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(table)
    return buffer.getvalue()


def _short_labels(names: list[str]) -> dict[str, str]:
    """``method.compensation.beta`` → ``beta``; more of the dotted path only where two would read the same."""
    labels: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            label = ".".join(parts[-depth:])
            if sum(".".join(other.split(".")[-depth:]) == label for other in names) == 1:
                break
        labels[name] = label
    return labels


def terminal_table(frame: pd.DataFrame, metric: str | None, mode: str, title: str, width: int | None = None) -> str:
    """The table a researcher reads in a terminal: one row per run, best first by ``metric`` (marked ★), the
    run's name and status, the tags that vary, the searched parameters under short names (those that go most
    with ``metric`` first, :func:`crdnd_ray.analysis.association`) and a few key metrics, fitted to ``width``
    (the terminal's, 120 when it has none): what does not fit goes first from the key metrics after the
    second, then from the last parameters. ``crdnd-ray report --wide`` prints every column instead."""
    import pandas as pd

    shown = frame
    if metric in frame.columns:
        values = pd.to_numeric(frame[metric], errors="coerce")
        shown = frame.assign(_key=values).sort_values("_key", ascending=(mode == "min"), na_position="last",
                                                      kind="stable").drop(columns="_key")
    width = width or shutil.get_terminal_size((120, 24)).columns
    tags = [c for c in ("variant", "stage", "seed", "verify") if c in shown.columns
            and (len(shown) < 2 or shown[c].nunique(dropna=False) > 1)]
    params = [c for c in shown.attrs.get("sampled", []) if c in shown.columns]
    if metric in shown.columns:
        params.sort(key=lambda param: -association(shown[param], shown[metric]))
    metrics = [m for m in dict.fromkeys([metric, *KEY_METRICS]) if m in shown.columns][:4]
    labels = {"run_name": "run", "status": "status", **{t: t for t in tags}, **_short_labels(params),
              **{m: m for m in metrics}}

    def natural(columns: list[str]) -> int:
        return 5 + sum(3 + max([len(labels[c])] + [len(cell_text(v, "-")) if not is_numeric_column(shown, c)
                                                   else 8 for v in shown[c]]) for c in columns)

    while natural(["run_name", "status", *tags, *params, *metrics]) > width and (len(metrics) > 1 or params):
        (metrics if len(metrics) > 2 or not params else params).pop()
    best = shown[metric].first_valid_index() if metric in shown.columns else None
    marks = ["★" if index == best else "" for index in shown.index]
    return _render(shown, ["run_name", "status", *tags, *params, *metrics], labels, title, width, marks)


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
        frame, "best_pgd20_acc", "epoch_pgd20_acc", *frame.attrs.get("metrics", []))
    if metric is None:
        return written
    mode = mode or metric_mode(metric)
    written.append(plots.optimisation_history(frame, metric, mode, folder / f"{prefix}history.png"))
    params = list(params if params is not None else frame.attrs.get("sampled") or frame.attrs.get("params", []))
    params = [p for p in params if p in frame.columns]
    if params:
        written.append(plots.param_vs_metric(frame, params[:9], metric, folder / f"{prefix}params.png"))
    clean = _first_present(frame, "best_clean_acc", "epoch_clean_acc")
    robust = _first_present(frame, "best_pgd20_acc", "epoch_pgd20_acc")
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


def _ranking(parent: Any, frame: pd.DataFrame, metrics: list[str] | None) -> tuple[str | None, str]:
    """The metric and direction that rank the runs: the first ``--metrics``, else a sweep's own search metric
    (as recorded on its parent run), else the best checkpoint's PGD-20 accuracy."""
    import json

    params = parent.data.params if parent is not None else {}
    searched = params.get("search.metric")
    if searched and searched.startswith("["):
        searched = json.loads(searched)[0]
    metric = (metrics or [None])[0] or (searched if searched in frame.columns else None) or (
        _first_present(frame, "best_pgd20_acc", "epoch_pgd20_acc", *frame.attrs.get("metrics", [])))
    mode = params.get("search.mode", "") if metric == searched else ""
    if mode.startswith("["):
        mode = json.loads(mode)[0]
    return metric, mode if mode in ("max", "min") else metric_mode(metric or "")


def report_command(experiment: str, run: str | None, metrics: list[str] | None, fmt: str, output: Path | None,
                   tracking_uri: str = "sqlite:///mlflow.db", wide: bool = False, width: int | None = None) -> None:
    """What ``crdnd-ray report`` does: print the comparison table and write the table file and plots.

    ``run`` is a parent run id (its children are compared) or any run id; without it the experiment's most
    recent sweep or ablation parent is used, or all top-level runs when there is none. The terminal table
    (``fmt`` ``table``) fits ``width`` and ranks the runs (:func:`terminal_table`); ``wide`` prints every column.
    The table is written to ``output`` (format from its suffix, else ``fmt``) with the plots beside it as
    ``<stem>_*.png``; without ``output`` the plots go to ``report/<parent run name>/`` in the working
    directory (and a ``parquet`` table there as ``runs.parquet``), so two reports never overwrite each other.
    Raises ValueError with a full-sentence message for an unknown experiment, run id, metric or format.
    """
    from mlflow.exceptions import MlflowException

    if fmt not in FORMATS:
        raise ValueError(f"The format '{fmt}' is not one of {', '.join(FORMATS)}.")
    uri = normalize_tracking_uri(tracking_uri)
    experiment_id = check_experiment(uri, experiment)
    client = client_for(uri)
    if run is not None:
        try:
            parent = client.get_run(run)
        except MlflowException:
            raise ValueError(
                f"There is no run with id '{run}' in the MLflow store {uri}. Copy a run id from "
                f"'crdnd-ray report --experiment {experiment}' or from the MLflow UI."
            ) from None
        if parent.info.experiment_id != experiment_id:
            raise ValueError(
                f"The run '{run}' belongs to another experiment (id {parent.info.experiment_id}), not to "
                f"'{experiment}'. Pass that run's experiment with --experiment."
            )
        frame = runs_frame(uri, experiment, parent_run_id=run, metrics=metrics)
        title = f"{parent.data.tags.get('run_kind', 'run')} {parent.info.run_name} ({run})"
        if frame.empty:
            frame = runs_frame(uri, experiment, metrics=metrics, run_ids=[run])
    else:
        parent = latest_parent(client, [experiment_id])
        if parent is not None:
            frame = runs_frame(uri, experiment, parent_run_id=parent.info.run_id, metrics=metrics)
            title = (f"latest {parent.data.tags.get('run_kind')} of '{experiment}': {parent.info.run_name} "
                     f"({parent.info.run_id})")
        else:
            frame = runs_frame(uri, experiment, metrics=metrics, top_level=True)
            title = f"runs of '{experiment}'"
    title += f", {len(frame)} run(s)"
    metric, mode = _ranking(parent, frame, metrics)
    if fmt == "table" and not wide:
        print(terminal_table(frame, metric, mode, title, width))
        if metric:
            print(f"★ best by {metric} ({mode}); every column: --wide")
    else:
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
        plots_folder, prefix = Path("report") / (parent.info.run_name if parent is not None else experiment), ""
        written = [write_table(frame, plots_folder / "runs.parquet")] if fmt == "parquet" else []
    if len(frame) > 1:
        written += summary_plots(frame, plots_folder, metric=metric, mode=mode, prefix=prefix)
    for path in written:
        print(f"wrote {path}")
