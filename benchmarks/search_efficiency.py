"""Search efficiency on the embedded default: TPE with and without ASHA against random search, on the digits
space with the learning rate in it.

For each sweep seed three searches run ``--trials`` trials of ``search_spaces/digits.yaml`` through the real
engine (:func:`crdnd_ray.engine.sweep.run_search`), 2 at a time: random search (Optuna's ``RandomSampler``),
TPE (the file's sampler, with its start-up trials) and TPE with ASHA (grace period 3, reduction factor 2);
without ASHA every trial trains all its epochs. A Tune callback counts every epoch that any trial trains; a
trial's value is its last report's ``epoch_pgd20_acc`` (the sweep's objective). Per seed the benchmark reports random
search's best value and, for each search, the training epochs it had spent — over all its trials, in the order
they ran — when one of its trials first ended (finished or stopped) at or above that value ("not reached" when
none did). Printed and written to ``benchmarks/results/search_efficiency.json``.

    .venv/bin/python benchmarks/search_efficiency.py [--seeds 0 1 2] [--trials 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


SEARCHES = {
    "random": {"search.sampler.kind": "random", "search.scheduler": {"kind": "none"}},
    "tpe": {"search.sampler.kind": "tpe", "search.scheduler": {"kind": "none"}},
    "tpe+asha": {"search.sampler.kind": "tpe",
                 "search.scheduler": {"kind": "asha", "grace_period": 3, "reduction_factor": 2}},
}
"""Each search as overrides of the file's ``search`` section (its space and TPE start-up trials are kept)."""


def sweep(kind: str, seed: int, trials: int, teacher: Path) -> dict[str, Any]:
    """One search of ``trials`` trials with the settings of ``SEARCHES[kind]``."""
    from ray import tune

    from crdnd_ray.config import load_config
    from crdnd_ray.engine.sweep import resolve_space, run_search
    from crdnd_ray.engine.trials import TrialSpec

    cfg = load_config(REPO / "search_spaces" / "digits.yaml", {
        "tracking.enabled": False, "search.num_samples": trials, "search.sampler.seed": seed,
        "teacher.checkpoint": str(teacher), **SEARCHES[kind]})
    events: list[tuple[float, str, str]] = []
    finals: dict[str, float] = {}

    class Clock(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            events.append((time.perf_counter(), "epoch", trial.trial_id))

        def on_trial_complete(self, iteration, trials, trial, **info):
            finals[trial.trial_id] = float((trial.last_result or {}).get("epoch_pgd20_acc", float("nan")))
            events.append((time.perf_counter(), "end", trial.trial_id))

    spec = TrialSpec(overrides=lambda config: dict(config), name=lambda trial: f"trial-{trial.trial_id}",
                     tags=lambda config: {})
    assert cfg.search is not None
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = run_search(cfg, Path(folder), cfg.search, resolve_space(cfg, cfg.search.space, "search.space"),
                            kind="sweep", spec=spec, resume=False, teacher_path=teacher, printer=lambda line: None,
                            extra_callbacks=[Clock()])
        wall = time.perf_counter() - started
    best_row = max((row for row in result.rows if row["status"] != "failed"), key=lambda row: row["epoch_pgd20_acc"])
    return {"search": kind, "seed": seed, "trials": trials, "events": sorted(events), "finals": finals,
            "best_value": max(finals.values()), "best_trial_best_pgd20_acc": best_row.get("best_pgd20_acc"),
            "best_params": {k.removeprefix("param."): v for k, v in best_row.items() if k.startswith("param.")},
            "epochs_total": sum(1 for _, what, _ in events if what == "epoch"),
            "stopped_early": sum(row["status"] == "stopped_early" for row in result.rows), "wall_s": round(wall, 1)}


def epochs_to_reach(run: dict[str, Any], target: float) -> int | None:
    """Epochs trained (all trials, in time order) when a trial first ended with ``epoch_pgd20_acc`` ≥ ``target``."""
    epochs = 0
    for _, what, trial_id in run["events"]:
        if what == "epoch":
            epochs += 1
        elif run["finals"][trial_id] >= target:
            return epochs
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("CRDND_RAY_CACHE", str(Path(tempfile.gettempdir()) / "crdnd-ray-bench-teachers"))
    import ray
    import torch

    from crdnd_ray.config import load_config
    from crdnd_ray.engine.teachers import prepare_teacher

    teacher = prepare_teacher(load_config(REPO / "search_spaces" / "digits.yaml", {"tracking.enabled": False}))
    results = []
    for seed in args.seeds:
        runs = [sweep(kind, seed, args.trials, teacher) for kind in SEARCHES]
        target = runs[0]["best_value"]
        row: dict[str, Any] = {"seed": seed, "target_pgd20_acc": target}
        for run in runs:
            row[run["search"]] = {key: run[key] for key in ("best_value", "best_trial_best_pgd20_acc", "best_params",
                                                            "epochs_total", "stopped_early", "wall_s")}
            row[run["search"]]["epochs_to_target"] = epochs_to_reach(run, target)
        results.append(row)
        print(f"seed {seed}: random search's best epoch_pgd20_acc {target:.2f}; " + "; ".join(
            f"{kind} best {row[kind]['best_value']:.2f}, target after {row[kind]['epochs_to_target'] or 'never'} "
            f"of {row[kind]['epochs_total']} epochs ({row[kind]['wall_s']} s)" for kind in SEARCHES))
    summary = {}
    for kind in SEARCHES:
        reached = [row[kind]["epochs_to_target"] for row in results if row[kind]["epochs_to_target"] is not None]
        summary[kind] = {"reached": f"{len(reached)}/{len(results)}",
                         "epochs_to_target_median": statistics.median(reached) if reached else None,
                         "epochs_total": [row[kind]["epochs_total"] for row in results],
                         "best_value_median": statistics.median(row[kind]["best_value"] for row in results)}
    print(json.dumps(summary))
    out = REPO / "benchmarks" / "results" / "search_efficiency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "torch": torch.__version__, "ray": ray.__version__},
                               "settings": {"space_file": "search_spaces/digits.yaml", "trials": args.trials,
                                            "seeds": args.seeds, "objective": "epoch_pgd20_acc (last report)",
                                            "searches": SEARCHES},
                               "summary": summary, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
