"""The ablation study: component switches × seeds as Tune trials, each variant optionally tuned first.

Without ``ablation.tune`` every cell (variant, seed) runs at the file's fixed values plus the variant's
overrides ("untuned"). With it, each variant is first tuned on its own with the same budget — the sweep
machinery (:func:`crdnd_ray.engine.sweep.run_search`): ``tune.num_samples`` Optuna trials with the same sampler,
scheduler and metric, trained with ``tune.seed`` — and its seeds then run at its best settings. Both stages are
trials of :func:`crdnd_ray.engine.trials.run_trials` under one MLflow parent run (children tagged ``variant``
and ``stage: tuning|seeds``), and ``--resume`` continues either stage.

The table reports per variant and metric the mean ± std over seeds and, against the baseline, the mean
paired difference with its 95 % t interval, a paired t-test's p-value adjusted with Holm over every comparison
of the table, and the probability of improvement; its notes name the tests, n, the correction and the tuning
budget with each variant's chosen settings. A failed cell stays in the table as failed.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from crdnd_ray import plots, tables
from crdnd_ray.analysis import MIN_TEST_PAIRS, holm, mean, metric_mode, paired_difference, std
from crdnd_ray.config import AblationConfig, ConfigError, ParameterSpec, RunConfig, flatten, load_config
from crdnd_ray.engine.cost import totals
from crdnd_ray.engine.preflight import check_config
from crdnd_ray.engine.sweep import best_row, check_search, resolve_space, run_search
from crdnd_ray.engine.teachers import prepare_teacher
from crdnd_ray.engine.trials import TrialSpec, TrialsPlan, plan_trials, run_trials, start_parent
from crdnd_ray.engine.verify import VERIFY_COLUMNS, ablation_choice, verify_rows
from crdnd_ray.tracking.uris import TrackingUnavailable

__all__ = ["VariantTuning", "ablation_table", "ablation_trial_spec", "base_config_from_sweep", "markdown_table",
           "plan_ablation", "run_ablation", "tune_variants", "validate_ablation", "variant_tuning"]


@dataclass
class VariantTuning:
    """What tuning searches for one variant: the config its tuning trials start from (the variant's overrides
    and the tuning seed applied), the space left to tune, and the keys the variant pins."""

    config: RunConfig
    space: dict[str, ParameterSpec]
    pinned: dict[str, Any]


def validate_ablation(cfg: RunConfig) -> AblationConfig:
    """Check the ``ablation`` section: each variant's overrides must give a valid config, metrics must exist, and
    ``tune`` must name config values and a metric reported every epoch."""
    ablation = cfg.ablation
    if ablation is None:
        raise ConfigError("This file has no 'ablation:' section. Add one (see ablations/digits.yaml) with "
                          "seeds, variants and a baseline.")
    for name, overrides in ablation.variants.items():
        try:
            cfg.with_overrides(dict(overrides or {}), source=f"ablation.variants.{name}")
        except ConfigError as error:
            raise ConfigError(f"ablation variant '{name}' is invalid: {error}") from None
    check_config(cfg)
    known = ({f"epoch_{a}_acc" for a in cfg.eval.epoch_attacks}
             | {f"{w}_{a}_acc" for w in ("best", "last") for a in cfg.eval.final_attack_names})
    for metric in ablation.metrics:
        if metric not in known:
            raise ConfigError(f"ablation.metrics: '{metric}' is not a metric the runs report; choose from "
                              f"{', '.join(sorted(known))}.")
    if ablation.tune is not None:
        check_search(cfg, ablation.tune, "ablation.tune")
        variant_tuning(cfg, ablation)
    return ablation


def variant_tuning(cfg: RunConfig, ablation: AblationConfig) -> dict[str, VariantTuning]:
    """Per variant, the config its tuning trials start from (``tune.overrides``, the variant's overrides, the
    tuning seed), the resolved space they search (shared space plus its extras, without the keys its overrides
    pin, conditions on fixed keys decided by its config) and the pinned values."""
    tune = ablation.tune
    assert tune is not None
    plans = {}
    for name, raw in ablation.variants.items():
        overrides = dict(raw or {})
        full = {**tune.space, **tune.variant_space.get(name, {})}
        set_by_variant = flatten(overrides)
        pinned = {key: set_by_variant[key] for key in full if key in set_by_variant}
        variant_cfg = cfg.with_overrides({**tune.overrides, **overrides, "experiment.seed": tune.seed},
                                         source=f"ablation.tune.overrides and ablation.variants.{name}")
        space = resolve_space(variant_cfg, full, f"ablation.tune (variant '{name}')", pinned=pinned)
        plans[name] = VariantTuning(config=variant_cfg, space=space, pinned=pinned)
    return plans


def base_config_from_sweep(cfg: RunConfig, source: str) -> RunConfig:
    """The sweep's best config as the ablation's base, keeping this file's ablation, tracking and experiment.

    ``source`` is a sweep output folder (holding ``best.yaml``) or an MLflow parent run id whose artifacts
    hold ``best.yaml``.
    """
    folder = Path(source)
    if folder.is_dir():
        best = folder / "best.yaml"
    else:
        from crdnd_ray.tracking.store import download_artifact

        try:
            best = download_artifact(cfg.tracking, source, "best.yaml")
        except Exception as error:
            raise ConfigError(f"ablation.from_sweep '{source}' is neither a sweep folder nor an MLflow run with a "
                              f"best.yaml artifact ({error}).") from None
    if not best.exists():
        raise ConfigError(f"ablation.from_sweep: '{best}' does not exist; run the sweep first or point to its folder.")
    swept = load_config(best)
    return swept.with_overrides({"ablation": cfg.ablation.model_dump(mode="json") if cfg.ablation else None,
                                 "tracking": cfg.tracking.model_dump(mode="json"),
                                 "experiment.name": cfg.experiment.name}, source="ablation.from_sweep")


def ablation_trial_spec(ablation: AblationConfig) -> TrialSpec:
    """How a grid cell ``{"variant", "seed", "settings"}`` becomes a run: the variant's overrides, its tuned
    settings (none when untuned) and the seed."""
    variants = {name: dict(overrides or {}) for name, overrides in ablation.variants.items()}

    def overrides(config: dict[str, Any]) -> dict[str, Any]:
        cell = config["cell"]
        return {**variants[cell["variant"]], **cell.get("settings", {}), "experiment.seed": cell["seed"]}

    return TrialSpec(
        overrides=overrides,
        name=lambda trial: f"{trial.config['cell']['variant']}/seed={trial.config['cell']['seed']}",
        tags=lambda config: {"variant": config["cell"]["variant"], "seed": str(config["cell"]["seed"]),
                             "stage": "seeds"},
        shown_tags=("variant", "seed", "stage"),
    )


def _tuning_trial_spec(variant: str) -> TrialSpec:
    return TrialSpec(overrides=lambda config: dict(config), name=lambda trial: f"{variant}/tune-{trial.trial_id}",
                     tags=lambda config: {"variant": variant, "stage": "tuning"}, shown_tags=("variant", "stage"))


def tune_variants(cfg: RunConfig, folder: Path, ablation: AblationConfig, parent_run_id: str | None,
                  teacher_path: Path | None, resume: bool, printer: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Tune every variant on its own with the same budget; return per variant what tuning chose.

    Each record (also written to ``<folder>/tuning/<variant>.json``, which marks the variant as tuned for
    ``--resume``) holds the ``settings`` chosen, the keys ``tuned`` and ``pinned``, the trials' statuses, the
    epochs they ran, the best trial and its metric value, and the trials' rows.
    """
    tune = ablation.tune
    assert tune is not None
    records = {}
    for name, plan in variant_tuning(cfg, ablation).items():
        path = folder / "tuning" / f"{name}.json"
        if resume and path.exists():
            records[name] = json.loads(path.read_text())
            continue
        rows: list[dict[str, Any]] = []
        if plan.space:
            result = run_search(plan.config, folder, tune, plan.space, kind="ablation", experiment=f"tuning-{name}",
                                spec=_tuning_trial_spec(name), resume=resume,
                                teacher_path=teacher_path, printer=printer, parent_run_id=parent_run_id)
            result.raise_if_interrupted()
            rows = result.rows
        best = best_row(rows, tune.metric, tune.mode)
        records[name] = {
            "variant": name, "tuned": sorted(plan.space), "pinned": plan.pinned,
            "settings": {key: best[f"param.{key}"] for key in plan.space if f"param.{key}" in best} if best else {},
            "trials": len(rows), "statuses": dict(Counter(row["status"] for row in rows)),
            "epochs": int(sum(row["epochs"] for row in rows)), "metric": tune.metric,
            "best_trial": best["trial_id"] if best else None, "best_value": best[tune.metric] if best else None,
            "rows": rows,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records[name], indent=2, default=str))
    return records


def ablation_table(rows: list[dict[str, Any]], ablation: AblationConfig) -> pd.DataFrame:
    """Per variant and metric: n, failed, mean, std and, against the baseline, the paired comparison of
    :func:`crdnd_ray.analysis.paired_difference` with ``p_holm``, its p-value adjusted over the whole table."""
    by_variant: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in ablation.variants}
    for row in rows:
        by_variant.setdefault(row["variant"], {})[int(row["seed"])] = row
    records = []
    for variant, cells in by_variant.items():
        for metric in ablation.metrics:
            values = _finished_values(cells, metric)
            failed = sorted(seed for seed, row in cells.items() if row["status"] == "failed")
            record: dict[str, Any] = {
                "variant": variant, "metric": metric, "n": len(values),
                "mean": mean(list(values.values())), "std": std(list(values.values())),
                "failed_seeds": ",".join(map(str, failed)),
                "missing_seeds": ",".join(str(s) for s in ablation.seeds if s not in values and s not in failed),
                "status": "failed" if not values and failed else ("partial" if failed else "ok"),
                "n_pairs": 0, "delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan,
                "prob_improvement": math.nan, "test": "",
            }
            if ablation.baseline and variant != ablation.baseline:
                base = _finished_values(by_variant.get(ablation.baseline, {}), metric)
                pairs = [(values[seed], base[seed]) for seed in values if seed in base]
                if pairs:
                    compared = paired_difference(pairs, mode=metric_mode(metric))
                    record.update({key: value for key, value in compared.items() if key != "n"}, n_pairs=compared["n"])
            records.append(record)
    table = pd.DataFrame.from_records(records)
    table["p_holm"] = holm(table["p_value"].tolist())
    return table


def _finished_values(cells: dict[int, dict[str, Any]], metric: str) -> dict[int, float]:
    return {seed: float(row[metric]) for seed, row in cells.items()
            if row["status"] == "finished" and _finite(row.get(metric))}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(table: pd.DataFrame, ablation: AblationConfig,
                   tuning: dict[str, dict[str, Any]] | None = None, rows: list[dict[str, Any]] | None = None) -> str:
    """The table as Markdown: per variant ``mean ± std`` and the comparison to the baseline per metric, notes on
    the statistics, the settings (untuned, or the tuning budget with each variant's chosen settings) and, for
    the cells in ``rows`` that were verified (``eval.verify``), their verified numbers."""
    header = ["variant", "n"] + list(ablation.metrics)
    if ablation.baseline:
        header += [f"Δ {m} [95 % CI], p_Holm, P" for m in ablation.metrics]
    header.append("status")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in table["variant"].unique():
        part = table[table["variant"] == variant].set_index("metric")
        cells = [variant + (" (baseline)" if variant == ablation.baseline else ""), str(int(part["n"].max()))]
        cells += [f"{part.loc[m, 'mean']:.2f} ± {part.loc[m, 'std']:.2f}" if part.loc[m, "n"] else "failed"
                  for m in ablation.metrics]
        if ablation.baseline:
            cells += [_comparison_cell(part.loc[m]) for m in ablation.metrics]
        failed = ",".join(sorted({s for s in part["failed_seeds"] if s}))
        cells.append(f"failed seeds: {failed}" if failed else "ok")
        lines.append("| " + " | ".join(cells) + " |")
    notes = _statistics_notes(table, ablation) if ablation.baseline else []
    verified = _verification_notes(rows or [])
    return "\n".join(lines + [""] + notes + [""] + _settings_notes(ablation, tuning) + verified) + "\n"


def _verification_notes(rows: list[dict[str, Any]]) -> list[str]:
    verified = [row for row in rows if row.get("verify")]
    if not verified:
        return []
    autoattack, gap, worst = VERIFY_COLUMNS
    lines = ["", "Verified (AutoAttack and the gradient-masking checks of `crdnd-ray verify`, best checkpoint):", "",
             "| cell | AutoAttack | PGD-20 − AutoAttack | worst case | verdict |", "|---|---|---|---|---|"]
    for row in verified:
        lines.append(f"| {row['trial']} | {_number(row.get(autoattack))} | {_number(row.get(gap))} "
                     f"| {_number(row.get(worst))} | {row['verify']} |")
    return lines


def _number(value: Any) -> str:
    return f"{value:.2f}" if _finite(value) else "-"


def _signed(value: float) -> str:
    return f"{round(value, 2) + 0.0:+.2f}"


def _comparison_cell(row: pd.Series) -> str:
    if not _finite(row["delta"]):
        return ""
    if not _finite(row["p_holm"]):
        return f"{_signed(row['delta'])} (no test), P={row['prob_improvement']:.2f}"
    return (f"{_signed(row['delta'])} [{_signed(row['ci_low'])}, {_signed(row['ci_high'])}], p={row['p_holm']:.2g}, "
            f"P={row['prob_improvement']:.2f}")


def _statistics_notes(table: pd.DataFrame, ablation: AblationConfig) -> list[str]:
    compared = table[table["n_pairs"] > 0]
    if compared.empty:
        return [f"No comparison with the baseline '{ablation.baseline}': no variant has a finished seed paired "
                "with one of the baseline's."]
    tested = compared[compared["p_value"].map(_finite)]
    sizes = sorted({int(n) for n in compared["n_pairs"]})
    n_text = f"n = {sizes[0]}" if len(sizes) == 1 else f"n = {sizes[0]}–{sizes[-1]}"
    notes = [f"Δ: mean paired difference (variant − {ablation.baseline}) over {n_text} seeds run by both. "
             "P: share of those seeds where the variant beats the baseline (ties count ½)."]
    if tested.empty:
        notes.append(f"No test was possible: a paired t-test needs at least {MIN_TEST_PAIRS} paired seeds with "
                     "differences that vary; Δ and P are descriptive only.")
        return notes
    notes.append(f"95 % CI: t interval of Δ (n − 1 degrees of freedom); p: two-sided paired t-test "
                 f"(scipy.stats.ttest_rel), Holm-adjusted over the m = {len(tested)} tests of this table.")
    untested = compared[~compared["p_value"].map(_finite)]
    if not untested.empty:
        notes.append("No test for " + "; ".join(f"{row.variant} {row.metric} ({row.test.removeprefix('no test: ')})"
                                                 for row in untested.itertuples()) + ".")
    return notes


def _settings_notes(ablation: AblationConfig, tuning: dict[str, dict[str, Any]] | None) -> list[str]:
    if not tuning:
        return ["Settings: untuned — every variant ran at the file's fixed values plus its own overrides (no "
                "equal-budget tuning: methods whose loss scales differ are then compared at one learning rate)."]
    tune = ablation.tune
    assert tune is not None
    scheduler = ("no early stopping" if tune.scheduler.kind == "none" else
                 f"ASHA (grace {tune.scheduler.grace_period}, reduction {tune.scheduler.reduction_factor:g}"
                 + (f", max_t {tune.scheduler.max_t}" if tune.scheduler.max_t else "") + ")")
    startup = (f", {tune.sampler.startup_trials} random start-up trials" if tune.sampler.startup_trials else "")
    lines = [f"Settings: tuned with an equal budget — each variant had its own {tune.sampler.kind} search "
             f"(seed {tune.sampler.seed}{startup}) of {tune.num_samples} trials, {scheduler}, on {tune.metric} "
             f"({tune.mode}), training seed {tune.seed}; its seeds then ran at its best trial's settings.", "",
             f"| variant | tuned | chosen settings | best {tune.metric} | trials (finished/stopped/failed) | epochs |",
             "|---|---|---|---|---|---|"]
    for name in ablation.variants:
        record = tuning[name]
        statuses = record["statuses"]
        chosen = ", ".join(f"{key}={_value(value)}" for key, value in record["settings"].items())
        pinned = ", ".join(f"{key}={_value(value)} (pinned)" for key, value in record["pinned"].items())
        if not record["tuned"]:
            chosen = "nothing to tune"
        elif not record["settings"]:
            chosen = "no trial finished: fixed values used"
        best = record["best_value"]
        lines.append(f"| {name} | {', '.join(record['tuned']) or '-'} | {'; '.join(p for p in (chosen, pinned) if p)} "
                     f"| {_number(best)} | {record['trials']} "
                     f"({statuses.get('finished', 0)}/{statuses.get('stopped_early', 0)}/{statuses.get('failed', 0)}) "
                     f"| {record['epochs']} |")
    return lines


def plan_ablation(cfg: RunConfig) -> TrialsPlan:
    """Validate the ablation and size its trials without starting anything heavy (what ``--dry-run`` prints).

    ``trials`` counts the seeds stage (variants × seeds); ``details["tuning"]`` the tuning stage: per variant
    its budget, the space it tunes and the keys it pins, or ``"untuned"``.
    """
    ablation = validate_ablation(cfg)
    if ablation.from_sweep:
        cfg = base_config_from_sweep(cfg, ablation.from_sweep)
        ablation = validate_ablation(cfg)
    details: dict[str, Any] = {"variants": ablation.variants, "seeds": ablation.seeds, "baseline": ablation.baseline,
                               "metrics": ablation.metrics, "tuning": "untuned"}
    tune = ablation.tune
    if tune is not None:
        plans = variant_tuning(cfg, ablation)
        trials = tune.num_samples * sum(1 for plan in plans.values() if plan.space)
        stage = plan_trials(cfg, "tuning", trials, tune.max_concurrent)
        details["tuning"] = {
            "trials_per_variant": tune.num_samples, "trials": trials, "concurrent": stage.concurrent,
            "resources": stage.resources, "epochs_at_most": trials * (tune.scheduler.max_t or cfg.train.epochs),
            "metric": tune.metric, "mode": tune.mode, "seed": tune.seed, "sampler": tune.sampler.model_dump(),
            "scheduler": tune.scheduler.model_dump(),
            "variants": {name: {"space": {k: v.model_dump(exclude_none=True) for k, v in plan.space.items()},
                                "pinned": plan.pinned} for name, plan in plans.items()},
        }
    return plan_trials(cfg, "ablation", len(ablation.variants) * len(ablation.seeds), ablation.max_concurrent,
                       details=details)


def run_ablation(cfg: RunConfig, folder: Path, resume: bool = False,
                 printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Tune each variant (with ``ablation.tune``), run every (variant, seed) cell and write the table (Markdown,
    CSV, Parquet), the cells, the tuning trials and a bar plot."""
    from ray import tune as ray_tune

    ablation = validate_ablation(cfg)
    if ablation.from_sweep:
        cfg = base_config_from_sweep(cfg, ablation.from_sweep)
        ablation = validate_ablation(cfg)
    teacher_path = prepare_teacher(cfg, printer)
    params = {"ablation.variants": ",".join(ablation.variants), "ablation.seeds": ablation.seeds,
              "ablation.baseline": ablation.baseline, "ablation.tuned": ablation.tune is not None}
    if ablation.tune is not None:
        params.update({f"ablation.tune.{k}": v for k, v in flatten(ablation.tune.model_dump(mode="json")).items()})
    recorder, parent_run_id = start_parent(cfg, folder, "ablation", resume, params)
    tuning = None
    if ablation.tune is not None:
        tuning = tune_variants(cfg, folder, ablation, parent_run_id, teacher_path, resume, printer)
        if recorder is not None and parent_run_id is not None:
            chosen = {f"tuned.{name}.{key}": value for name, record in tuning.items()
                      for key, value in record["settings"].items()}
            try:
                recorder.log_params(parent_run_id, chosen)
            except TrackingUnavailable:
                printer("the tracking store does not answer: the chosen settings are in the tuning/ folder")
    cells = [{"variant": name, "seed": seed, "settings": tuning[name]["settings"] if tuning else {}}
             for name in ablation.variants for seed in ablation.seeds]
    result = run_trials(
        cfg, folder, kind="ablation", param_space={"cell": ray_tune.grid_search(cells)},
        spec=ablation_trial_spec(ablation), num_samples=1, max_concurrent=ablation.max_concurrent,
        metrics=ablation.metrics, modes=[metric_mode(m) for m in ablation.metrics], resume=resume,
        teacher_path=teacher_path, printer=printer, parent_run_id=parent_run_id,
    )
    rows = result.rows
    if cfg.eval.verify and not result.interrupted:
        verify_rows(folder, rows, ablation_choice(rows, cfg), result.recorder, result.parent_run_id, printer)
    table = ablation_table(rows, ablation)
    files = [folder / "ablation.csv", folder / "ablation.parquet", folder / "cells.csv"]
    tables.write_table(table, files[0])
    tables.write_table(table, files[1])
    tables.write_table(pd.DataFrame(rows), files[2])
    if tuning:
        files.append(tables.write_table(pd.DataFrame([row for record in tuning.values() for row in record["rows"]]),
                                        folder / "tuning.csv"))
    markdown = markdown_table(table, ablation, tuning, rows)
    (folder / "ablation.md").write_text(markdown)
    files.append(folder / "ablation.md")
    plotted = table[table["n"] > 0]
    if not plotted.empty:
        plots.bar_plot_with_errors(plotted, folder / "ablation.png")
        files.append(folder / "ablation.png")
    result.attach(files, totals(rows + [row for record in (tuning or {}).values() for row in record["rows"]]))
    result.raise_if_interrupted()
    result.finish_parent()
    return {"rows": rows, "table": table, "markdown": markdown, "files": files, "parent_run_id": parent_run_id,
            "tuning": tuning}
