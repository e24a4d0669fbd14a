"""Tests of ``crdnd_ray.analysis``: Pareto fronts on hand examples, metric directions, paired statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from crdnd_ray import analysis


def test_pareto_mask_hand_example() -> None:
    points = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0], [0.5, 0.5], [2.0, 0.0], [np.nan, 3.0], [1.0, 0.5]])
    assert analysis.pareto_mask(points, ["max", "max"]).tolist() == [True, True, True, False, True, False, False]
    assert analysis.pareto_mask(points, ["max", "min"]).tolist() == [False, True, False, False, True, False, False]
    assert analysis.pareto_mask(points, ["min", "min"]).tolist() == [False, True, True, True, True, False, False]
    assert analysis.pareto_mask(np.array([3.0, 1.0, 3.0]), ["max"]).tolist() == [True, False, True]
    assert analysis.pareto_mask(np.zeros((0, 2)), ["max", "max"]).tolist() == []
    with pytest.raises(ValueError, match="one mode per column"):
        analysis.pareto_mask(points, ["max"])
    with pytest.raises(ValueError, match="'max' or 'min'"):
        analysis.pareto_mask(points, ["max", "up"])


def test_pareto_rows_skip_failed_and_incomplete_rows():
    rows = [{"status": "finished", "a": 1.0, "b": 1.0}, {"status": "failed", "a": 9.0, "b": 9.0},
            {"status": "stopped_early", "a": 2.0, "b": 0.0}, {"status": "finished", "a": 0.5, "b": 0.5},
            {"status": "finished", "a": math.nan, "b": 5.0}]
    assert analysis.pareto_rows(rows, ["a", "b"], ["max", "max"]) == [rows[0], rows[2]]


def test_metric_modes():
    assert [analysis.metric_mode(m) for m in ("best_pgd20_acc", "loss", "wall_time_s", "kd_adv")] == [
        "max", "min", "min", "max"]


def test_paired_difference_uses_the_t_test_from_three_pairs_and_the_sign_test_below():
    from scipy import stats

    pairs = [(13.0, 10.0), (14.0, 12.0), (18.0, 14.0)]
    result = analysis.paired_difference(pairs)
    assert result["delta"] == pytest.approx(3.0)
    assert result["p_value"] == pytest.approx(stats.ttest_rel([13, 14, 18], [10, 12, 14]).pvalue)
    assert result["test"] == "paired t-test, n=3"
    small = analysis.paired_difference(pairs[:2])
    assert "sign test" in small["test"] and small["p_value"] == pytest.approx(0.5)
    assert analysis.std([1.0, 2.0, 3.0]) == pytest.approx(1.0) and math.isnan(analysis.mean([]))
