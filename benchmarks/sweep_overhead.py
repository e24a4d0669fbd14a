"""Per-trial overhead of a sweep on the embedded default: in-process trials vs a Ray Train run per trial.

Each trial trains one epoch of one step and evaluates almost nothing, so a trial's wall time is nearly
all overhead. For each mode the benchmark runs a small Optuna sweep through the real engine
(``engine.sweep.run_trials``) and reports, per trial, the time from trial start to its first report
(start-up) and the trial's whole wall time as seen by the driver. Results are printed and written to
``benchmarks/results/sweep_overhead.json``.

    .venv/bin/python benchmarks/sweep_overhead.py [--trials 4] [--concurrent 2]
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

REPO = Path(__file__).resolve().parents[1]


def measure(mode: str, overrides: dict, trials: int, concurrent: int) -> dict:
    """Run ``trials`` one-step trials of the digits default with ``overrides`` and time them from the driver's
    side; ``nodes`` lists each trial's Ray node ids by rank (its first start in ``placement.jsonl``)."""
    from ray import tune

    from crdnd_ray import runs
    from crdnd_ray.config import load_config
    from crdnd_ray.engine.trials import TrialSpec, run_trials
    from crdnd_ray.engine.teachers import prepare_teacher

    cfg = load_config(REPO / "search_spaces" / "digits.yaml", {
        "tracking.enabled": False, "train.epochs": 1, "train.max_steps_per_epoch": 1,
        "eval.epoch_limit": 8, "eval.final_limit": 8, "eval.final_attacks": ["clean"],
        "teacher.training.epochs": 2, **overrides,
    })
    teacher = prepare_teacher(cfg)
    events: dict[str, dict[str, float]] = {}

    class Timer(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            events.setdefault(trial.trial_id, {})["start"] = time.perf_counter()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            events[trial.trial_id].setdefault("first_report", time.perf_counter())

        def on_trial_complete(self, iteration, trials, trial, **info):
            events[trial.trial_id]["end"] = time.perf_counter()

    spec = TrialSpec(overrides=lambda config: {"experiment.seed": config["seed"]},
                     name=lambda trial: f"seed-{trial.config['seed']}", tags=lambda config: {})
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        run_trials(cfg, Path(folder), kind="overhead", param_space={"seed": tune.grid_search(list(range(trials)))},
                   spec=spec, num_samples=1, max_concurrent=concurrent, metrics=["epoch_pgd20_acc"], modes=["max"],
                   teacher_path=teacher, printer=lambda line: None, extra_callbacks=[Timer()])
        wall = time.perf_counter() - started
        nodes = [runs.read_placements(trial)[0]["nodes"] for trial in sorted(Path(folder).glob("trials/*"))]
    startup = [e["first_report"] - e["start"] for e in events.values() if "first_report" in e]
    total = [e["end"] - e["start"] for e in events.values() if "end" in e]
    return {"mode": mode, "trials": trials, "concurrent": concurrent, "sweep_wall_s": round(wall, 2),
            "startup_to_first_report_s_median": round(statistics.median(startup), 2),
            "trial_wall_s_median": round(statistics.median(total), 2), "nodes": nodes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrent", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("CRDND_RAY_CACHE", str(Path(tempfile.gettempdir()) / "crdnd-ray-bench-teachers"))
    import ray
    import torch

    rows = [measure(mode, {"scaling.in_process_single_worker": in_process}, args.trials, args.concurrent)
            for mode, in_process in (("Ray Train run per trial", False), ("in-process trial", True))]
    print(f"{'mode':28s} {'sweep wall s':>12s} {'start-up s (median)':>20s} {'trial wall s (median)':>22s}")
    for row in rows:
        print(f"{row['mode']:28s} {row['sweep_wall_s']:12.2f} {row['startup_to_first_report_s_median']:20.2f} "
              f"{row['trial_wall_s_median']:22.2f}")
    out = REPO / "benchmarks" / "results" / "sweep_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "torch": torch.__version__, "ray": ray.__version__},
                               "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
