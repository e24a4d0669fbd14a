"""Wall time of a verification (AutoAttack and the gradient-masking checks) of a digits student, per N examples.

Trains the student of search_spaces/digits.yaml through the real ``train`` path (teacher prepared once and
cached; shorten it with ``--set``), trains its transfer surrogate once, then verifies the best checkpoint on
the first N test examples for each N of ``--limits``, on one CPU thread. Prints each verdict and the seconds
(wall and this process's CPU) spent in AutoAttack and in the whole verification, and writes
``benchmarks/results/verify_digits.json``.

    .venv/bin/python benchmarks/verify_digits.py [--limits 50,150,450] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", default="50,150,450")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    import torch

    from crdnd_ray.config import load_config
    from crdnd_ray.engine.runner import train_run
    from crdnd_ray.engine.verify import SURROGATE_DIR, train_surrogate, verify_run_folder

    torch.set_num_threads(1)
    cfg = load_config(REPO / "search_spaces" / "digits.yaml",
                      ["tracking.enabled=false", "scaling.torch_threads=1", *args.overrides])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        started = time.perf_counter()
        train_run(cfg, run)
        train_seconds = time.perf_counter() - started
        (run / "config.yaml").write_text(yaml.safe_dump(cfg.run_dict(), sort_keys=False))
        started = time.perf_counter()
        train_surrogate(cfg, run / SURROGATE_DIR)
        surrogate_seconds = time.perf_counter() - started
        for limit in (int(n) for n in args.limits.split(",")):
            result = verify_run_folder(run, limit=limit, write=False)
            rows.append({"n": result.n_eval, **{f"{name}_s": round(value, 2) for name, value in result.timings.items()},
                         "verdict": result.verdict,
                         "gradient_masking": result.gradient_masking,
                         "accuracies": {name: round(value, 2) for name, value in result.accuracies.items()},
                         "checks": {check.name: check.verdict for check in result.checks}})
            print(f"n {result.n_eval:4d}  AutoAttack {rows[-1]['autoattack_s']:6.1f} s "
                  f"({rows[-1]['autoattack_cpu_s']:.1f} s CPU)  total {rows[-1]['total_s']:6.1f} s "
                  f"({rows[-1]['total_cpu_s']:.1f} s CPU)  verdict {result.verdict}  "
                  f"gradient masking {result.gradient_masking}", flush=True)
            print("\n".join(result.lines()[1:]), flush=True)
    out = REPO / "benchmarks" / "results" / "verify_digits.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "torch": torch.__version__, "torch_threads": 1},
                               "overrides": args.overrides, "train_seconds": round(train_seconds, 1),
                               "surrogate_seconds": round(surrogate_seconds, 1),
                               "results": rows}, indent=2, ensure_ascii=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
