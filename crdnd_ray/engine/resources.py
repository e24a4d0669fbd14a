"""Sizing Ray resource requests from a cluster's resources: pure arithmetic, no Ray import.

Used by ``crdnd-ray train --workers N``, by every sweep and ablation, and by ``--dry-run``; a request that
can never fit fails at once with what was asked and what exists, instead of waiting forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from crdnd_ray.config import ScalingConfig

__all__ = ["AUTO_TRIALS_PER_GPU", "TRIAL_CPU", "ResourceError", "ResourcePlan", "plan_resources"]

TRIAL_CPU = 0.01
"""What a trial's driver asks for when its workers hold the real resources (Ray refuses ``{"CPU": 0}``)."""
AUTO_TRIALS_PER_GPU = 4
"""The most single-worker trials ``trials_per_gpu: auto`` packs on one GPU: on an H100, 1/2/4/8 trials gave
1,057/1,955/2,795/2,907 images/s in all (DESIGN.md), so an eighth of a GPU each adds 4 % for twice the memory."""


class ResourceError(Exception):
    """A resource request that can never fit the cluster; the message says what was asked and what exists."""


@dataclass(frozen=True)
class ResourcePlan:
    """What each trial and each of its workers asks Ray for."""

    num_workers: int
    use_gpu: bool
    worker_resources: dict[str, float]
    trial_resources: dict[str, float]
    concurrent: int
    in_process: bool = False

    def describe(self) -> str:
        return (f"{self.concurrent} concurrent trial(s) × {self.num_workers} worker(s), "
                f"each worker {self.worker_resources}, each trial driver {self.trial_resources}")


def plan_resources(scaling: ScalingConfig, cluster: dict[str, float], concurrent_trials: int = 1,
                   in_process: bool = False, node_cpus: list[float] | None = None) -> ResourcePlan:
    """Size the requests of ``concurrent_trials`` trials of ``scaling.num_workers`` workers from ``cluster``.

    Unset ``resources_per_worker`` are sized so that all concurrent trials fit at once: fractional CPUs
    on small machines (a whole request per trial would starve the workers), and with ``node_cpus`` (the CPUs
    of each node of a cluster) small enough that the workers spread over the smallest nodes still fit beside
    the trial drivers (a worker cannot span two nodes); on GPUs, one GPU per worker,
    except that single-worker trials take ``1 / scaling.trials_per_gpu`` of one (``auto``: enough packing
    for ``concurrent_trials`` to run at once, at most :data:`AUTO_TRIALS_PER_GPU` per GPU). An
    ``in_process`` trial trains inside its Tune trial and so holds the worker's resources itself. A
    request that can never fit, or packing asked of several workers, raises ResourceError at once.
    """
    cpus = cluster.get("CPU", 0.0)
    gpus = cluster.get("GPU", 0.0)
    use_gpu = scaling.use_gpu if scaling.use_gpu is not None else gpus >= 1
    workers = scaling.num_workers
    if use_gpu and gpus < 1:
        raise ResourceError(
            f"scaling.use_gpu is true but the Ray cluster has no GPU (it has {cpus:g} CPUs). "
            "Set scaling.use_gpu: false, or connect to a cluster with GPUs via scaling.address."
        )
    packing = scaling.trials_per_gpu
    if packing not in (1, "auto") and (workers > 1 or scaling.resources_per_worker):
        raise ResourceError(
            f"scaling.trials_per_gpu={packing} packs several trials on one GPU, which only single-worker trials "
            f"without scaling.resources_per_worker can do (this config has {workers} worker(s) and "
            f"resources_per_worker={scaling.resources_per_worker}; NCCL refuses two ranks on one GPU). "
            "Set scaling.trials_per_gpu: 1, or scaling.num_workers: 1 and no resources_per_worker."
        )
    if scaling.resources_per_worker:
        worker = dict(scaling.resources_per_worker)
    elif use_gpu:
        if workers > 1:
            packing = 1
        elif packing == "auto":
            packing = min(max(math.ceil(concurrent_trials / gpus), 1), AUTO_TRIALS_PER_GPU)
        worker = {"CPU": max(min(cpus / (workers * concurrent_trials) - TRIAL_CPU, 4.0), 0.1),
                  "GPU": math.floor(1e4 / packing) / 1e4}
    else:
        share = (cpus - TRIAL_CPU * concurrent_trials) / (workers * concurrent_trials)
        nodes = [node for node in node_cpus or [] if node > 0]
        if len(nodes) > 1:
            per_node = math.ceil(workers * concurrent_trials / len(nodes))
            share = min(share, (min(nodes) - TRIAL_CPU * concurrent_trials) / per_node)
        worker = {"CPU": round(min(max(share, 0.05), 1.0), 3)}
    if use_gpu and workers > 1 and worker.get("GPU", 0) < 1:
        raise ResourceError(
            f"{workers} workers cannot share GPUs (NCCL refuses two ranks on one GPU): each worker needs "
            f"a whole GPU, but resources_per_worker gives {worker.get('GPU', 0):g}."
        )
    needed = {key: value * workers for key, value in worker.items()}
    needed["CPU"] = needed.get("CPU", 0.0) + TRIAL_CPU
    for key, value in needed.items():
        available = cluster.get(key, 0.0)
        if value > available + 1e-9:
            raise ResourceError(
                f"One trial asks for {value:g} {key} ({workers} worker(s) × {worker.get(key, 0):g} plus the trial "
                f"driver), but the Ray cluster has only {available:g} {key} in all ({_describe(cluster)}). "
                "Lower scaling.num_workers or scaling.resources_per_worker, or connect to a larger cluster "
                "with scaling.address."
            )
    concurrent = max(1, min(concurrent_trials, int(min(
        math.floor(cluster.get(key, 0.0) / max(value, 1e-9) + 1e-6) for key, value in needed.items()))))
    trial = dict(worker) if in_process else {"CPU": TRIAL_CPU}
    return ResourcePlan(workers, use_gpu, worker, trial, concurrent, in_process)


def _describe(cluster: dict[str, float]) -> str:
    shown = {key: value for key, value in cluster.items() if key in ("CPU", "GPU", "memory") or key.startswith("accelerator")}
    return ", ".join(f"{value:g} {key}" for key, value in shown.items()) or "no resources"


