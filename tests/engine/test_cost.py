"""Tests of ``engine.cost``: ASHA's share of the epochs, the estimate's arithmetic on a measured step, and the
totals of a sweep's trials; the calibration times the real step of a config."""

from __future__ import annotations

import pytest

from conftest import small_config
from crdnd_ray.engine.cost import asha_fraction, calibrate, estimate, totals


def test_asha_runs_a_known_share_of_the_epochs():
    assert asha_fraction(3, 2, 8) == pytest.approx((3 + 3 / 2 + 2 / 4) / 8)
    assert asha_fraction(1, 4, 1) == pytest.approx(1.0)
    assert asha_fraction(1, 2, 16) == pytest.approx((1 + 1 / 2 + 2 / 4 + 4 / 8 + 8 / 16) / 16)


def test_the_estimate_scales_a_measured_step_to_the_search():
    cfg = small_config(**{"train.epochs": 8, "search.scheduler": {"kind": "asha", "grace_period": 3,
                                                                   "reduction_factor": 2}})
    calibration = {"device": "CPU", "batch": 4, "step_s": 0.04, "s_per_example": 0.01}
    cost = estimate(cfg, trials=10, concurrent=2, calibration=calibration)
    assert cost["examples_per_epoch"] == 1344, "digits' 1,347 training examples in whole batches of 64"
    assert cost["device_hours"] == pytest.approx(0.01 * 1344 * 8 * 10 / 3600)
    assert cost["device_hours_with_asha"] == pytest.approx(cost["device_hours"] * 0.625)
    assert cost["wall_hours"] == pytest.approx(cost["device_hours_with_asha"] / 2)
    no_asha = estimate(cfg.with_overrides({"search.scheduler.kind": "none"}), 10, 2, calibration)
    assert no_asha["asha_fraction"] == 1.0 and no_asha["device_hours_with_asha"] == no_asha["device_hours"]


def test_calibration_times_the_real_step():
    measured = calibrate(small_config(), batch=4, steps=1)
    assert measured["batch"] == 4 and 0 < measured["s_per_example"] == pytest.approx(measured["step_s"] / 4)
    assert measured["device"].startswith("CPU")


def test_totals_add_up_the_trials():
    rows = [{"cost_images": 10.0, "cost_attack_passes": 30.0, "cost_device_s": 1.5, "cost_wall_s": 2.0},
            {"cost_images": 5.0, "cost_attack_passes": 15.0, "cost_device_s": 0.5, "cost_wall_s": 1.0},
            {"status": "failed"}]
    assert totals(rows) == {"total_images": 15.0, "total_attack_passes": 45.0, "total_device_s": 2.0,
                            "total_wall_s": 3.0}
