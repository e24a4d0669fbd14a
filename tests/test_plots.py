"""Tests of ``crdnd_ray.plots``: which keys are curves, and every figure is a real PNG file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crdnd_ray import plots

PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG and len(data) > 2000, path


def test_curve_keys_split_losses_from_accuracies() -> None:
    row = ["epoch", "lr", "images_per_s", "epoch_time_s", "epoch_started_at", "train_adv_acc", "contrast", "kd_adv",
           "kd_nat", "loss", "train_teacher_acc", "train_teacher_adv_acc", "weight_mean", "weight_min", "transition_fit",
           "transition_diag", "epoch_clean_acc", "epoch_pgd20_acc", "epoch_pgd20_best_so_far", "best_pgd20_acc",
           "last_clean_acc", "cost_images", "cost_wall_s"]
    assert plots.curve_keys(row) == (["loss", "contrast", "kd_adv", "kd_nat", "transition_fit"],
                                     ["epoch_clean_acc", "epoch_pgd20_acc"])


def sweep_frame() -> pd.DataFrame:
    """A sweep's table as ``crdnd-ray report`` reads it: four trials, one stopped early without final metrics."""
    return pd.DataFrame({
        "run_name": [f"trial-{i}" for i in range(4)], "status": ["finished", "finished", "stopped_early", "finished"],
        "method.compensation.kind": ["none", "confidence", "transition", "confidence"],
        "method.temperature": [1.0, 2.0, 4.0, 3.0],
        "best_clean_acc": [70.0, 65.0, np.nan, 60.0], "best_pgd20_acc": [30.0, 35.0, np.nan, 33.0]})


def test_plots_are_png_files(tmp_path: Path) -> None:
    history = [{"epoch": e, "loss": 2.0 - 0.4 * e, "kd_adv": 1.0 - 0.1 * e, "contrast": 0.5, "train_adv_acc": 0.3,
                "epoch_clean_acc": 40.0 + e, "epoch_pgd20_acc": 20.0 + e, "lr": 0.1, "weight_mean": 0.7} for e in range(4)]
    assert_png(plots.learning_curves(history, tmp_path / "curve.png"))
    frame = sweep_frame()
    assert_png(plots.optimisation_history(frame, "best_pgd20_acc", "max", tmp_path / "history.png"))
    assert_png(plots.param_vs_metric(frame, ["method.temperature", "method.compensation.kind"], "best_pgd20_acc",
                                      tmp_path / "params.png"))
    assert_png(plots.pareto_front(frame, "best_clean_acc", "best_pgd20_acc", tmp_path / "pareto.png"))
    table = pd.DataFrame({"variant": ["full", "full", "no-contrast", "no-contrast"],
                          "metric": ["clean_acc", "pgd20_acc"] * 2, "mean": [60.0, 30.0, 62.0, 27.0],
                          "std": [1.0, 0.5, np.nan, 0.7]})
    assert_png(plots.bar_plot_with_errors(table, tmp_path / "bars.png"))
    with pytest.raises(ValueError, match="no column 'missing'"):
        plots.optimisation_history(frame, "missing", "max", tmp_path / "x.png")
    assert_png(plots.learning_curves([], tmp_path / "empty.png"))


def test_a_parameter_without_any_point_gets_no_empty_panel(tmp_path: Path) -> None:
    frame = sweep_frame().assign(**{"method.compensation.beta": [np.nan, np.nan, 2.0, np.nan]})
    figure_path = plots.param_vs_metric(frame, ["method.temperature", "method.compensation.beta"], "best_pgd20_acc",
                                        tmp_path / "params.png")
    assert_png(figure_path)
    from PIL import Image

    width, _ = Image.open(figure_path).size
    single = plots.param_vs_metric(frame, ["method.temperature"], "best_pgd20_acc", tmp_path / "one.png")
    assert Image.open(single).size[0] == width, "the beta panel (only a stopped trial has beta) is left out"
