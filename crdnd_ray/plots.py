"""Every figure of crdnd-ray, as PNG files drawn with matplotlib's Agg canvas (no display, no pyplot state).

Learning curves of one run, the optimisation history of a sweep, parameter versus metric, the Pareto front
of two metrics and grouped bars with error bars for ablations. Tables and the tracking store are not this
module's business: each function takes plain rows or a :class:`pandas.DataFrame` and a path. Importing it
imports neither matplotlib nor pandas.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from crdnd_ray.analysis import pareto_mask

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["bar_plot_with_errors", "curve_keys", "learning_curves", "optimisation_history", "param_vs_metric",
           "pareto_front"]


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


_EVAL_ACCURACY = re.compile(r"^epoch_(clean|fgsm|pgd\d*|cw\d*|autoattack)_acc$")
_NOT_LOSS_PREFIXES = ("best_", "last_", "weight_", "train_", "cost_", "epoch_")
_NOT_LOSS_SUFFIXES = ("_acc", "_at", "_s", "_best_so_far", "_diag")


def curve_keys(keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split epoch-row keys into loss terms (``loss`` first, then its parts) and evaluation accuracies.

    Loss parts are every key that is not bookkeeping (``epoch``, ``lr``, times, stamps), a diagnostic
    (``weight_*``, ``train_*`` accuracies, ``*_diag``), compute (``cost_*``), an accuracy or a final metric.
    Evaluation accuracies are the attack suite's on each epoch's model (``epoch_clean_acc``,
    ``epoch_pgd20_acc``, ...), all in %.
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
    """One panel per parameter: ``metric`` against the parameter's value (categories on an axis of labels).

    A parameter with no run that has both a value and the metric gets no panel (an empty panel says nothing).
    """
    import numpy as np
    import pandas as pd

    _require(frame, metric, *params)
    y = pd.to_numeric(frame[metric], errors="coerce").to_numpy(dtype=float)
    params = [name for name in params if (frame[name].notna().to_numpy() & np.isfinite(y)).any()]
    count = max(len(params), 1)
    ncols = min(count, 3)
    nrows = math.ceil(count / ncols)
    figure, axes = _figure(ncols, nrows, width=4.2, height=3.4)
    for position in range(nrows * ncols):
        ax = axes[position // ncols][position % ncols]
        if position >= len(params):
            if not params:
                ax.text(0.5, 0.5, f"no run has both a parameter and {metric}", ha="center", va="center",
                        transform=ax.transAxes)
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


