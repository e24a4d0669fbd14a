"""Ray Train: one distillation run as data-parallel workers around ``engine.loop``, and starting or joining
Ray (``init_ray``), which the Tune driver of ``engine.trials`` reuses.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import UserCallback
from torch.nn.parallel import DistributedDataParallel

from crdnd_ray import runs
from crdnd_ray.config import RunConfig, ScalingConfig
from crdnd_ray.engine import interrupt_on_sigterm
from crdnd_ray.engine.loop import LoopContext, run_training
from crdnd_ray.engine.resources import ResourcePlan, plan_resources
from crdnd_ray.engine.teachers import load_teacher

__all__ = [
    "RecordingCallback",
    "TrainingFailed",
    "build_trainer",
    "describe_failure",
    "init_ray",
    "node_cpus",
    "root_cause",
    "run_distributed",
    "worker_loop",
    "wrap_data_parallel",
]

class TrainingFailed(RuntimeError):
    """A Ray Train run ended with an error (after any retries)."""


def init_ray(scaling: ScalingConfig, log_to_driver: bool = True) -> dict[str, float]:
    """Join the cluster at ``scaling.address`` / ``$RAY_ADDRESS``, or start a local Ray; return its resources."""
    if not ray.is_initialized():
        address = scaling.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=log_to_driver, logging_level="WARNING")
        else:
            _start_local_ray(log_to_driver)
        interrupt_on_sigterm()
    return {key: float(value) for key, value in ray.cluster_resources().items()}


def node_cpus() -> list[float]:
    """The CPUs of each live node of the connected Ray cluster."""
    return [float(node["Resources"].get("CPU", 0.0)) for node in ray.nodes() if node["Alive"]]


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


def wrap_data_parallel(module: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """The loop's ``wrap`` on a Ray Train worker: DistributedDataParallel over the default process group.

    With one rank the module is returned as is. Tests wrap a distiller with this same function.
    """
    if world_size == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def worker_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: run ``engine.loop`` on this rank and report every epoch to Ray Train.

    Nothing comes from the driver's disk: the teacher's weights arrive through Ray's object store; after a
    worker failure Ray restarts the group with the last reported checkpoint, which rank 0 reads from Ray's
    storage in place (``as_directory``: no copy when the storage is a local or shared folder, a temporary
    copy otherwise) and the loop hands to the other ranks. Rank 0 records each rank's Ray node in the run
    folder's ``placement.jsonl``.
    """
    cfg = RunConfig.model_validate(config["cfg"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    output_dir = Path(config["output_dir"])
    teacher = load_teacher(cfg, ray.get(config["teacher"])).to(device) if config.get("teacher") else None
    nodes = _gather(ray.get_runtime_context().get_node_id(), world_size)
    if rank == 0:
        runs.add_placement(output_dir, nodes)

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False)

    with contextlib.ExitStack() as stack:
        resume_from = Path(config["resume_from"]) if config.get("resume_from") else None
        restored = ray.train.get_checkpoint() if rank == 0 else None
        if restored is not None:
            resume_from = Path(stack.enter_context(restored.as_directory()))
        run_training(cfg, output_dir, teacher, LoopContext(
            rank=rank, world_size=world_size, device=device, report=report, resume_from=resume_from,
            wrap=functools.partial(wrap_data_parallel, device=device, world_size=world_size),
            on_epoch_start=_fault_injector(config, output_dir, rank),
        ))


def _gather(value: Any, world_size: int) -> list[Any]:
    """``value`` of every rank, in rank order, over the process group."""
    if world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


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
        from ray.train.v2._internal.execution.context import get_train_context

        get_train_context().get_result_queue().join()
        if dist.is_initialized():
            dist.barrier()
        if rank == victim:
            marker.write_text(f"rank {rank} killed at epoch {epoch}\n")
            os._exit(1)

    return maybe_die


def build_trainer(cfg: RunConfig, output_dir: Path, teacher: Path | bytes | None, plan: ResourcePlan,
                  name: str, callbacks: list | None = None, resume: bool = False,
                  extra_config: dict[str, Any] | None = None) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer that runs ``cfg`` with ``plan``'s workers and writes everything under ``output_dir``.

    ``teacher`` (a checkpoint file or its bytes) is put into Ray's object store once for all workers.
    """
    output_dir = Path(output_dir).resolve()
    state = output_dir / runs.STATE_DIR
    resume_from = state if resume and (state / runs.STATE_FILE).exists() else None
    if isinstance(teacher, (str, Path)):
        teacher = Path(teacher).read_bytes()
    loop_config = {"cfg": cfg.run_dict(), "output_dir": str(output_dir),
                   "teacher": ray.put(teacher) if teacher is not None else None,
                   "resume_from": str(resume_from) if resume_from else None, **(extra_config or {})}
    return ray.train.torch.TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                               resources_per_worker=plan.worker_resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(output_dir / "ray_train"), callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )


class RecordingCallback(UserCallback):
    """Feeds rank 0's report of every epoch to ``report`` (a :class:`~crdnd_ray.tracking.RunRecord`'s).

    Ray Train runs it in its controller, which Ray places on the driver's node, so a local SQLite store is
    reachable; nothing else writes to the store while a ``train`` run goes on.
    """

    def __init__(self, report: Callable[[dict[str, Any]], None]) -> None:
        self.report = report

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        """Record the metrics that rank 0 reported (every rank reports the same, all-reduced numbers)."""
        self.report(dict(metrics[0]))


def run_distributed(cfg: RunConfig, output_dir: Path, teacher_path: Path | None, resume: bool = False,
                    report: Callable[[dict[str, Any]], None] | None = None,
                    extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``cfg`` on Ray Train workers and return the final metrics (raises TrainingFailed).

    ``report`` receives every epoch's metrics as the loop reported them (see :class:`RecordingCallback`).
    """
    cluster = init_ray(cfg.scaling)
    plan = plan_resources(cfg.scaling, cluster, node_cpus=node_cpus())
    trainer = build_trainer(cfg, output_dir, teacher_path, plan, name="train", resume=resume,
                            callbacks=[RecordingCallback(report)] if report is not None else None,
                            extra_config=extra_config)
    try:
        trainer.fit()
    except Exception as error:  # noqa: BLE001 - every failure becomes one paragraph with the resume command
        raise TrainingFailed(describe_failure(error, output_dir)) from error
    return runs.read_final(output_dir) or {}


def describe_failure(error: BaseException, output_dir: Path) -> str:
    """One paragraph for a failed Ray Train run: which rank failed and why, and how to continue it.

    A rank whose process died is named as such (the other ranks then fail on their broken connections, which
    says nothing new); otherwise each rank's error is given by its last line.
    """
    from ray.train.v2.api.exceptions import WorkerGroupError

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, WorkerGroupError):
        cause = cause.__cause__
    failures = cause.worker_failures if cause is not None else {}
    died = sorted(rank for rank, failure in failures.items() if "process has died" in str(failure)
                  or type(failure).__name__ in ("ActorDiedError", "WorkerHealthCheckFailedError"))
    if died:
        what = f"the worker process of rank {', '.join(map(str, died))} died"
        if len(failures) > len(died):
            what += " (the other ranks stopped with it)"
    elif failures:
        what = "worker(s) failed (" + "; ".join(f"rank {rank}: {root_cause(failure)[:300]}"
                                              for rank, failure in sorted(failures.items())) + ")"
    else:
        what = f"it failed ({root_cause(error)[:300]})"
    return (f"The Ray Train run stopped because {what}. Its last checkpoint is kept: continue it with "
            f"'crdnd-ray train --resume {output_dir}'. With scaling.max_failures > 0 Ray Train restarts the workers "
            "from that checkpoint by itself.")


def root_cause(error: BaseException) -> str:
    """The innermost cause of ``error`` as ``Type: last line of its message``."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"
