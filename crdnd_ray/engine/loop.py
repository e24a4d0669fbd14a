"""The framework-free training loop: one step, one epoch, evaluation, checkpoints.

Plain PyTorch; no Ray and no MLflow. Where it runs (in-process, a Ray Tune trial, a Ray Train worker) is
described by a :class:`LoopContext`: rank, world size, device, how to wrap the model for data parallelism,
and a ``report`` callback that receives each epoch's metrics and the folder of that epoch's checkpoint.
Under ``torch.distributed`` every rank evaluates a shard and the counts are all-reduced, so every rank
reports identical metrics; timings are the slowest rank's (``epoch_time_s``, and ``epoch_started_at``,
the Unix time at which the last rank started training the epoch).

The inner attack runs through a runner from :mod:`crdnd_ray.graphs` (``train.cuda_graphs``): replayed as
a CUDA graph on GPUs, eager otherwise; the first progress line says which, and why. A step does not wait
for the device: the loss and its parts are summed on the device, and whether the loss stayed finite is
read every :data:`FINITE_CHECK_STEPS` steps and at the end of the epoch.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from crdnd_ray import attacks, runs
from crdnd_ray.checkpoints import load_model, read_checkpoint, save_model, unwrap
from crdnd_ray.config import ConfigError, RunConfig, check_batch_split
from crdnd_ray.data import build_datasets
from crdnd_ray.graphs import AttackRunner, RunnerSource
from crdnd_ray.methods import build_distiller
from crdnd_ray.models import build_model

__all__ = [
    "COST_KEYS",
    "FINITE_CHECK_STEPS",
    "DivergedError",
    "LoopContext",
    "configure_threads",
    "evaluate_distributed",
    "run_training",
    "seed_everything",
]

Reporter = Callable[[dict[str, Any], "Path | None"], None]
FINITE_CHECK_STEPS = 50
"""Steps between two reads of the device-side divergence check (each read waits for the device)."""


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class LoopContext:
    """Where the loop runs and how it reports.

    ``report(metrics, checkpoint_dir)`` is called once per epoch on every rank; ``checkpoint_dir`` is the
    run's ``checkpoint/`` folder holding the full training state ``state.pt`` (rank 0) or None (other
    ranks). ``resume_from`` is such a folder to continue from; only rank 0 reads it and sends the state to
    the other ranks over the process group (as it does the checkpoints of the final evaluation), so no
    other rank reads the run folder. ``wrap`` turns the distiller into its data-parallel form (DDP) or
    leaves it as is. ``on_epoch_start(epoch)`` runs before each epoch (fault injection in tests).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap: Callable[[nn.Module], nn.Module] = lambda module: module
    report: Reporter | None = None
    resume_from: Path | None = None
    progress: Callable[[str], None] | None = None
    on_epoch_start: Callable[[int], None] | None = None


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch; optionally ask PyTorch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def configure_threads(cfg: RunConfig, device: torch.device | None = None) -> None:
    """Apply ``scaling.torch_threads`` to PyTorch's CPU thread pool (no effect on GPU runs)."""
    if cfg.scaling.torch_threads and (device is None or device.type == "cpu"):
        torch.set_num_threads(cfg.scaling.torch_threads)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def _shard(dataset: Dataset, limit: int | None, rank: int, world_size: int) -> Subset:
    total = len(dataset) if limit is None else min(limit, len(dataset))
    return Subset(dataset, range(rank, total, world_size))


def evaluate_distributed(model: nn.Module, dataset: Dataset, attack_names: list[str], *, eps: float,
                         limit: int | None, batch_size: int, rank: int = 0, world_size: int = 1,
                         device: torch.device | None = None, runner: AttackRunner | None = None) -> dict[str, float]:
    """Accuracies (percent) under each attack on the first ``limit`` examples, sharded over ranks.

    Each rank attacks its own shard; correct counts are all-reduced so every rank returns the same numbers.
    ``runner`` runs the attacks (see :func:`crdnd_ray.attacks.evaluate`; one runner per call).
    """
    shard = _shard(dataset, limit, rank, world_size)
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False)
    local = (attacks.evaluate(model, loader, attack_names, eps=eps, device=device, runner=runner)
             if len(shard) else {})
    count = float(local.get("n_eval", 0))
    names = [f"{name}_acc" for name in attack_names]
    totals = torch.tensor([count] + [local.get(name, 0.0) * count / 100.0 for name in names], dtype=torch.float64)
    totals = _all_reduce_sum(totals.to(device or "cpu")).cpu()
    n_eval = float(totals[0])
    results = {name: 100.0 * float(value) / max(n_eval, 1.0) for name, value in zip(names, totals[1:])}
    results["n_eval"] = n_eval
    return results


def _lr_factor(cfg: RunConfig) -> Callable[[int], float]:
    train = cfg.train
    milestones = [m if m >= 1 else round(m * train.epochs) for m in train.milestones]

    def factor(epoch: int) -> float:
        if train.warmup_epochs and epoch < train.warmup_epochs:
            return (epoch + 1) / (train.warmup_epochs + 1)
        if train.schedule == "cosine":
            span = max(train.epochs - train.warmup_epochs, 1)
            return 0.5 * (1 + math.cos(math.pi * (epoch - train.warmup_epochs) / span))
        if train.schedule == "multistep":
            return train.gamma ** sum(epoch >= m for m in milestones)
        return 1.0

    return factor


def _train_loader(dataset: Dataset, cfg: RunConfig, context: LoopContext) -> tuple[DataLoader, DistributedSampler]:
    check_batch_split(cfg.data.batch_size, context.world_size)
    per_worker = cfg.data.batch_size // context.world_size
    # One process too shuffles with the sampler seeded by (seed, epoch): a resumed run then sees the
    # same data order as one that was never interrupted.
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank,
                                 shuffle=True, seed=cfg.experiment.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=per_worker, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.loader_workers, pin_memory=cfg.train.pin_memory,
                        persistent_workers=cfg.data.loader_workers > 0)
    if len(loader) == 0:
        raise ValueError(
            f"The training set gives each of the {context.world_size} worker(s) {len(sampler)} examples, fewer "
            f"than one batch of {per_worker}, and incomplete batches are dropped (every step has the same shape). "
            "Lower data.batch_size or raise data.train_limit."
        )
    return loader, sampler


def _check_finite(sums: torch.Tensor, epoch: int, first: int, last: int) -> None:
    """Raise DivergedError when any rank's running loss sum (``sums[0]``) is NaN or infinite.

    A non-finite loss at any step makes the running sum non-finite, so the sum is the device-side flag;
    reading it waits for the device once, and all ranks agree (a max all-reduce) so that they stop together.
    """
    diverged = _all_reduce_max((~torch.isfinite(sums[:1])).float())
    if diverged.item():
        raise DivergedError(
            f"The training loss became NaN or infinite at epoch {epoch}, between steps {first} and {last}. "
            "Lower train.lr (or add train.warmup_epochs), or check the teacher checkpoint and the data."
        )


def _rng_state() -> dict[str, Any]:
    """Every random stream of this process, in types that ``torch.load(weights_only=True)`` accepts."""
    _, key, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [torch.from_numpy(key.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)],
            "python": [version, list(internal), gauss_next]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    key, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def run_training(cfg: RunConfig, output_dir: Path, teacher: nn.Module | None,
                 context: LoopContext | None = None) -> dict[str, Any]:
    """Train ``cfg``'s student with its method, evaluate it, and return the final metrics.

    Writes the run folder of :mod:`crdnd_ray.runs` into ``output_dir`` (rank 0 only): ``metrics.jsonl``,
    ``best.pt``, ``last.pt``, ``checkpoint/state.pt`` and, at the end, ``final_metrics.json`` (the attack suite
    on the best and last checkpoints). The last epoch's report carries the final metrics as ``best_*`` and
    ``last_*`` (and ``best_epoch``); rank 0 returns them, other ranks an empty dict.
    """
    context = context or LoopContext()
    device = context.device
    if cfg.scaling.sync_batchnorm and context.world_size > 1 and device.type == "cpu":
        raise ConfigError(
            "scaling.sync_batchnorm needs GPU workers: PyTorch's SyncBatchNorm does not run on CPU tensors. "
            "Set scaling.sync_batchnorm: false for CPU workers, or scaling.use_gpu: true on a cluster with GPUs."
        )
    output_dir = Path(output_dir)
    is_main = context.rank == 0
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.experiment.seed, cfg.experiment.deterministic)
    configure_threads(cfg, device)

    train_set, test_set, info = build_datasets(cfg.data)
    student = build_model(cfg.student.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                          **cfg.student.kwargs)
    distiller = build_distiller(cfg.method.name, student, teacher, cfg.method, cfg.attack, info.num_classes)
    if cfg.scaling.sync_batchnorm and context.world_size > 1:
        distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)
    distiller.to(device)
    memory_format = torch.channels_last if cfg.train.channels_last and device.type == "cuda" else None
    if memory_format is not None:
        distiller.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(distiller.parameter_groups(cfg.train.weight_decay), lr=cfg.train.lr,
                                momentum=cfg.train.momentum, nesterov=cfg.train.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg))
    start_epoch, best_score, history, cost = 0, -math.inf, [], dict.fromkeys(COST_KEYS, 0.0)
    state = _from_rank0(context, lambda: runs.read_state(Path(context.resume_from), context.progress)
                        if context.resume_from is not None else None)
    if state is not None:
        unwrap(distiller.student).load_state_dict(state["student"])
        distiller.extras.load_state_dict(state["extras"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_epoch, best_score = state["epoch"] + 1, state["best_score"]
        cost.update(state.get("cost", {}))
        history = [row for row in runs.read_metrics(output_dir) if row["epoch"] <= start_epoch] if is_main else []
    runners = RunnerSource(cfg.train.cuda_graphs, device, context.progress if is_main else None,
                           collectives_in_attack=cfg.scaling.sync_batchnorm and context.world_size > 1
                           and distiller.attack_bn_mode == "train")
    distiller.attack_runner = runners()
    trained = context.wrap(distiller)
    loader, sampler = _train_loader(train_set, cfg, context)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if cfg.train.bf16 and device.type == "cuda" else contextlib.nullcontext())
    save_facts = dict(arch=cfg.student.arch, kwargs=cfg.student.kwargs, num_classes=info.num_classes,
                      in_channels=info.in_channels)
    selection = cfg.eval.selection_metric

    for epoch in range(start_epoch, cfg.train.epochs):
        if context.on_epoch_start is not None:
            context.on_epoch_start(epoch)
        distiller.train()
        distiller.set_epoch(epoch)
        sampler.set_epoch(epoch)
        names: list[str] = []
        sums = torch.zeros(1, device=device)
        steps = checked = 0
        started_at = time.time()
        started = time.perf_counter()
        cpu_started = time.process_time()
        for step, (images, labels) in enumerate(loader):
            if cfg.train.max_steps_per_epoch is not None and step >= cfg.train.max_steps_per_epoch:
                break
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if memory_format is not None:
                images = images.contiguous(memory_format=memory_format)
            with autocast:
                loss, parts = trained(images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            values = torch.stack([loss, *parts.values()]).detach().float()
            if steps == 0:
                names, sums = ["loss", *parts], values
            else:
                sums += values
            steps += 1
            if steps % FINITE_CHECK_STEPS == 0:
                _check_finite(sums, epoch + 1, checked, step)
                checked = step + 1
        _check_finite(sums, epoch + 1, checked, steps - 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timing = _all_reduce_max(torch.tensor([time.perf_counter() - started, started_at], dtype=torch.float64,
                                              device=device))
        elapsed, started_at = float(timing[0]), float(timing[1])
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        totals = _all_reduce_sum(torch.cat([sums, torch.tensor([float(steps)], device=device)])).tolist()
        global_steps = totals[-1]
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr,
                               "images_per_s": global_steps * loader.batch_size / max(elapsed, 1e-9),
                               "epoch_time_s": elapsed, "epoch_started_at": started_at}
        row.update(sorted((name, total / max(global_steps, 1.0)) for name, total in zip(names, totals)))
        evaluation = evaluate_distributed(unwrap(distiller.student), test_set, cfg.eval.epoch_attacks,
                                          eps=cfg.eval.eps, limit=cfg.eval.epoch_limit,
                                          batch_size=cfg.data.eval_batch_size, rank=context.rank,
                                          world_size=context.world_size, device=device, runner=runners())
        row.update({f"epoch_{k}": v for k, v in evaluation.items() if k != "n_eval"})
        row.update(_add_cost(cost, images=global_steps * loader.batch_size,
                             attack_passes=global_steps * loader.batch_size * distiller.attack_passes_per_example,
                             wall_s=time.perf_counter() - started, cpu_s=time.process_time() - cpu_started,
                             device=device))
        improved = row[selection] > best_score
        if improved:
            best_score = row[selection]
        row[selection.removesuffix("_acc") + "_best_so_far"] = best_score
        history.append(row)
        if context.progress and is_main:
            shown = "  ".join(f"{k}={row[k]:.4g}" for k in ("loss", *[f"epoch_{a}_acc" for a in cfg.eval.epoch_attacks],
                                                                   "lr", "images_per_s") if k in row)
            context.progress(f"epoch {epoch + 1}/{cfg.train.epochs}: {shown}")

        last_epoch = epoch == cfg.train.epochs - 1
        checkpoint_dir = None
        if is_main:
            if improved:
                save_model(output_dir / runs.BEST_CHECKPOINT, distiller.student, extra={"epoch": epoch + 1}, **save_facts)
            save_model(output_dir / runs.LAST_CHECKPOINT, distiller.student, extra={"epoch": epoch + 1}, **save_facts)
            runs.write_metrics(output_dir, history)
        if last_epoch:
            evaluated, cpu_evaluated = time.perf_counter(), time.process_time()
            row.update(_final_evaluation(cfg, output_dir, test_set, context, runners))
            row.update(_add_cost(cost, images=0, attack_passes=0, wall_s=time.perf_counter() - evaluated,
                                 cpu_s=time.process_time() - cpu_evaluated, device=device))
        if is_main:
            checkpoint_dir = runs.write_state(output_dir, {
                "student": unwrap(distiller.student).state_dict(), "extras": distiller.extras.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                "epoch": epoch, "best_score": best_score, "cost": dict(cost)})
        if context.report is not None:
            context.report(row, checkpoint_dir)
    return (runs.read_final(output_dir) or {}) if is_main else {}


COST_KEYS = ("cost_images", "cost_attack_passes", "cost_device_s", "cost_wall_s")
"""The run's compute so far, reported cumulatively every epoch: examples trained, forward-and-backward passes
of the inner attack, device-seconds (GPU-seconds on GPUs, CPU-seconds of every rank on CPUs) and wall seconds
(training, per-epoch and final evaluation; start-up excluded)."""


def _add_cost(cost: dict[str, float], *, images: float, attack_passes: float, wall_s: float, cpu_s: float,
              device: torch.device) -> dict[str, float]:
    """Add one stretch of work to the cumulative ``cost`` (summed over ranks) and return a copy for the report."""
    device_s = wall_s if device.type == "cuda" else cpu_s
    spent = _all_reduce_sum(torch.tensor([device_s], dtype=torch.float64, device=device)).item()
    wall = _all_reduce_max(torch.tensor([wall_s], dtype=torch.float64, device=device)).item()
    cost["cost_images"] += images
    cost["cost_attack_passes"] += attack_passes
    cost["cost_device_s"] += spent
    cost["cost_wall_s"] += wall
    return dict(cost)


def _from_rank0(context: LoopContext, read: Callable[[], Any]) -> Any:
    """``read()`` on rank 0, handed to every other rank over the process group (they read nothing from disk:
    on a cluster the run folder may be on rank 0's machine only)."""
    value = [read() if context.rank == 0 else None]
    if _distributed():
        dist.broadcast_object_list(value, src=0, device=context.device if context.device.type == "cuda" else None)
    return value[0]


def _final_evaluation(cfg: RunConfig, output_dir: Path, test_set: Dataset, context: LoopContext,
                      runners: RunnerSource) -> dict[str, Any]:
    """Run the attack suite on the best and last checkpoints; return ``best_*``/``last_*`` and ``best_epoch``.

    Rank 0 reads both checkpoints from the run folder and broadcasts them; each rank evaluates its shard.
    """
    saved = _from_rank0(context, lambda: {which: (output_dir / name).read_bytes() for which, name in
                                          (("best", runs.BEST_CHECKPOINT), ("last", runs.LAST_CHECKPOINT))})
    results: dict[str, dict[str, float]] = {}
    for which in ("best", "last"):
        model = load_model(saved[which]).to(context.device)
        if context.progress and context.rank == 0:
            context.progress(f"final evaluation of the {which} checkpoint: {', '.join(cfg.eval.final_attack_names)}")
        results[which] = evaluate_distributed(model, test_set, cfg.eval.final_attack_names, eps=cfg.eval.eps,
                                              limit=cfg.eval.final_limit, batch_size=cfg.data.eval_batch_size,
                                              rank=context.rank, world_size=context.world_size,
                                              device=context.device, runner=runners())
    best_epoch = read_checkpoint(saved["best"])["epoch"]
    final = {"best": results["best"], "last": results["last"], "best_epoch": best_epoch}
    if context.rank == 0:
        return runs.write_final(output_dir, results["best"], results["last"], best_epoch)
    return runs.flatten_final(final)
