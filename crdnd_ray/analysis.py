"""Statistics and selection of results: Pareto fronts, metric directions, paired comparisons over seeds.

No plotting and no tracking store: the engine uses it to rank trials and build ablation tables, the report
layer to mark what is best.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import numpy as np

__all__ = ["mean", "metric_mode", "paired_difference", "pareto_mask", "pareto_rows", "std"]


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


def paired_difference(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Mean difference ``a − b`` over seed pairs with a p-value: a paired t-test from 3 pairs, else a sign test.

    Returns ``delta``, ``p_value`` and ``test`` (a description that states n, and flags the sign test as too
    small to be conclusive).
    """
    from scipy import stats

    differences = [a - b for a, b in pairs]
    result: dict[str, Any] = {"delta": mean(differences), "p_value": math.nan, "test": ""}
    if not pairs:
        return result
    if len(pairs) >= 3 and std(differences) > 0:
        result["p_value"] = float(stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue)
        result["test"] = f"paired t-test, n={len(pairs)}"
    elif len(pairs) >= 3:
        result["p_value"] = 1.0 if result["delta"] == 0 else 0.0
        result["test"] = f"paired t-test, n={len(pairs)} (identical differences)"
    else:
        wins = sum(d > 0 for d in differences)
        losses = sum(d < 0 for d in differences)
        result["p_value"] = float(stats.binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0
        result["test"] = f"sign test, n={len(pairs)} (too few seeds for a t-test; not conclusive)"
    return result
