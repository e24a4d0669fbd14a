"""The ablation engine: the table against MLflow, failed cells, resume, and bad input."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from conftest import REPO, interrupt_then_resume, small_config
from crdnd_ray.config import ConfigError, load_config
from crdnd_ray.engine.ablation import ablation_table, run_ablation, validate_ablation


def ablation_config(tmp_path, **overrides):
    base = {
        "tracking.enabled": True,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "train.epochs": 2,
        "train.max_steps_per_epoch": 6,
        "eval.final_attacks": ["clean", "pgd20"],
        "ablation": {
            "seeds": [0, 1],
            "baseline": "crdnd",
            "metrics": ["best_clean_acc", "best_pgd20_acc"],
            "variants": {
                "crdnd": {},
                "no_contrastive": {"method.contrastive.kind": "none"},
                "diverges": {"train.lr": 1.0e30},
            },
        },
    }
    base.update(overrides)
    return small_config(**base)


@pytest.mark.slow
def test_reduced_digits_ablation_matches_mlflow_and_shows_failed_cells(tmp_path, ray_session, digits_teacher):
    cfg = ablation_config(tmp_path, **{"teacher.checkpoint": str(digits_teacher)})
    outcome = run_ablation(cfg, tmp_path / "ablation", printer=lambda line: None)
    table = outcome["table"]
    assert set(table["variant"]) == {"crdnd", "no_contrastive", "diverges"}
    healthy = table[table["variant"] != "diverges"]
    assert (healthy["n"] == 2).all()
    failed = table[table["variant"] == "diverges"]
    assert (failed["status"] == "failed").all() and (failed["n"] == 0).all()
    assert "failed" in outcome["markdown"]

    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=[cfg.experiment.name],
                              filter_string=f"tags.mlflow.parentRunId = '{outcome['parent_run_id']}'")
    assert len(runs) == 6
    for variant in ("crdnd", "no_contrastive"):
        for metric in ("best_clean_acc", "best_pgd20_acc"):
            values = runs[runs["tags.variant"] == variant][f"metrics.{metric}"].astype(float)
            row = table[(table["variant"] == variant) & (table["metric"] == metric)].iloc[0]
            assert row["mean"] == pytest.approx(values.mean())
            assert row["std"] == pytest.approx(values.std(ddof=1))
    for suffix in ("md", "csv", "parquet", "png"):
        assert (tmp_path / "ablation" / f"ablation.{suffix}").stat().st_size > 0
    assert pd.read_parquet(tmp_path / "ablation" / "ablation.parquet").shape == table.shape


def test_paired_statistics_use_the_t_test_from_three_seeds_and_the_sign_test_below():
    ablation = small_config(**{"ablation": {"seeds": [0, 1, 2], "baseline": "a", "metrics": ["best_pgd20_acc"],
                                            "variants": {"a": {}, "b": {}}}}).ablation
    rows = [{"variant": v, "seed": str(s), "status": "finished", "best_pgd20_acc": value}
            for v, values in {"a": [10.0, 12.0, 14.0], "b": [13.0, 14.0, 18.0]}.items()
            for s, value in enumerate(values)]
    table = ablation_table(rows, ablation).set_index("variant")
    assert table.loc["b", "delta"] == pytest.approx(3.0)
    assert table.loc["b", "mean"] == pytest.approx(15.0)
    assert table.loc["b", "std"] == pytest.approx(math.sqrt(7.0))
    assert "t-test" in table.loc["b", "test"] and 0 < table.loc["b", "p_value"] < 1
    two_seeds = [row for row in rows if row["seed"] != "2"]
    small = ablation_table(two_seeds, ablation).set_index("variant")
    assert "sign test" in small.loc["b", "test"]
    assert small.loc["b", "p_value"] == pytest.approx(0.5)


@pytest.mark.parametrize("ablation, message", [
    ({"seeds": [], "variants": {"a": {}}}, "seeds"),
    ({"seeds": [0], "variants": {"a": {}}, "baseline": "zzz"}, "baseline"),
    ({"seeds": [0], "variants": {"a": {"method.contrastive.knd": "none"}}}, "knd"),
    ({"seeds": [0], "variants": {"a": {}}, "metrics": ["best_nothing_acc"]}, "best_nothing_acc"),
])
def test_bad_ablation_input_is_a_clear_error(ablation, message):
    with pytest.raises(ConfigError, match=message):
        validate_ablation(small_config(**{"ablation": ablation}))


def test_shipped_ablation_files_validate():
    for name in ("digits", "cifar100"):
        cfg = load_config(REPO / "ablations" / f"{name}.yaml")
        ablation = validate_ablation(cfg)
        assert ablation.baseline in ablation.variants
    cifar = load_config(REPO / "ablations" / "cifar100.yaml").ablation
    assert {"crdnd", "no_compensation", "no_contrastive", "rslad_backbone", "transition", "relation", "sat", "ard",
            "rslad", "iad", "adaad"} <= set(cifar.variants)


@pytest.mark.slow
def test_resumed_ablation_skips_finished_cells(tmp_path, digits_teacher):
    folder = tmp_path / "ablation"
    command = ["ablate", str(REPO / "ablations" / "digits.yaml"), "--set", "tracking.enabled=false",
               "--set", f"teacher.checkpoint={digits_teacher}", "--set", "train.epochs=2",
               "--set", "eval.epoch_limit=32", "--set", "eval.final_limit=32", "--set", "ablation.seeds=[0, 1]",
               "--set", "ablation.max_concurrent=1", "--set", "attack.steps=2",
               "--set", "eval.final_attacks=[clean, pgd20]", "--set", "ablation.metrics=[best_pgd20_acc]",
               "--set", "ablation.variants={crdnd: {}, rslad_backbone: {method.compensation.kind: none, "
                        "method.contrastive.kind: none}}"]
    before, after = interrupt_then_resume(command, folder, tmp_path, finished=1)
    assert 1 <= len(before) < 4
    assert len(after) == 4
    assert all(after[trial] == mtime for trial, mtime in before.items())
    table = pd.read_csv(folder / "ablation.csv")
    assert (table["n"] == 2).all()
