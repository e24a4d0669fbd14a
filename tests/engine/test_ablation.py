"""The ablation engine: equal-budget tuning, the table and its statistics against MLflow, failed cells, resume,
dry runs and bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from conftest import REPO, interrupt_then_resume, small_config
from crdnd_ray.cli import app
from crdnd_ray.config import ConfigError, load_config
from crdnd_ray.engine.ablation import ablation_table, markdown_table, run_ablation, validate_ablation, variant_tuning


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
    cfg = ablation_config(tmp_path, **{"teacher.checkpoint": str(digits_teacher), "eval.verify": True})
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

    # eval.verify: each healthy variant's best seed (by the first metric) is verified, in MLflow and under the table.
    verified = runs[runs["tags.verify"].notna()] if "tags.verify" in runs else runs.iloc[:0]
    assert sorted(verified["tags.variant"]) == ["crdnd", "no_contrastive"]
    for _, run in verified.iterrows():
        seeds = runs[runs["tags.variant"] == run["tags.variant"]]
        assert float(run["metrics.best_clean_acc"]) == seeds["metrics.best_clean_acc"].astype(float).max()
        assert (tmp_path / "ablation" / "trials" / run["tags.trial_id"] / "verify.json").exists()
        assert f"| {run['tags.variant']}/seed={run['tags.seed']} |" in outcome["markdown"]
    assert verified["metrics.verify_autoattack_acc"].notna().all()
    assert "Verified (AutoAttack" in outcome["markdown"]
    cells = pd.read_csv(tmp_path / "ablation" / "cells.csv")
    assert cells["verify"].notna().sum() == 2

    # The parent's compute totals are the sums of its trials' costs.
    parent = mlflow.get_run(outcome["parent_run_id"]).data.metrics
    assert parent["total_images"] == pytest.approx(runs["metrics.cost_images"].fillna(0).sum())
    assert parent["total_device_s"] == pytest.approx(runs["metrics.cost_device_s"].fillna(0).sum())


def holm_reference(p_values: dict) -> dict:
    """Holm's adjustment written from its definition, independently of crdnd_ray.analysis.holm."""
    order = sorted(p_values, key=p_values.get)
    m = len(order)
    return {key: min(1.0, max((m - j) * p_values[order[j]] for j in range(rank + 1))) for rank, key in enumerate(order)}


def table_rows(values: dict[str, dict[str, list[float]]]) -> list[dict]:
    rows = {}
    for variant, by_metric in values.items():
        for metric, series in by_metric.items():
            for seed, value in enumerate(series):
                rows.setdefault((variant, seed), {"variant": variant, "seed": str(seed), "status": "finished"})[metric] = value
    return list(rows.values())


def three_variants(seeds=(0, 1, 2)):
    return small_config(**{"ablation": {"seeds": list(seeds), "baseline": "a",
                                        "metrics": ["best_clean_acc", "best_pgd20_acc"],
                                        "variants": {"a": {}, "b": {}, "c": {}}}}).ablation


VALUES = {"a": {"best_clean_acc": [90.0, 91.0, 92.0], "best_pgd20_acc": [10.0, 12.0, 14.0]},
          "b": {"best_clean_acc": [89.0, 91.5, 90.0], "best_pgd20_acc": [13.0, 14.0, 18.0]},
          "c": {"best_clean_acc": [95.0, 96.0, 94.5], "best_pgd20_acc": [10.5, 12.0, 13.0]}}


def test_table_compares_with_the_baseline_and_adjusts_p_values_over_the_whole_table():
    ablation = three_variants()
    table = ablation_table(table_rows(VALUES), ablation).set_index(["variant", "metric"])
    raw = {(v, m): stats.ttest_rel(VALUES[v][m], VALUES["a"][m]).pvalue for v in "bc" for m in ablation.metrics}
    adjusted = holm_reference(raw)
    for (variant, metric), p in raw.items():
        row = table.loc[(variant, metric)]
        differences = np.subtract(VALUES[variant][metric], VALUES["a"][metric])
        interval = stats.t.interval(0.95, df=2, loc=differences.mean(), scale=stats.sem(differences))
        assert row["mean"] == pytest.approx(np.mean(VALUES[variant][metric]))
        assert row["std"] == pytest.approx(np.std(VALUES[variant][metric], ddof=1))
        assert row["delta"] == pytest.approx(differences.mean())
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(interval)
        assert row["p_value"] == pytest.approx(p) and row["p_holm"] == pytest.approx(adjusted[(variant, metric)])
        assert row["prob_improvement"] == pytest.approx(np.mean(differences > 0) + 0.5 * np.mean(differences == 0))
        assert row["test"] == "paired t-test, n=3"
    assert np.isnan(table.loc[("a", "best_pgd20_acc"), "p_holm"])
    markdown = markdown_table(table.reset_index(), ablation)
    assert "Holm-adjusted over the m = 4 tests" in markdown and "scipy.stats.ttest_rel" in markdown
    assert "n = 3 seeds" in markdown and "Settings: untuned" in markdown
    b_pgd = table.loc[("b", "best_pgd20_acc")]
    assert f"+3.00 [{b_pgd['ci_low']:+.2f}, {b_pgd['ci_high']:+.2f}], p={b_pgd['p_holm']:.2g}, P=1.00" in markdown


def test_with_fewer_than_three_seeds_the_table_says_no_test_was_possible():
    ablation = three_variants(seeds=(0, 1))
    two_seeds = {v: {m: series[:2] for m, series in by_metric.items()} for v, by_metric in VALUES.items()}
    table = ablation_table(table_rows(two_seeds), ablation)
    compared = table[table["variant"] != "a"]
    assert compared[["p_value", "p_holm", "ci_low", "ci_high"]].isna().all().all()
    assert (compared["test"] == "no test: n=2 paired seeds, fewer than 3").all()
    assert compared["delta"].notna().all()
    markdown = markdown_table(table, ablation)
    assert "No test was possible" in markdown and "p=" not in markdown and "(no test)" in markdown


def tuned_ablation(tmp_path, teacher, **overrides):
    """Three variants, each tuned with 3 random trials; ``pinned_lr`` sets train.lr itself."""
    return ablation_config(tmp_path, **{
        "teacher.checkpoint": str(teacher),
        "ablation": {
            "seeds": [0, 1, 2], "baseline": "crdnd", "metrics": ["best_clean_acc", "best_pgd20_acc"],
            "variants": {"crdnd": {}, "no_contrastive": {"method.contrastive.kind": "none"},
                         "pinned_lr": {"train.lr": 0.3}},
            "tune": {"num_samples": 3, "seed": 7, "sampler": {"kind": "random", "seed": 0},
                     "scheduler": {"kind": "none"}, "overrides": {"eval.final_attacks": ["clean"]},
                     "space": {"train.lr": {"type": "loguniform", "low": 0.05, "high": 3.0},
                               "method.contrastive.weight": {"type": "loguniform", "low": 0.05, "high": 2.0,
                                                            "when": {"method.contrastive.kind": ["infonce"]}}}},
        },
        **overrides})


def test_tuning_spaces_drop_pinned_keys_and_decide_conditions_on_fixed_values(tmp_path):
    cfg = tuned_ablation(tmp_path, "unused.pt")
    plans = variant_tuning(cfg, cfg.ablation)
    assert {name: sorted(plan.space) for name, plan in plans.items()} == {
        "crdnd": ["method.contrastive.weight", "train.lr"], "no_contrastive": ["train.lr"],
        "pinned_lr": ["method.contrastive.weight"]}
    assert plans["pinned_lr"].pinned == {"train.lr": 0.3} and plans["pinned_lr"].config.train.lr == 0.3
    assert all(plan.space.get("method.contrastive.weight") is None or plan.space["method.contrastive.weight"].when is None
               for plan in plans.values())
    assert {plan.config.experiment.seed for plan in plans.values()} == {7}
    assert {tuple(plan.config.eval.final_attacks) for plan in plans.values()} == {("clean",)}
    assert cfg.eval.final_attacks == ["clean", "pgd20"]


@pytest.mark.slow
def test_tuned_ablation_tunes_each_variant_equally_and_runs_its_seeds_at_its_best_settings(tmp_path, ray_session,
                                                                                          digits_teacher):
    cfg = tuned_ablation(tmp_path, digits_teacher)
    outcome = run_ablation(cfg, tmp_path / "ablation", printer=lambda line: None)

    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.uri)
    children = mlflow.search_runs(experiment_names=[cfg.experiment.name],
                                  filter_string=f"tags.mlflow.parentRunId = '{outcome['parent_run_id']}'")
    tuning = children[children["tags.stage"] == "tuning"]
    seeds = children[children["tags.stage"] == "seeds"]
    assert tuning.groupby("tags.variant").size().to_dict() == {"crdnd": 3, "no_contrastive": 3, "pinned_lr": 3}
    assert (tuning["tags.seed"] == "7").all() and len(seeds) == 9
    assert tuning["metrics.best_pgd20_acc"].isna().all() and tuning["metrics.best_clean_acc"].notna().all()
    assert seeds["metrics.best_pgd20_acc"].notna().all(), "tune.overrides apply to the tuning trials only"
    pinned = tuning[tuning["tags.variant"] == "pinned_lr"]
    assert (pinned["params.train.lr"].astype(float) == 0.3).all() and pinned["params.sampled.train.lr"].isna().all()
    assert pinned["params.sampled.method.contrastive.weight"].astype(float).nunique() == 3
    assert tuning[tuning["tags.variant"] == "no_contrastive"]["params.sampled.method.contrastive.weight"].isna().all()

    tuned_keys = {"crdnd": ["method.contrastive.weight", "train.lr"], "no_contrastive": ["train.lr"],
                  "pinned_lr": ["method.contrastive.weight"]}
    for variant, keys in tuned_keys.items():
        trials = tuning[(tuning["tags.variant"] == variant) & (tuning["tags.status"] != "failed")]
        best = trials[trials["metrics.epoch_pgd20_acc"] == trials["metrics.epoch_pgd20_acc"].max()]
        runs = seeds[seeds["tags.variant"] == variant]
        settings = outcome["tuning"][variant]["settings"]
        assert sorted(settings) == keys
        assert any(all(float(trial[f"params.sampled.{key}"]) == pytest.approx(settings[key]) for key in keys)
                   for _, trial in best.iterrows())
        for key in keys:
            assert runs[f"params.{key}"].astype(float).tolist() == pytest.approx([settings[key]] * 3)
    assert (seeds[seeds["tags.variant"] == "pinned_lr"]["params.train.lr"].astype(float) == 0.3).all()

    table = outcome["table"].set_index(["variant", "metric"])
    raw = {}
    for variant in ("no_contrastive", "pinned_lr"):
        for metric in ("best_clean_acc", "best_pgd20_acc"):
            ours = seeds[seeds["tags.variant"] == variant].set_index("tags.seed")[f"metrics.{metric}"]
            base = seeds[seeds["tags.variant"] == "crdnd"].set_index("tags.seed")[f"metrics.{metric}"]
            order = sorted(base.index)
            a, b = ours[order].to_numpy(float), base[order].to_numpy(float)
            row = table.loc[(variant, metric)]
            assert row["mean"] == pytest.approx(a.mean()) and row["delta"] == pytest.approx((a - b).mean())
            if np.ptp(a - b) > 0:
                raw[(variant, metric)] = stats.ttest_rel(a, b).pvalue
                interval = stats.t.interval(0.95, df=2, loc=(a - b).mean(), scale=stats.sem(a - b))
                assert (row["ci_low"], row["ci_high"]) == pytest.approx(interval)
            else:
                assert np.isnan(row["p_holm"])
    assert raw, "the variants should differ from the baseline on some metric"
    for key, adjusted in holm_reference(raw).items():
        assert table.loc[key, "p_holm"] == pytest.approx(adjusted)
    markdown = outcome["markdown"]
    assert "tuned with an equal budget" in markdown and "of 3 trials" in markdown and "train.lr=0.3 (pinned)" in markdown
    record = json.loads((tmp_path / "ablation" / "tuning" / "crdnd.json").read_text())
    assert record["trials"] == 3 and record["settings"] == outcome["tuning"]["crdnd"]["settings"]
    assert len(pd.read_csv(tmp_path / "ablation" / "tuning.csv")) == 9


def test_ablation_dry_run_prints_the_tuning_plan_of_the_shipped_files():
    for name in ("digits", "cifar100"):
        result = CliRunner().invoke(app, ["ablate", str(REPO / "ablations" / f"{name}.yaml"), "--dry-run"])
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)["plan"]
        cfg = load_config(REPO / "ablations" / f"{name}.yaml")
        tune = cfg.ablation.tune
        assert plan["kind"] == "ablation" and plan["trials"] == len(cfg.ablation.variants) * len(cfg.ablation.seeds)
        tuning = plan["details"]["tuning"]
        assert tuning["trials_per_variant"] == tune.num_samples
        assert set(tuning["variants"]) == set(cfg.ablation.variants)
        assert all("train.lr" in spec["space"] or "train.lr" in spec["pinned"] for spec in tuning["variants"].values())
        assert tuning["trials"] == tune.num_samples * sum(1 for spec in tuning["variants"].values() if spec["space"])


@pytest.mark.parametrize("ablation, message", [
    ({"seeds": [], "variants": {"a": {}}}, "seeds"),
    ({"seeds": [0], "variants": {"a": {}}, "baseline": "zzz"}, "baseline"),
    ({"seeds": [0], "variants": {"a": {"method.contrastive.knd": "none"}}}, "knd"),
    ({"seeds": [0], "variants": {"a": {}}, "metrics": ["best_nothing_acc"]}, "best_nothing_acc"),
    ({"seeds": [0], "variants": {"a": {}}, "metrics": ["best_pgd20_acc"], "tune": {"seed": 0, "space": {"train.lr": {"type": "loguniform", "low": 0.1,
                                                                                    "high": 1}}}}, "tune.seed 0"),
    ({"seeds": [0], "variants": {"a": {}}, "metrics": ["best_pgd20_acc"], "tune": {"space": {}}}, "nothing to tune"),
    ({"seeds": [0], "variants": {"a": {}}, "metrics": ["best_pgd20_acc"], "tune": {"variant_space": {"b": {}}, "space": {"train.lr": {
        "type": "loguniform", "low": 0.1, "high": 1}}}}, "variant_space names b"),
    ({"seeds": [0], "variants": {"a": {}}, "metrics": ["best_pgd20_acc"], "tune": {"metric": "best_pgd20_acc", "space": {"train.lr": {
        "type": "loguniform", "low": 0.1, "high": 1}}}}, "best_pgd20_acc"),
    ({"seeds": [0], "variants": {"a": {}}, "metrics": ["best_pgd20_acc"], "tune": {"space": {"train.lr": {"type": "loguniform", "low": 0.1, "high": 1,
                                                                           "when": {"method.nothing": ["x"]}}}}},
     "method.nothing"),
    ({"seeds": [0], "variants": {"a": {}}, "metrics": ["best_pgd20_acc"], "tune": {"space": {"method.comp.kind": {"type": "choice",
                                                                                   "values": ["none"]}}}}, "comp"),
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
               "--set", f"teacher.checkpoint={digits_teacher}", "--set", "train.epochs=2", "--set", "ablation.tune=null",
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


@pytest.mark.slow
def test_resumed_tuned_ablation_keeps_each_budget_and_reruns_nothing(tmp_path, digits_teacher):
    folder = tmp_path / "ablation"
    command = ["ablate", str(REPO / "ablations" / "digits.yaml"), "--set", "tracking.enabled=false",
               "--set", f"teacher.checkpoint={digits_teacher}", "--set", "train.epochs=2",
               "--set", "eval.epoch_limit=32", "--set", "eval.final_limit=32", "--set", "ablation.seeds=[0, 1]",
               "--set", "ablation.max_concurrent=1", "--set", "ablation.tune.max_concurrent=1",
               "--set", "ablation.tune.num_samples=3", "--set", "attack.steps=2",
               "--set", "eval.final_attacks=[clean, pgd20]", "--set", "ablation.metrics=[best_pgd20_acc]",
               "--set", "ablation.variants={crdnd: {}, rslad: {method.name: rslad}}"]
    before, after = interrupt_then_resume(command, folder, tmp_path, finished=2)
    assert 2 <= len(before) < 10
    assert len(after) == 2 * 3 + 2 * 2, "3 tuning trials per variant, then 2 seeds per variant"
    assert all(after[trial] == mtime for trial, mtime in before.items())
    cells = pd.read_csv(folder / "cells.csv")
    for variant in ("crdnd", "rslad"):
        record = json.loads((folder / "tuning" / f"{variant}.json").read_text())
        assert record["trials"] == 3 and sorted(record["settings"]) == ["train.lr"]
        best = max(record["rows"], key=lambda row: row["epoch_pgd20_acc"])
        assert record["settings"]["train.lr"] == pytest.approx(best["param.train.lr"])
        assert cells[cells["variant"] == variant]["param.train.lr"].tolist() == pytest.approx(
            [record["settings"]["train.lr"]] * 2)
