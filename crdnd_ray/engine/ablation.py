"""The ablation study: component switches × seeds as a grid of Tune trials, and an honest table.

Each cell (variant, seed) is one trial of :func:`crdnd_ray.engine.trials.run_trials` (same resources, failure
handling, MLflow recording and ``--resume`` as a sweep). The table reports, per variant and metric, the mean ± standard
deviation over seeds, n, and the paired difference to the baseline variant with a p-value: a paired
t-test over seeds when at least 3 pairs exist, otherwise a sign test, flagged as too small to mean much.
A failed cell stays in the table as failed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from crdnd_ray import plots, tables
from crdnd_ray.analysis import mean, paired_difference, std
from crdnd_ray.config import AblationConfig, ConfigError, RunConfig, load_config
from crdnd_ray.engine.preflight import check_config
from crdnd_ray.engine.teachers import prepare_teacher
from crdnd_ray.engine.trials import TrialSpec, run_trials

__all__ = ["ablation_table", "ablation_trial_spec", "base_config_from_sweep", "markdown_table", "run_ablation",
           "validate_ablation"]


def validate_ablation(cfg: RunConfig) -> AblationConfig:
    """Check the ``ablation`` section: each variant's overrides must give a valid config; metrics must exist."""
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
    return ablation


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


def ablation_trial_spec(ablation: AblationConfig):
    """How a grid cell ``{"variant", "seed"}`` becomes a run: the variant's overrides plus the seed."""
    variants = {name: dict(overrides or {}) for name, overrides in ablation.variants.items()}

    def overrides(config: dict[str, Any]) -> dict[str, Any]:
        cell = config["cell"]
        return {**variants[cell["variant"]], "experiment.seed": cell["seed"]}

    return TrialSpec(
        overrides=overrides,
        name=lambda trial: f"{trial.config['cell']['variant']}/seed={trial.config['cell']['seed']}",
        tags=lambda config: {"variant": config["cell"]["variant"], "seed": str(config["cell"]["seed"])},
        shown_tags=("variant", "seed"),
    )


def ablation_table(rows: list[dict[str, Any]], ablation: AblationConfig) -> pd.DataFrame:
    """Per variant and metric: n, failed, mean, std, and the paired difference to the baseline with a p-value."""
    by_variant: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in ablation.variants}
    for row in rows:
        by_variant.setdefault(row["variant"], {})[int(row["seed"])] = row
    records = []
    for variant, cells in by_variant.items():
        for metric in ablation.metrics:
            values = {seed: float(row[metric]) for seed, row in cells.items()
                      if row["status"] == "finished" and _finite(row.get(metric))}
            failed = sorted(seed for seed, row in cells.items() if row["status"] == "failed")
            record: dict[str, Any] = {
                "variant": variant, "metric": metric, "n": len(values),
                "mean": mean(list(values.values())), "std": std(list(values.values())),
                "failed_seeds": ",".join(map(str, failed)),
                "missing_seeds": ",".join(str(s) for s in ablation.seeds if s not in values and s not in failed),
                "status": "failed" if not values and failed else ("partial" if failed else "ok"),
                "delta": math.nan, "p_value": math.nan, "test": "",
            }
            if ablation.baseline and variant != ablation.baseline:
                base = by_variant.get(ablation.baseline, {})
                pairs = [(values[s], float(base[s][metric])) for s in values
                         if s in base and base[s]["status"] == "finished" and _finite(base[s].get(metric))]
                if pairs:
                    record.update(paired_difference(pairs))
            records.append(record)
    return pd.DataFrame.from_records(records)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def markdown_table(table: pd.DataFrame, ablation: AblationConfig) -> str:
    """A wide Markdown table: one row per variant, ``mean ± std`` and the difference to the baseline per metric."""
    header = ["variant", "n"] + [f"{m}" for m in ablation.metrics]
    if ablation.baseline:
        header += [f"Δ {m} (p)" for m in ablation.metrics]
    header.append("status")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = set()
    for variant in table["variant"].unique():
        part = table[table["variant"] == variant].set_index("metric")
        cells = [variant + (" (baseline)" if variant == ablation.baseline else ""), str(int(part["n"].max()))]
        cells += [f"{part.loc[m, 'mean']:.2f} ± {part.loc[m, 'std']:.2f}" if part.loc[m, "n"] else "failed"
                  for m in ablation.metrics]
        if ablation.baseline:
            for m in ablation.metrics:
                delta, p, test = part.loc[m, "delta"], part.loc[m, "p_value"], part.loc[m, "test"]
                cells.append("" if not _finite(delta) else f"{delta:+.2f} (p={p:.3g}{'†' if 'sign' in test else ''})")
                if "sign" in test:
                    notes.add("† sign test: fewer than 3 paired seeds, too few for a t-test; not conclusive.")
        failed = ",".join(sorted({s for s in part["failed_seeds"] if s}))
        cells.append(f"failed seeds: {failed}" if failed else "ok")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + sorted(notes)) + "\n"


def run_ablation(cfg: RunConfig, folder: Path, resume: bool = False,
                 printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every (variant, seed) cell and write the table (Markdown, CSV, Parquet) and a bar plot."""
    from ray import tune

    ablation = validate_ablation(cfg)
    if ablation.from_sweep:
        cfg = base_config_from_sweep(cfg, ablation.from_sweep)
        ablation = validate_ablation(cfg)
    teacher_path = prepare_teacher(cfg, printer)
    cells = [{"variant": name, "seed": seed} for name in ablation.variants for seed in ablation.seeds]
    result = run_trials(
        cfg, folder, kind="ablation", param_space={"cell": tune.grid_search(cells)},
        spec=ablation_trial_spec(ablation), num_samples=1, max_concurrent=ablation.max_concurrent,
        metrics=ablation.metrics, modes=["max"] * len(ablation.metrics), resume=resume,
        teacher_path=teacher_path, printer=printer,
        parent_params={"ablation.variants": ",".join(ablation.variants), "ablation.seeds": ablation.seeds,
                       "ablation.baseline": ablation.baseline},
    )
    rows = result.rows
    table = ablation_table(rows, ablation)
    files = [folder / "ablation.csv", folder / "ablation.parquet", folder / "cells.csv"]
    tables.write_table(table, files[0])
    tables.write_table(table, files[1])
    tables.write_table(pd.DataFrame(rows), files[2])
    markdown = markdown_table(table, ablation)
    (folder / "ablation.md").write_text(markdown)
    files.append(folder / "ablation.md")
    plotted = table[table["n"] > 0]
    if not plotted.empty:
        plots.bar_plot_with_errors(plotted, folder / "ablation.png")
        files.append(folder / "ablation.png")
    result.attach(files)
    result.raise_if_interrupted()
    return {"rows": rows, "table": table, "markdown": markdown, "files": files, "parent_run_id": result.parent_run_id}
