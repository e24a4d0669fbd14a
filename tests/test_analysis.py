"""Tests of ``crdnd_ray.analysis``: Pareto fronts on hand examples, metric directions, paired statistics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
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


def test_paired_difference_gives_the_t_interval_the_t_test_and_the_probability_of_improvement():
    from scipy import stats

    pairs = [(13.0, 10.0), (14.0, 12.0), (18.0, 14.0), (11.0, 11.0)]
    differences = np.array([3.0, 2.0, 4.0, 0.0])
    result = analysis.paired_difference(pairs)
    half_width = stats.t.ppf(0.975, df=3) * differences.std(ddof=1) / math.sqrt(4)
    assert result["n"] == 4 and result["delta"] == pytest.approx(2.25)
    assert result["ci_low"] == pytest.approx(2.25 - half_width) and result["ci_high"] == pytest.approx(2.25 + half_width)
    assert result["p_value"] == pytest.approx(stats.ttest_1samp(differences, 0.0).pvalue)
    assert result["prob_improvement"] == pytest.approx((3 + 0.5) / 4)
    assert result["test"] == "paired t-test, n=4"
    lower_is_better = analysis.paired_difference(pairs, mode="min")
    assert lower_is_better["delta"] == pytest.approx(2.25) and lower_is_better["prob_improvement"] == pytest.approx(0.5 / 4)
    assert lower_is_better["p_value"] == pytest.approx(result["p_value"])


@pytest.mark.parametrize("pairs, reason", [
    ([(13.0, 10.0), (14.0, 12.0)], "n=2 paired seeds, fewer than 3"),
    ([(13.0, 10.0), (15.0, 12.0), (4.0, 1.0)], "all 3 paired differences equal +3"),
])
def test_paired_difference_gives_no_test_with_too_few_seeds_or_constant_differences(pairs, reason):
    result = analysis.paired_difference(pairs)
    assert result["test"] == f"no test: {reason}"
    assert all(math.isnan(result[key]) for key in ("p_value", "ci_low", "ci_high"))
    assert result["delta"] == pytest.approx(np.mean([a - b for a, b in pairs]))
    assert result["prob_improvement"] == 1.0


def test_holm_adjusts_step_down_keeps_order_and_skips_missing_tests():
    raw = [0.01, 0.04, math.nan, 0.03, 0.005]
    adjusted = analysis.holm(raw)
    assert adjusted[:2] == pytest.approx([0.03, 0.06]) and adjusted[3:] == pytest.approx([0.06, 0.02])
    assert math.isnan(adjusted[2])
    assert analysis.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert analysis.holm([0.02]) == pytest.approx([0.02]) and analysis.holm([]) == []
    rng = np.random.default_rng(0)
    many = rng.uniform(0, 0.2, size=12).tolist()
    adjusted = analysis.holm(many)
    order = np.argsort(many)
    assert all(a >= p for a, p in zip(adjusted, many))
    assert np.all(np.diff(np.array(adjusted)[order]) >= 0)


def test_mean_and_std():
    assert analysis.std([1.0, 2.0, 3.0]) == pytest.approx(1.0) and math.isnan(analysis.mean([]))


def test_association_ranks_what_goes_with_the_metric():
    metric = pd.Series([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    assert analysis.association(pd.Series([0.1, 0.2, 0.3, 0.4, 0.5, 0.9]), metric) == pytest.approx(1.0)
    assert analysis.association(pd.Series([6, 5, 4, 3, 2, 1]), metric) == pytest.approx(1.0), "a falling relation counts too"
    assert analysis.association(pd.Series(["a", "a", "a", "b", "b", "b"]), metric) == pytest.approx(
        np.sqrt(6 * 15.0 ** 2 / ((metric - 35.0) ** 2).sum()))
    assert analysis.association(pd.Series([1.0, 2.0, 1.0, 2.0, 1.0, 2.0]), metric) < 0.5
    assert analysis.association(pd.Series([None, None, 0.5, None, None, 0.7]), metric) == 0.0, "fewer than 3 runs have it"
    assert analysis.association(pd.Series([3.0] * 6), metric) == 0.0
