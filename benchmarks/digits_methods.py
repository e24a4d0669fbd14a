"""Robust accuracy and wall time of each method on the embedded digits default, against natural training.

Trains the same student (search_spaces/digits.yaml) with each method through the real ``train`` path
(teacher prepared once and cached) and reports clean / FGSM / PGD-20 / CW accuracy of the best-PGD
and last checkpoints and the wall time of each run. Methods without a teacher (natural, sat, trades) train with the
teacher recipe's learning rate (``teacher.training.lr``): the digits distillation rate of 0.5 makes up for
RSLAD's 0.1 loss scale and is far too large for plain cross-entropy. Printed as a table and written to
``benchmarks/results/digits_methods.json``.

    .venv/bin/python benchmarks/digits_methods.py [--methods natural,crdnd,rslad,ard] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="natural,crdnd,rslad,ard")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    import torch

    from crdnd_ray.config import load_config
    from crdnd_ray.engine.runner import train_run
    from crdnd_ray.engine.teachers import needs_teacher, prepare_teacher

    base = load_config(REPO / "search_spaces" / "digits.yaml", ["tracking.enabled=false", *args.overrides])
    started = time.perf_counter()
    prepare_teacher(base)
    teacher_seconds = time.perf_counter() - started
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods.split(","):
            cfg = base.with_overrides({"method.name": method})
            if not needs_teacher(cfg):
                cfg = cfg.with_overrides({"train.lr": cfg.teacher.training.lr})
            started = time.perf_counter()
            final = train_run(cfg, Path(folder) / method)
            seconds = time.perf_counter() - started
            for which in ("best", "last"):
                rows.append({"method": method, "checkpoint": which, "seconds": round(seconds, 1),
                             **{name: round(final[f"{which}_{name}_acc"], 2) for name in ("clean", "fgsm", "pgd20", "cw")}})
                print(f"{method:8s} {which:4s} clean {rows[-1]['clean']:6.2f}  fgsm {rows[-1]['fgsm']:6.2f}  "
                      f"pgd20 {rows[-1]['pgd20']:6.2f}  cw {rows[-1]['cw']:6.2f}  {seconds:6.1f} s", flush=True)
    out = REPO / "benchmarks" / "results" / "digits_methods.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "torch": torch.__version__},
                               "teacher_seconds_or_cache_hit": round(teacher_seconds, 1),
                               "overrides": args.overrides, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
