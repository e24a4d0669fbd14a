"""Training throughput of one run: the local loop vs Ray Train with 1 and 2 workers.

Two workloads go through the project's own code paths (``engine.loop.run_training`` in-process,
``engine.distributed.build_trainer`` + ``fit`` for Ray Train):

* ``digits``: the embedded default (``search_spaces/digits.yaml``: CRDND, small CNNs), whole epochs.
* ``cifar-shaped``: ``data.name: synthetic`` (random 3×32×32 tensors, 100 classes) with a ResNet-18
  student and teacher, a few batches per epoch (``train.max_steps_per_epoch``).

Teachers are randomly initialised (throughput does not depend on their weights); evaluation is cut to a
few clean examples so that the time between reports is the training epoch. For each mode it reports

* images/s of each epoch (global images / the slowest rank's epoch time, from ``metrics.jsonl``), and
  their median after the first epoch ("after start-up");
* start-up: seconds from calling ``fit`` (or ``run_training``) to the first step of epoch 0, and to the
  first report (which includes epoch 0 and its evaluation).

A Ray Train worker runs ``floor(CPUs it holds)`` torch threads (Ray sets ``OMP_NUM_THREADS``; the
config's ``scaling.torch_threads`` is cleared so that it does not override this), so on CPU the local
loop is timed twice: with that many threads (the like-for-like comparison) and with torch's
default. The check "Ray Train with 1 worker within 5% of the local loop" compares their images/s after
start-up; ``--repeats N`` runs every mode N times in alternating order and takes the median of the
paired ratios, which a machine shared with other work needs. The table is printed and written to
``benchmarks/results/train_throughput[_cuda].json``.

    .venv/bin/python benchmarks/train_throughput.py [--quick] [--repeats 3] [--workers 1 2]
    .venv/bin/python benchmarks/train_throughput.py --device cuda [--bf16] [--channels-last] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def workloads(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Config overrides of each workload, sized for the device (CPU runs are kept short)."""
    cuda = args.device == "cuda"
    common = {
        "tracking.enabled": False, "experiment.seed": 0,
        "eval.epoch_attacks": ["clean"], "eval.epoch_limit": 64, "eval.final_attacks": ["clean"],
        "eval.final_limit": 64, "train.epochs": args.epochs, "train.bf16": args.bf16,
        "train.channels_last": cuda and args.channels_last, "train.pin_memory": cuda,
        "data.loader_workers": args.loader_workers, "scaling.torch_threads": None,
    }
    digits = {**common, "data.name": "digits"}
    if args.quick:
        digits["train.max_steps_per_epoch"] = 8
    cifar = {
        **common, "data.name": "synthetic",
        "student.arch": "resnet18", "student.kwargs": {}, "teacher.arch": "resnet18", "teacher.kwargs": {},
        "data.batch_size": 128 if cuda else 32, "data.eval_batch_size": 64,
        "attack.steps": 10 if cuda else 2, "attack.eps": "8/255", "attack.step_size": "2/255", "eval.eps": "8/255",
        "train.max_steps_per_epoch": (10 if args.quick else 40) if cuda else (2 if args.quick else 3),
    }
    return {"digits": digits, "cifar-shaped": cifar}


def random_teacher(cfg, folder: Path) -> Path:
    """A randomly initialised checkpoint of ``cfg``'s teacher architecture."""
    import torch

    from crdnd_ray.checkpoints import save_model
    from crdnd_ray.data import dataset_info
    from crdnd_ray.models import build_model

    info = dataset_info(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.teacher.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                        **cfg.teacher.kwargs)
    return save_model(folder / "teacher.pt", model, arch=cfg.teacher.arch, kwargs=cfg.teacher.kwargs,
                      num_classes=info.num_classes, in_channels=info.in_channels)


def summarise(rows: list[dict[str, Any]], called: float, first_report: float) -> dict[str, Any]:
    """Per-epoch images/s, their median after the first epoch, and the start-up times."""
    rates = [row["images_per_s"] for row in rows]
    after = rates[1:] or rates
    return {
        "epochs": len(rows),
        "images_per_epoch": round(rows[-1]["images_per_s"] * rows[-1]["epoch_time_s"]),
        "images_per_s_by_epoch": [round(rate, 1) for rate in rates],
        "images_per_s": round(statistics.median(after), 1),
        "epoch_time_s": round(statistics.median(row["epoch_time_s"] for row in rows[1:] or rows), 3),
        "startup_to_first_step_s": round(rows[0]["epoch_started_at"] - called, 2),
        "startup_to_first_report_s": round(first_report - called, 2),
    }


def run_local(cfg, teacher_path: Path, folder: Path, device: str, threads: int | None) -> dict[str, Any]:
    """Time ``run_training`` in this process (``threads``: torch threads, None for torch's default)."""
    import torch

    from crdnd_ray.engine.loop import LoopContext, run_training
    from crdnd_ray.runs import read_metrics
    from crdnd_ray.engine.teachers import load_teacher

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    used = torch.get_num_threads()
    reports: list[float] = []
    try:
        teacher = load_teacher(cfg, teacher_path).to(device)
        called = time.time()
        run_training(cfg, folder, teacher, LoopContext(
            device=torch.device(device), report=lambda metrics, checkpoint: reports.append(time.time())))
    finally:
        torch.set_num_threads(previous)
    return {"threads_per_worker": used, **summarise(read_metrics(folder), called, reports[0])}


def run_ray(cfg, teacher_path: Path, folder: Path, workers: int) -> dict[str, Any]:
    """Time ``TorchTrainer.fit`` of ``cfg`` on ``workers`` Ray Train workers."""
    from ray.train import UserCallback

    from crdnd_ray.engine.distributed import build_trainer, init_ray
    from crdnd_ray.engine.resources import plan_resources
    from crdnd_ray.runs import read_metrics

    cfg = cfg.with_overrides({"scaling.num_workers": workers, "scaling.in_process_single_worker": False},
                             source="the benchmark")
    plan = plan_resources(cfg.scaling, init_ray(cfg.scaling, log_to_driver=False))
    stamps = folder.parent / f"{folder.name}-reports.txt"

    class FirstReport(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(stamps, "a") as file:
                file.write(f"{time.time()}\n")

    trainer = build_trainer(cfg, folder, teacher_path, plan, name="benchmark", callbacks=[FirstReport()])
    called = time.time()
    trainer.fit()
    first_report = float(stamps.read_text().split()[0])
    cpus = plan.worker_resources.get("CPU", 1.0)
    return {"threads_per_worker": max(1, math.floor(cpus)), "worker_resources": plan.worker_resources,
            **summarise(read_metrics(folder), called, first_report)}


def machine_info(device: str) -> dict[str, Any]:
    import ray
    import torch

    info = {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "device": device, "torch_default_threads": torch.get_num_threads(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
        info["cpu_model"] = model
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer steps per epoch (a smoke run).")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: GPU workers (use_gpu, NCCL), one GPU per worker.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts.")
    parser.add_argument("--epochs", type=int, default=None, help="Epochs per run (default 3, 2 with --quick).")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU only).")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU only).")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes per rank.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Run every mode this many times, alternating the order (noisy, shared machines).")
    parser.add_argument("--only", choices=["digits", "cifar-shaped"], default=None, help="Run one workload.")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path.")
    args = parser.parse_args()
    args.epochs = args.epochs or (2 if args.quick else 3)
    suffix = "_cuda" if args.device == "cuda" else ""
    out = args.out or REPO / "benchmarks" / "results" / f"train_throughput{suffix}.json"

    import torch

    from crdnd_ray.config import ScalingConfig, load_config
    from crdnd_ray.engine.distributed import init_ray
    from crdnd_ray.engine.resources import ResourceError, plan_resources

    machine = machine_info(args.device)
    cluster = init_ray(ScalingConfig(use_gpu=args.device == "cuda"), log_to_driver=False)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="crdnd-throughput-") as scratch:
        for name, overrides in workloads(args).items():
            if args.only and name != args.only:
                continue
            cfg = load_config(REPO / "search_spaces" / "digits.yaml",
                              {**overrides, "scaling.use_gpu": args.device == "cuda"})
            folder = Path(scratch) / name
            folder.mkdir()
            teacher = random_teacher(cfg, folder)
            facts = {"workload": name, "device": args.device, "global_batch": cfg.data.batch_size,
                     "attack_steps": cfg.attack.steps, "student": cfg.student.arch}
            one_worker = plan_resources(cfg.scaling.model_copy(update={"num_workers": 1}), cluster)
            matched = max(1, math.floor(one_worker.worker_resources.get("CPU", 1.0)))
            modes: list[tuple[str, int | None]] = [("ray", workers) for workers in args.workers]
            modes.append(("local", matched))
            if args.device == "cpu" and torch.get_num_threads() != matched:
                modes.append(("local", None))
            for repeat in range(args.repeats):
                for kind, number in modes if repeat % 2 == 0 else modes[::-1]:
                    run = folder / f"{kind}-{number or 'default'}-{repeat}"
                    if kind == "ray":
                        label = f"Ray Train, {number} worker(s)"
                        print(f"{name} [{repeat}]: {label} ...", flush=True)
                        try:
                            row = run_ray(cfg, teacher, run, number)
                        except ResourceError as error:
                            print(f"  skipped: {error}")
                            if repeat == 0:
                                skipped.append({**facts, "workers": number, "reason": str(error)})
                            continue
                    else:
                        label = "local loop, " + (f"{number} thread(s)" if number else "torch default threads")
                        print(f"{name} [{repeat}]: {label} ...", flush=True)
                        row = run_local(cfg, teacher, run, args.device, number)
                    results.append({**facts, "mode": label, "repeat": repeat,
                                    "workers": number if kind == "ray" else 1, **row})
    checks = {}
    for name in ("digits", "cifar-shaped"):
        rows = [row for row in results if row["workload"] == name]
        ratios = []
        for repeat in range(args.repeats):
            one = [r for r in rows if r["repeat"] == repeat and r["mode"] == "Ray Train, 1 worker(s)"]
            local = [r for r in rows if r["repeat"] == repeat and r["mode"].startswith("local loop, ")
                     and "default" not in r["mode"]]
            if one and local:
                ratios.append(one[0]["images_per_s"] / local[0]["images_per_s"])
        if ratios:
            ratio = statistics.median(ratios)
            checks[name] = {"ray1_over_local_same_threads": round(ratio, 3),
                            "by_repeat": [round(r, 3) for r in ratios], "within_5_percent": abs(1 - ratio) <= 0.05}
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    header = (f"{'workload':13s} {'mode':33s} {'rep':>3s} {'thr':>3s} {'img/s':>9s} {'epoch s':>8s} "
              f"{'start→step s':>12s} {'start→report s':>14s}  img/s by epoch")
    print("\n" + header + "\n" + "-" * len(header))
    for row in results:
        print(f"{row['workload']:13s} {row['mode']:33s} {row['repeat']:3d} {row['threads_per_worker']:3d} "
              f"{row['images_per_s']:9.1f} {row['epoch_time_s']:8.3f} {row['startup_to_first_step_s']:12.2f} "
              f"{row['startup_to_first_report_s']:14.2f}  {row['images_per_s_by_epoch']}")
    for name, check in checks.items():
        print(f"{name}: Ray Train 1 worker / local loop (same threads), median over repeats = "
              f"{check['ray1_over_local_same_threads']:.3f} {check['by_repeat']} "
              f"({'within' if check['within_5_percent'] else 'NOT within'} 5%)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "settings": vars(args) | {"out": str(out)}, "results": results,
                               "skipped": skipped, "checks": checks}, indent=2, default=str))
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
