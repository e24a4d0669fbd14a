"""What a sweep or an ablation will cost, and what it cost.

Before: :func:`estimate` times a few real training steps of the configured student, teacher and method on
this machine's device (random weights and inputs of the dataset's shape, at a small batch) and scales them
to the whole search: examples per epoch × epochs × trials, with and without ASHA's early stopping. After:
the loop reports each run's compute as ``cost_*`` (``engine.loop.COST_KEYS``); :func:`totals` sums a
sweep's or an ablation's trials.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from crdnd_ray.config import RunConfig, SchedulerConfig
from crdnd_ray.data import dataset_info
from crdnd_ray.engine.loop import COST_KEYS, configure_threads
from crdnd_ray.methods import build_distiller
from crdnd_ray.models import build_model

__all__ = ["asha_fraction", "calibrate", "estimate", "totals"]


def calibrate(cfg: RunConfig, batch: int = 4, steps: int = 1) -> dict[str, Any]:
    """Device-seconds per training example of ``cfg``'s real step (inner attack, loss, backward, update) on
    this machine's first GPU, or its CPU: the mean of ``steps`` timed steps at ``batch`` after one warm-up."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_threads(cfg, device)
    info = dataset_info(cfg.data)
    student = build_model(cfg.student.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                          **cfg.student.kwargs)
    teacher = build_model(cfg.teacher.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                          **cfg.teacher.kwargs)
    distiller = build_distiller(cfg.method.name, student, teacher, cfg.method, cfg.attack, info.num_classes)
    distiller.to(device).train()
    optimizer = torch.optim.SGD(distiller.parameter_groups(cfg.train.weight_decay), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, info.in_channels, info.image_size, info.image_size, generator=generator).to(device)
    labels = torch.randint(0, info.num_classes, (batch,), generator=generator).to(device)
    spent = []
    for _ in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss, _ = distiller(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        spent.append(time.perf_counter() - started)
    seconds = sum(spent[1:]) / steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {"device": name, "batch": batch, "step_s": seconds, "s_per_example": seconds / batch}


def asha_fraction(grace_period: int, reduction_factor: float, max_t: int) -> float:
    """The share of a search's epochs that ASHA runs: every trial reaches the first rung (``grace_period``),
    one in ``reduction_factor`` goes on to each next rung (``grace_period × reduction_factor^k``), up to
    ``max_t``. 1.0 means no saving."""
    rungs = [0.0]
    rung = float(grace_period)
    while rung < max_t:
        rungs.append(rung)
        rung *= reduction_factor
    rungs.append(float(max_t))
    spent = sum((rungs[k + 1] - rungs[k]) / reduction_factor ** k for k in range(len(rungs) - 1))
    return spent / max_t


def estimate(cfg: RunConfig, trials: int, concurrent: int, calibration: dict[str, Any] | None = None,
             scheduler: SchedulerConfig | None = None) -> dict[str, Any]:
    """The device-hours of ``trials`` trials of ``cfg`` (training only), from :func:`calibrate`, and with ASHA
    when ``scheduler`` (default ``search.scheduler``) is ASHA; the wall-clock hours at ``concurrent`` trials at
    a time."""
    calibration = calibration or calibrate(cfg)
    info = dataset_info(cfg.data)
    examples = min(cfg.data.train_limit or info.train_size, info.train_size)
    examples = (examples // cfg.data.batch_size) * cfg.data.batch_size
    if cfg.train.max_steps_per_epoch is not None:
        examples = min(examples, cfg.train.max_steps_per_epoch * cfg.data.batch_size)
    full_h = calibration["s_per_example"] * examples * cfg.train.epochs * trials / 3600
    fraction = 1.0
    if scheduler is None and cfg.search is not None:
        scheduler = cfg.search.scheduler
    if scheduler is not None and scheduler.kind == "asha":
        fraction = asha_fraction(scheduler.grace_period, scheduler.reduction_factor,
                                 scheduler.max_t or cfg.train.epochs)
    return {**calibration, "examples_per_epoch": examples, "epochs": cfg.train.epochs, "trials": trials,
            "device_hours": full_h, "asha_fraction": fraction, "device_hours_with_asha": full_h * fraction,
            "wall_hours": full_h * fraction / max(concurrent, 1)}


def totals(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The compute of a sweep's or an ablation's trials, summed from their last reports: ``total_images``,
    ``total_attack_passes``, ``total_device_s``, ``total_wall_s`` (the sum of the trials' own wall times)."""
    return {key.replace("cost_", "total_"): float(sum(row.get(key) or 0.0 for row in rows
                                                      if isinstance(row.get(key), (int, float))))
            for key in COST_KEYS}
