"""Tests of ``crdnd_ray.robustness``: the verdicts of the checks on accuracies given by hand (no attack)."""

from __future__ import annotations

from crdnd_ray.robustness import run_checks


def test_ordering_and_eps_growth_judge_synthetic_accuracies():
    accuracies = {"clean": 90.0, "fgsm": 50.0, "pgd20": 58.0, "autoattack": 40.0, "pgd100x5": 39.0,
                  "pgd20_eps_x0.5": 60.0, "pgd20_eps_x1": 58.0, "pgd20_eps_x2": 70.0, "pgd20_eps_x4": 10.0,
                  "pgd20_large_eps": 5.0}
    checks = {check.name: check for check in run_checks(accuracies, 0.2)}
    assert "transfer" not in checks
    assert checks["ordering"].verdict == "warn"
    assert checks["ordering"].message.startswith("PGD-20 leaves 8.0 points more accuracy than FGSM (PGD-20 58.0 %, "
                                                 "FGSM 50.0 %)")
    assert checks["eps_growth"].verdict == "warn"
    assert "rises from 58.0 % at eps 0.2 to 70.0 % at eps 0.4" in checks["eps_growth"].message
    assert "still leaves 5.0 % accuracy at eps 1" in checks["eps_growth"].message
    within = {c.name: c.verdict for c in run_checks(accuracies | {"pgd20": 50.9, "pgd20_eps_x1": 50.9,
                                                                  "pgd20_eps_x2": 50.0, "pgd20_large_eps": 2.0}, 0.2)}
    assert within["ordering"] == within["eps_growth"] == "pass"
