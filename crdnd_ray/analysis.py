"""Statistics and selection of results: Pareto fronts, metric directions, paired comparisons over seeds.

No plotting and no tracking store: the engine uses it to rank trials and build ablation tables, the report
layer to mark what is best. A comparison of two settings over the same seeds is :func:`paired_difference`
(mean difference, t-based 95 % interval, paired t-test, probability of improvement); the p-values of a table's
comparisons are then adjusted together with :func:`holm`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = ["MIN_TEST_PAIRS", "association", "holm", "mean", "metric_mode", "paired_difference", "pareto_mask", "pareto_rows", "std"]

MIN_TEST_PAIRS = 3
"""Fewest paired seeds for which :func:`paired_difference` gives an interval and a p-value."""


def metric_mode(metric: str) -> str:
    """``min`` for losses and times, ``max`` for everything else (accuracies)."""
    lowered = metric.lower()
    return "min" if "loss" in lowered or lowered.endswith(("_time_s", "_s")) else "max"


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


def pareto_rows(rows: list[dict[str, Any]], metrics: Sequence[str], modes: Sequence[str]) -> list[dict[str, Any]]:
    """The rows on the Pareto front of ``metrics``: finished or stopped rows with finite values, not dominated."""
    import numpy as np

    candidates = [row for row in rows if row.get("status") != "failed" and all(
        isinstance(row.get(m), (int, float)) and math.isfinite(row[m]) for m in metrics)]
    if not candidates:
        return []
    values = np.array([[row[m] for m in metrics] for row in candidates], dtype=float)
    return [row for row, keep in zip(candidates, pareto_mask(values, list(modes))) if keep]


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (NaN for no values)."""
    return sum(values) / len(values) if values else math.nan


def std(values: Sequence[float]) -> float:
    """The sample standard deviation (n − 1); 0 for one value, NaN for none."""
    if len(values) < 2:
        return 0.0 if values else math.nan
    centre = mean(values)
    return math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1))


def paired_difference(pairs: Sequence[tuple[float, float]], mode: str = "max",
                      confidence: float = 0.95) -> dict[str, Any]:
    """Compare ``a`` with ``b`` over seed pairs ``(a, b)``: how much better, how sure, how often.

    Returns ``n`` (pairs), ``delta`` (mean of ``a − b``), ``ci_low``/``ci_high`` (its ``confidence`` interval
    from the t distribution with n − 1 degrees of freedom), ``p_value`` (two-sided paired t-test,
    ``scipy.stats.ttest_rel``), ``prob_improvement`` (share of pairs where ``a`` beats ``b`` in the direction of
    ``mode``, ties counting one half) and ``test`` (what was computed, or why nothing was). With fewer than
    :data:`MIN_TEST_PAIRS` pairs, or when every difference is the same, there is no test: the interval and
    p-value are NaN.
    """
    from scipy import stats

    differences = [a - b for a, b in pairs]
    n = len(differences)
    sign = 1.0 if mode == "max" else -1.0
    result: dict[str, Any] = {
        "n": n, "delta": mean(differences), "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan,
        "prob_improvement": (sum((sign * d > 0) + 0.5 * (d == 0) for d in differences) / n) if n else math.nan,
        "test": "",
    }
    if n < MIN_TEST_PAIRS:
        result["test"] = f"no test: n={n} paired seeds, fewer than {MIN_TEST_PAIRS}"
    elif max(differences) == min(differences):
        result["test"] = f"no test: all {n} paired differences equal {differences[0]:+.4g}"
    else:
        tested = stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs])
        interval = tested.confidence_interval(confidence)
        result.update(p_value=float(tested.pvalue), ci_low=float(interval.low), ci_high=float(interval.high),
                      test=f"paired t-test, n={n}")
    return result


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate).

    The k-th smallest of the m p-values is multiplied by m − k + 1, capped at 1 and made non-decreasing in that
    order. NaN entries are comparisons without a test: they stay NaN and do not count in m.
    """
    tested = sorted((p, index) for index, p in enumerate(p_values) if math.isfinite(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[index] = running
    return adjusted


def association(values: pd.Series, metric: pd.Series) -> float:
    """How strongly a parameter goes with a metric across runs, in [0, 1]: |Spearman ρ| for a numeric
    parameter, the correlation ratio η (the share of the metric's spread explained by the groups) for a
    categorical one; 0 when fewer than 3 runs have both or either is constant. Used to keep the parameters
    that matter when a table must drop columns."""
    import pandas as pd

    metric = pd.to_numeric(metric, errors="coerce")
    numeric = pd.to_numeric(values, errors="coerce")
    is_numeric = numeric.notna().sum() == values.notna().sum()
    both = metric.notna() & (numeric.notna() if is_numeric else values.notna())
    if both.sum() < 3 or metric[both].nunique() < 2 or values[both].astype(str).nunique() < 2:
        return 0.0
    if is_numeric:
        rho = numeric[both].rank().corr(metric[both].rank())
        return 0.0 if math.isnan(rho) else abs(float(rho))
    y = metric[both]
    groups = y.groupby(values[both].astype(str))
    between = float((groups.size() * (groups.mean() - y.mean()) ** 2).sum())
    return math.sqrt(between / float(((y - y.mean()) ** 2).sum()))
