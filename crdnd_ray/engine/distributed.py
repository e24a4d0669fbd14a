"""Ray Train: one distillation run as data-parallel workers around ``engine.loop``.

Also owns starting or joining Ray (``init_ray``) and sizing resource requests from the cluster
(``plan_resources``), which the sweep and ablation engines reuse for their trials.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from crdnd_ray.config import RunConfig, ScalingConfig

if TYPE_CHECKING:
    import torch

__all__ = [
    "ResourceError",
    "ResourcePlan",
    "TrainingFailed",
    "init_ray",
    "plan_resources",
    "root_cause",
    "run_distributed",
    "worker_loop",
    "wrap_data_parallel",
]

TRIAL_CPU = 0.01
AUTO_TRIALS_PER_GPU = 4
"""The most single-worker trials ``trials_per_gpu: auto`` packs on one GPU: on an H100, 1/2/4/8 trials gave
1,057/1,955/2,795/2,907 images/s in all (DESIGN.md), so an eighth of a GPU each adds 4 % for twice the memory."""


class ResourceError(Exception):
    """A resource request that can never fit the cluster; the message says what was asked and what exists."""


class TrainingFailed(RuntimeError):
    """A Ray Train run ended with an error (after any retries)."""


def _prepare_ray_environment() -> None:
    """Keep Ray from writing outside the run: no auth token in ~/.ray, session files in a private tmp."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TMPDIR", os.path.join(tempfile.gettempdir(), f"crdnd-ray-{os.getuid()}"))
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_RESULT_BUFFER_LENGTH", "1")


def init_ray(scaling: ScalingConfig, log_to_driver: bool = True) -> dict[str, float]:
    """Join the cluster at ``scaling.address`` / ``$RAY_ADDRESS``, or start a local Ray; return its resources."""
    _prepare_ray_environment()
    import ray

    if not ray.is_initialized():
        address = scaling.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=log_to_driver, logging_level="WARNING")
        else:
            _start_local_ray(log_to_driver)
    return {key: float(value) for key, value in ray.cluster_resources().items()}


def _start_local_ray(log_to_driver: bool) -> None:
    """Start a local Ray whose own processes know its address.

    Code inside Ray processes that uses the State API finds its cluster through ``$RAY_ADDRESS``; without
    it, on a machine that runs more than one Ray instance it fails with "Found multiple active Ray
    instances". One such process is Ray Train's PlacementGroupCleaner, which frees the placement group
    of a run whose controller was killed (a trial stopped by Tune). So the GCS port is chosen here, and
    ``RAY_ADDRESS`` is set while Ray starts (its processes inherit it) and removed again from this
    process, so that after ``ray.shutdown`` a later ``init_ray`` starts a new Ray instead of joining the
    old address.
    """
    import socket

    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    during_start = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    saved = {key: os.environ.get(key) for key in during_start}
    os.environ.update(during_start)
    try:
        ray.init(address="local", log_to_driver=log_to_driver, logging_level="WARNING",
                 _temp_dir=os.environ["RAY_TMPDIR"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
                   in_process: bool = False) -> ResourcePlan:
    """Size the requests of ``concurrent_trials`` trials of ``scaling.num_workers`` workers from ``cluster``.

    Unset ``resources_per_worker`` are sized so that all concurrent trials fit at once: fractional CPUs
    on small machines (a whole request per trial would starve the workers); on GPUs, one GPU per worker,
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


def wrap_data_parallel(module: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """The loop's ``wrap`` on a Ray Train worker: DistributedDataParallel over the default process group.

    With one rank the module is returned as is. Tests wrap a distiller with this same function.
    """
    from torch.nn.parallel import DistributedDataParallel

    if world_size == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def worker_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: run ``engine.loop`` on this rank and report every epoch to Ray Train.

    After a worker failure Ray restarts the group with the last reported checkpoint, read in place
    (``as_directory``: no copy when the storage is local, a temporary copy removed afterwards otherwise).
    """
    import functools

    import ray.train
    import ray.train.torch

    from crdnd_ray.engine.loop import LoopContext, run_training
    from crdnd_ray.teachers import load_teacher

    cfg = RunConfig.model_validate(config["cfg"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    output_dir = Path(config["output_dir"])
    teacher = load_teacher(cfg, Path(config["teacher_path"])).to(device) if config.get("teacher_path") else None

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False)

    with contextlib.ExitStack() as stack:
        resume_from = Path(config["resume_from"]) if config.get("resume_from") else None
        restored = ray.train.get_checkpoint()
        if restored is not None:
            resume_from = Path(stack.enter_context(restored.as_directory()))
        run_training(cfg, output_dir, teacher, LoopContext(
            rank=rank, world_size=world_size, device=device, report=report, resume_from=resume_from,
            wrap=functools.partial(wrap_data_parallel, device=device, world_size=world_size),
            on_epoch_start=_fault_injector(config, output_dir, rank),
        ))


def _fault_injector(config: dict[str, Any], output_dir: Path, rank: int) -> Callable[[int], None] | None:
    """Kill one worker process once at ``config['kill_rank_at_epoch'] = (rank, epoch)`` (for fault tests).

    ``ray.train.report`` returns once the report is queued in the worker, before the controller has
    collected it, and a report still queued in a dead worker is lost. So at the chosen epoch every rank
    first waits until the controller has taken its previous report, then all ranks meet at a barrier,
    and only then does the chosen rank exit: the failure always comes after the last checkpoint is
    registered, so the restart must resume from it.
    """
    target = config.get("kill_rank_at_epoch")
    if not target:
        return None
    victim, kill_epoch = target
    marker = output_dir / ".fault-injected"

    def maybe_die(epoch: int) -> None:
        if epoch != kill_epoch or marker.exists():
            return
        import torch.distributed as dist
        from ray.train.v2._internal.execution.context import get_train_context

        get_train_context().get_result_queue().join()
        if dist.is_initialized():
            dist.barrier()
        if rank == victim:
            marker.write_text(f"rank {rank} killed at epoch {epoch}\n")
            os._exit(1)

    return maybe_die


def build_trainer(cfg: RunConfig, output_dir: Path, teacher_path: Path | None, plan: ResourcePlan,
                  name: str, callbacks: list | None = None, resume: bool = False,
                  extra_config: dict[str, Any] | None = None):
    """A TorchTrainer that runs ``cfg`` with ``plan``'s workers and writes everything under ``output_dir``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig as TrainScaling
    from ray.train.torch import TorchConfig, TorchTrainer

    from crdnd_ray.engine.loop import CHECKPOINT_DIR, CHECKPOINT_FILE

    output_dir = Path(output_dir).resolve()
    resume_from = output_dir / CHECKPOINT_DIR if resume and (output_dir / CHECKPOINT_DIR / CHECKPOINT_FILE).exists() else None
    loop_config = {"cfg": cfg.run_dict(), "output_dir": str(output_dir),
                   "teacher_path": str(Path(teacher_path).resolve()) if teacher_path else None,
                   "resume_from": str(resume_from) if resume_from else None, **(extra_config or {})}
    return TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=TrainScaling(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                    resources_per_worker=plan.worker_resources),
        run_config=TrainRunConfig(
            name=name, storage_path=str(output_dir / "ray_train"), callbacks=callbacks,
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def run_distributed(cfg: RunConfig, output_dir: Path, teacher_path: Path | None, resume: bool = False,
                    extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``cfg`` on Ray Train workers and return the final metrics (raises TrainingFailed)."""
    from crdnd_ray.engine.loop import read_final_metrics

    cluster = init_ray(cfg.scaling)
    plan = plan_resources(cfg.scaling, cluster)
    trainer = build_trainer(cfg, output_dir, teacher_path, plan, name="train", resume=resume,
                            extra_config=extra_config)
    try:
        trainer.fit()
    except Exception as error:
        raise TrainingFailed(f"the Ray Train run failed: {root_cause(error)}") from error
    return read_final_metrics(output_dir)


def root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"
