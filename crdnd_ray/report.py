"""Comparison tables and plots of recorded runs: what ``crdnd-ray report`` prints and writes.

Tables come from ``mlflow.search_runs`` as a tidy :class:`pandas.DataFrame` (one row per run: ``run_id``,
``run_name``, ``status``, the searched parameters first, then the parameters that differ between runs, then
metrics without their ``metrics.`` prefix). They are written as CSV, Parquet (pyarrow) or Markdown and shown
in the terminal as a rich table, Markdown or CSV.

Plots are PNG files drawn with matplotlib's Agg canvas (no display, no pyplot global state): learning curves
of one run, optimisation history, parameter versus metric, the Pareto front of two metrics and a bar plot with
error bars for ablations. Importing this module imports neither MLflow nor matplotlib.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = [
    "FORMATS",
    "bar_plot_with_errors",
    "curve_keys",
    "default_metrics",
    "format_table",
    "learning_curves",
    "markdown_table",
    "metric_mode",
    "optimisation_history",
    "param_vs_metric",
    "pareto_front",
    "pareto_mask",
    "report_command",
    "runs_frame",
    "summary_plots",
    "write_table",
]

FORMATS = ("table", "md", "csv", "parquet")
"""Formats of ``crdnd-ray report --format``."""

_SUFFIX = {"md": ".md", "csv": ".csv", "parquet": ".parquet", "table": ".md"}
_PREFERRED = ("best_clean_acc", "best_fgsm_acc", "best_pgd20_acc", "best_cw_acc", "best_autoattack_acc")
_TAG_COLUMNS = ("variant", "seed")


def metric_mode(metric: str) -> str:
    """``min`` for losses and times, ``max`` for everything else (accuracies)."""
    lowered = metric.lower()
    return "min" if "loss" in lowered or lowered.endswith(("_time_s", "_s")) else "max"


@contextlib.contextmanager
def _using_tracking_uri(uri: str) -> Iterator[None]:
    import mlflow

    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # pragma: no cover - depends on MLflow internals
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)
        return
    with _use_tracking_uri(uri):
        yield


def _to_numeric_if_possible(column: pd.Series) -> pd.Series:
    import pandas as pd

    if not (pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column)):
        return column
    present = column.dropna()
    if present.empty:
        return column
    converted = pd.to_numeric(present, errors="coerce")
    if converted.isna().any():
        return column
    result = pd.to_numeric(column, errors="coerce")
    if (result.dropna() % 1 == 0).all() and not present.astype(str).str.contains(r"[.eE]").any():
        return result.astype("Int64")
    return result


def default_metrics(available: Sequence[str]) -> list[str]:
    """The metrics a report shows when none are asked for: final ``best_*`` metrics, last-epoch accuracy."""
    names = list(available)
    chosen = [m for m in _PREFERRED if m in names]
    chosen += sorted(m for m in names if m.startswith("best_") and m not in chosen and m not in
                     ("best_epoch", "best_n_eval"))
    chosen += [m for m in ("best_epoch", "clean_acc", "pgd20_acc", "epoch") if m in names]
    return chosen or sorted(names)


def runs_frame(tracking_uri: str, experiment: str, parent_run_id: str | None = None,
               metrics: list[str] | None = None, *, top_level: bool = False,
               run_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """A tidy table of an experiment's runs from ``mlflow.search_runs``, oldest first.

    With ``parent_run_id`` only that parent's children; with ``top_level`` only runs without a parent; with
    ``run_ids`` only those runs. Columns: ``run_id``, ``run_name``, ``status`` (the ``status`` tag), the
    ``variant``/``seed`` tags when present, the sampled parameters (marked ``sampled.*`` in MLflow, shown
    under their own name), the other parameters whose values differ between runs (both sorted by name), and
    ``metrics`` (default :func:`default_metrics`). ``frame.attrs`` holds the lists ``sampled``, ``params``
    and ``metrics``.
    Raises ValueError for an unknown experiment or metric.
    """
    import mlflow
    import pandas as pd

    from crdnd_ray.tracking import normalize_tracking_uri

    uri = normalize_tracking_uri(tracking_uri)
    _check_experiment(uri, experiment)
    filter_string = f"tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else ""
    with _using_tracking_uri(uri):
        raw = mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string,
                                 order_by=["attributes.start_time ASC"], output_format="pandas")
    if top_level and "tags.mlflow.parentRunId" in raw.columns:
        raw = raw[raw["tags.mlflow.parentRunId"].isna()]
    if run_ids is not None:
        raw = raw[raw["run_id"].isin(list(run_ids))]
    raw = raw.reset_index(drop=True)

    available = [c[len("metrics."):] for c in raw.columns if c.startswith("metrics.")]
    if metrics is None:
        chosen = default_metrics(available)
    else:
        unknown = [m for m in metrics if m not in available]
        if unknown and not raw.empty:
            raise ValueError(
                f"The metric(s) {', '.join(repr(m) for m in unknown)} were not recorded for these runs. "
                f"Recorded metrics are: {', '.join(sorted(available)) or 'none'}. Pass some of them with --metrics."
            )
        chosen = list(metrics)

    def column(name: str) -> pd.Series:
        return raw[name] if name in raw.columns else pd.Series([None] * len(raw), dtype=object)

    frame = pd.DataFrame({"run_id": column("run_id"), "run_name": column("tags.mlflow.runName")})
    status = column("tags.status")
    fallback = column("status").astype(object).map(lambda s: str(s).lower() if isinstance(s, str) else s)
    frame["status"] = status.where(status.notna(), fallback)
    for tag in _TAG_COLUMNS:
        if f"tags.{tag}" in raw.columns and raw[f"tags.{tag}"].notna().any():
            frame[tag] = _to_numeric_if_possible(raw[f"tags.{tag}"])
    sampled = sorted(c[len("params.sampled."):] for c in raw.columns if c.startswith("params.sampled."))
    for name in sampled:
        frame[name] = _to_numeric_if_possible(raw[f"params.sampled.{name}"])
    varying = []
    for name in sorted(raw.columns):
        if not name.startswith("params.") or name.startswith("params.sampled."):
            continue
        key = name[len("params."):]
        if key in sampled or key in frame.columns:
            continue
        if raw[name].astype(str).nunique(dropna=False) > 1:
            varying.append(key)
    for key in varying:
        frame[key] = _to_numeric_if_possible(raw[f"params.{key}"])
    for metric in chosen:
        target = metric if metric not in frame.columns else f"metric.{metric}"
        frame[target] = pd.to_numeric(column(f"metrics.{metric}"), errors="coerce")
    frame.attrs.update({"sampled": sampled, "params": sampled + varying, "metrics": chosen})
    return frame


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _check_experiment(uri: str, experiment: str) -> str:
    """The experiment's id; ValueError (listing the existing ones) when it does not exist."""
    from crdnd_ray.tracking import sqlite_path

    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise ValueError(
            f"There is no MLflow database at {db}. Run 'crdnd-ray train', 'sweep' or 'ablate' first, or point "
            "--tracking-uri at the store that holds your runs."
        )
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        listed = f"Existing experiments: {', '.join(names)}." if names else "The store holds no experiments yet."
        raise ValueError(
            f"There is no experiment named '{experiment}' in the MLflow store {uri}. {listed} "
            "Pass one of them with --experiment."
        )
    return found.experiment_id


def _cell(value: Any, empty: str = "") -> str:
    if value is None:
        return empty
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return empty
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, float):
        if math.isnan(value):
            return empty
        return f"{value:.4g}"
    if hasattr(value, "item") and not isinstance(value, str):
        try:
            return _cell(value.item(), empty)
        except (ValueError, AttributeError):
            pass
    return str(value)


def _is_numeric(frame: pd.DataFrame, name: Any) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(frame[name]) and not pd.api.types.is_bool_dtype(frame[name]))


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers to 4 significant digits, right-aligned)."""
    columns = [str(c) for c in frame.columns]

    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(escape(c) for c in columns) + " |",
             "|" + "|".join("---:" if _is_numeric(frame, c) else ":---" for c in frame.columns) + "|"]
    for row in frame.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(escape(_cell(v)) for v in row) + " |")
    return "\n".join(lines) + "\n"


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
        table.add_column(str(name), justify="right" if _is_numeric(frame, name) else "left", overflow="fold",
                         min_width=32 if name == "run_id" else None)
    for row in frame.itertuples(index=False, name=None):
        table.add_row(*(_cell(v, "-") for v in row))
    buffer = io.StringIO()
    natural = 1 + sum(3 + max([len(str(name))] + [len(_cell(v, "-")) for v in frame[name]]) for name in frame.columns)
    width = max(shutil.get_terminal_size((120, 24)).columns, natural, len(title or ""))
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(table)
    return buffer.getvalue()


def _arrow_table(frame: pd.DataFrame) -> Any:
    import pyarrow as pa

    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        fixed = frame.copy()
        for name in fixed.columns:
            if fixed[name].dtype == object:
                try:
                    pa.array(fixed[name], from_pandas=True)
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
                    fixed[name] = fixed[name].map(lambda v: None if v is None else str(v))
        return pa.Table.from_pandas(fixed, preserve_index=False)


def write_table(frame: pd.DataFrame, path: Path | str) -> Path:
    """Write the table by suffix: ``.csv``, ``.parquet`` (pyarrow) or ``.md``; returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".md"):
        raise ValueError(
            f"Cannot tell the table format of '{path}' from its suffix. Use a .csv, .parquet or .md file name."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(_arrow_table(frame), path)
    else:
        path.write_text(markdown_table(frame))
    return path


def _figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, axes


def _save(figure: Any, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    return path


_EVAL_ACCURACY = re.compile(r"^(clean|fgsm|pgd\d*|cw\d*|autoattack)_acc$")
_NOT_LOSS_PREFIXES = ("best_", "last_", "weight_", "teacher_")
_NOT_LOSS_SUFFIXES = ("_acc", "_at", "_s", "_best_so_far", "_diag")


def curve_keys(keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split epoch-row keys into loss terms (``loss`` first, then its parts) and evaluation accuracies.

    Loss parts are every key that is not bookkeeping (``epoch``, ``lr``, times, stamps), a diagnostic
    (``weight_*``, ``teacher_*``, ``*_diag``), an accuracy or a final metric. Evaluation accuracies are the
    attack suite's (``clean_acc``, ``pgd20_acc``, ``fgsm_acc``, ``cw_acc``, ``autoattack_acc``), all in %.
    """
    losses = [k for k in keys if k not in ("epoch", "lr") and not k.startswith(_NOT_LOSS_PREFIXES)
              and not k.endswith(_NOT_LOSS_SUFFIXES)]
    losses.sort(key=lambda k: (k != "loss", k))
    accuracies = [k for k in keys if _EVAL_ACCURACY.match(k)]
    return losses, accuracies


def learning_curves(history: list[dict[str, Any]], path: Path | str) -> Path:
    """Loss (and its parts) and the per-epoch evaluation accuracies (clean, PGD, ...) against the epoch."""
    figure, axes = _figure(2)
    epochs = [row.get("epoch", position) for position, row in enumerate(history)]
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]

    def series(key: str) -> tuple[list[Any], list[float]]:
        points = [(e, float(r[key])) for e, r in zip(epochs, history)
                  if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                  and math.isfinite(float(r[key]))]
        return [p[0] for p in points], [p[1] for p in points]

    losses, accuracies = curve_keys(keys)
    for key in losses:
        x, y = series(key)
        if y:
            axes[0][0].plot(x, y, marker="o", markersize=3, linewidth=2.0 if key == "loss" else 1.0, label=key)
    for key in accuracies:
        x, y = series(key)
        if y:
            axes[0][1].plot(x, y, marker="o", markersize=3, label=key)
    from matplotlib.ticker import MaxNLocator

    for ax, title, ylabel in ((axes[0][0], "training loss", "loss"), (axes[0][1], "evaluation accuracy", "accuracy (%)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return _save(figure, path)


def _label_column(frame: pd.DataFrame) -> str | None:
    return next((c for c in ("run_name", "trial", "trial_id", "variant", "run_id") if c in frame.columns), None)


def _require(frame: pd.DataFrame, *columns: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"The table has no column {', '.join(repr(c) for c in missing)}; its columns are "
            f"{', '.join(map(str, frame.columns))}."
        )


def optimisation_history(frame: pd.DataFrame, metric: str, mode: str, path: Path | str) -> Path:
    """Each trial's ``metric`` in table order and the best value so far (``mode`` ``max`` or ``min``)."""
    import numpy as np
    import pandas as pd

    _require(frame, metric)
    values = pd.to_numeric(frame[metric], errors="coerce").to_numpy(dtype=float)
    trials = np.arange(1, len(values) + 1)
    figure, axes = _figure(width=6.0)
    ax = axes[0][0]
    valid = np.isfinite(values)
    ax.scatter(trials[valid], values[valid], label=metric, zorder=3)
    if valid.any():
        fill = -np.inf if mode == "max" else np.inf
        running = (np.maximum if mode == "max" else np.minimum).accumulate(np.where(valid, values, fill))
        shown = np.isfinite(running)
        ax.step(trials[shown], running[shown], where="post", color="tab:red", label=f"best so far ({mode})")
    else:
        ax.text(0.5, 0.5, "no finished values", ha="center", va="center", transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"optimisation history of {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, path)


def param_vs_metric(frame: pd.DataFrame, params: Sequence[str], metric: str, path: Path | str) -> Path:
    """One panel per parameter: ``metric`` against the parameter's value (categories on an axis of labels)."""
    import numpy as np
    import pandas as pd

    _require(frame, metric, *params)
    params = list(params) or []
    count = max(len(params), 1)
    ncols = min(count, 3)
    nrows = math.ceil(count / ncols)
    figure, axes = _figure(ncols, nrows, width=4.2, height=3.4)
    y = pd.to_numeric(frame[metric], errors="coerce").to_numpy(dtype=float)
    for position in range(nrows * ncols):
        ax = axes[position // ncols][position % ncols]
        if position >= len(params):
            if not params:
                ax.text(0.5, 0.5, "no parameters to show", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.set_visible(False)
            continue
        name = params[position]
        numeric = pd.to_numeric(frame[name], errors="coerce")
        if frame[name].notna().any() and numeric[frame[name].notna()].notna().all():
            x = numeric.to_numpy(dtype=float)
            ax.scatter(x, y)
            finite = x[np.isfinite(x)]
            if finite.size and finite.min() > 0 and finite.max() / finite.min() > 50:
                ax.set_xscale("log")
        else:
            labels = frame[name].astype(str)
            categories = list(dict.fromkeys(labels))
            positions = labels.map({c: i for i, c in enumerate(categories)}).to_numpy(dtype=float)
            ax.scatter(positions, y)
            ax.set_xticks(range(len(categories)), categories, rotation=20, fontsize="small")
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    figure.suptitle(f"{metric} against the searched parameters")
    return _save(figure, path)


def pareto_mask(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Which rows of ``values`` (n points × k objectives) are not dominated.

    ``modes[j]`` is ``max`` or ``min`` for column j. A point is dominated when another is at least as good in
    every column and strictly better in one. Rows with NaN are never on the front and dominate nothing;
    identical points are all kept.
    """
    import numpy as np

    array = np.asarray(values, dtype=float)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] != len(modes):
        raise ValueError(
            f"pareto_mask needs an (n, k) array with one mode per column; got shape {array.shape} and "
            f"{len(modes)} mode(s)."
        )
    bad = [m for m in modes if m not in ("max", "min")]
    if bad:
        raise ValueError(f"Each mode must be 'max' or 'min', not {', '.join(map(repr, bad))}.")
    signs = np.array([1.0 if m == "max" else -1.0 for m in modes])
    oriented = array * signs
    valid = np.isfinite(oriented).all(axis=1)
    if array.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    at_least = (oriented[None, :, :] >= oriented[:, None, :]).all(axis=2)
    better = (oriented[None, :, :] > oriented[:, None, :]).any(axis=2)
    dominated = (at_least & better & valid[None, :]).any(axis=1)
    return valid & ~dominated


def pareto_front(frame: pd.DataFrame, x_metric: str, y_metric: str, path: Path | str,
                 modes: Sequence[str] = ("max", "max")) -> Path:
    """Scatter of two metrics with the non-dominated runs highlighted, joined and labelled."""
    import numpy as np
    import pandas as pd

    _require(frame, x_metric, y_metric)
    x = pd.to_numeric(frame[x_metric], errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(frame[y_metric], errors="coerce").to_numpy(dtype=float)
    mask = pareto_mask(np.column_stack([x, y]), list(modes)) if len(x) else np.zeros(0, dtype=bool)
    figure, axes = _figure(width=6.0, height=4.5)
    ax = axes[0][0]
    ax.scatter(x[~mask], y[~mask], color="tab:gray", alpha=0.7, label="dominated")
    ax.scatter(x[mask], y[mask], color="tab:red", zorder=3, label="Pareto front")
    if mask.any():
        order = np.argsort(x[mask])
        ax.plot(x[mask][order], y[mask][order], color="tab:red", linewidth=1)
        label = _label_column(frame)
        if label is not None:
            for index in np.flatnonzero(mask):
                ax.annotate(str(frame[label].iloc[index])[:24], (x[index], y[index]), fontsize="x-small",
                            xytext=(3, 3), textcoords="offset points")
    if not np.isfinite(x).any():
        ax.text(0.5, 0.5, "no runs with both metrics", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"{x_metric} ({modes[0]})")
    ax.set_ylabel(f"{y_metric} ({modes[1]})")
    ax.set_title(f"{y_metric} against {x_metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, path)


def bar_plot_with_errors(table: pd.DataFrame, path: Path | str) -> Path:
    """Grouped bars (one group per ``variant``, one bar per ``metric``) of ``mean`` with ``std`` error bars."""
    import numpy as np

    _require(table, "variant", "metric", "mean", "std")
    variants = list(dict.fromkeys(table["variant"].astype(str)))
    metrics = list(dict.fromkeys(table["metric"].astype(str)))
    figure, axes = _figure(width=max(5.0, 1.2 * len(variants) * max(len(metrics), 1) ** 0.5), height=4.0)
    ax = axes[0][0]
    width = 0.8 / max(len(metrics), 1)
    base = np.arange(len(variants))
    for position, metric in enumerate(metrics):
        selected = table[table["metric"].astype(str) == metric]
        rows = selected.set_index(selected["variant"].astype(str))
        means = np.array([float(rows["mean"].get(v, np.nan)) for v in variants])
        stds = np.nan_to_num(np.array([float(rows["std"].get(v, np.nan)) for v in variants]))
        ax.bar(base + (position - (len(metrics) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=metric)
    ax.set_xticks(base, variants, rotation=20)
    ax.set_ylabel("mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, path)


def _first_present(frame: pd.DataFrame, *names: str) -> str | None:
    import pandas as pd

    for name in names:
        if name in frame.columns and pd.to_numeric(frame[name], errors="coerce").notna().any():
            return name
    return None


def summary_plots(frame: pd.DataFrame, folder: Path | str, metric: str | None = None, mode: str | None = None,
                  params: Sequence[str] | None = None, prefix: str = "") -> list[Path]:
    """The report's plots for a runs table: history, parameter vs metric, clean-vs-robust Pareto front, and
    (when a ``variant`` column exists) mean ± std per variant. Returns the PNG files written."""
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
    written.append(optimisation_history(frame, metric, mode, folder / f"{prefix}history.png"))
    params = list(params if params is not None else frame.attrs.get("sampled") or frame.attrs.get("params", []))
    params = [p for p in params if p in frame.columns]
    if params:
        written.append(param_vs_metric(frame, params[:9], metric, folder / f"{prefix}params.png"))
    clean = _first_present(frame, "best_clean_acc", "clean_acc")
    robust = _first_present(frame, "best_pgd20_acc", "pgd20_acc")
    if clean and robust:
        written.append(pareto_front(frame, clean, robust, folder / f"{prefix}pareto.png"))
    if "variant" in frame.columns:
        shown = [m for m in frame.attrs.get("metrics", [metric]) if m in frame.columns and m.endswith("_acc")]
        rows = []
        for variant, group in frame.groupby(frame["variant"].astype(str), sort=False):
            for name in shown or [metric]:
                values = pd.to_numeric(group[name], errors="coerce").dropna()
                if len(values):
                    rows.append({"variant": variant, "metric": name, "mean": values.mean(),
                                 "std": values.std(ddof=1) if len(values) > 1 else 0.0})
        if rows:
            written.append(bar_plot_with_errors(pd.DataFrame(rows), folder / f"{prefix}variants.png"))
    return written


def _latest_parent(client: Any, experiment_id: str) -> Any | None:
    newest = None
    for kind in ("sweep", "ablation"):
        found = client.search_runs([experiment_id], filter_string=f"tags.run_kind = '{kind}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found and (newest is None or found[0].info.start_time > newest.info.start_time):
            newest = found[0]
    return newest


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

    from crdnd_ray.tracking import normalize_tracking_uri

    if fmt not in FORMATS:
        raise ValueError(f"The format '{fmt}' is not one of {', '.join(FORMATS)}.")
    uri = normalize_tracking_uri(tracking_uri)
    experiment_id = _check_experiment(uri, experiment)
    client = _client(uri)
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
        parent = _latest_parent(client, experiment_id)
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
