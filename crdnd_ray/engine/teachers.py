"""Robust teachers: train one (PGD-AT or TRADES), load a checkpoint, and cache by config hash.

A teacher is trained by the same loop as students: the teacher's architecture becomes the "student" of a
``sat`` or ``trades`` run with no teacher. A teacher trained on behalf of a sweep or ablation is cached
under ``<cache>/<hash>/teacher.pt``, where the hash covers everything that changes the teacher, so it is
trained once and reused.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from torch import nn

from crdnd_ray import runs
from crdnd_ray.checkpoints import load_model
from crdnd_ray.config import CompensationConfig, ContrastiveConfig, IadConfig, RunConfig, config_hash
from crdnd_ray.data import dataset_info
from crdnd_ray.engine.loop import LoopContext, run_training
from crdnd_ray.methods import METHODS

__all__ = ["load_teacher", "needs_teacher", "prepare_teacher", "teacher_cache_root", "teacher_run_config",
           "train_teacher"]


def teacher_cache_root() -> Path:
    """Where cached teachers live: ``$CRDND_RAY_CACHE`` or ``runs/teachers``."""
    return Path(os.environ.get("CRDND_RAY_CACHE", "runs/teachers"))


def needs_teacher(cfg: RunConfig) -> bool:
    """Whether the configured method distils from a teacher."""
    return METHODS[cfg.method.name].needs_teacher if cfg.method.name in METHODS else True


def teacher_run_config(cfg: RunConfig) -> RunConfig:
    """The run config that trains ``cfg``'s teacher: its architecture, adversarially, with no teacher. The
    student's distillation settings (compensation, contrastive loss, IAD) are reset to their defaults: they do
    not change a PGD-AT or TRADES run, and two students that differ only in them get the same teacher run."""
    training = cfg.teacher.training
    return cfg.with_overrides(
        {
            "student.arch": cfg.teacher.arch,
            "student.kwargs": cfg.teacher.kwargs,
            "method.name": training.method,
            "method.temperature": None,
            "method.alpha": None,
            "method.compensation": CompensationConfig().model_dump(mode="json"),
            "method.contrastive": ContrastiveConfig().model_dump(mode="json"),
            "method.iad": IadConfig().model_dump(mode="json"),
            "attack.start": None,
            "attack.bn_mode": None,
            "train.epochs": training.epochs,
            "train.lr": training.lr,
            "train.weight_decay": cfg.train.weight_decay if training.weight_decay is None else training.weight_decay,
            "search": None,
            "ablation": None,
        },
        source="the teacher's training settings",
    )


def _teacher_key(cfg: RunConfig) -> str:
    """The cache key: a hash of every setting that changes the trained teacher, and of nothing else.

    Only the teacher method's own settings count from ``method``: the student's distillation settings
    (temperature, compensation, contrastive loss) do not change a PGD-AT or TRADES teacher, so a run that
    changes only them (``crdnd-ray train best.yaml`` after a sweep) reuses the cached teacher.
    """
    run = teacher_run_config(cfg).run_dict()
    relevant = {key: run[key] for key in ("data", "student", "method", "attack", "train", "eval")}
    relevant["method"] = {"name": run["method"]["name"]}
    if run["method"]["name"] == "trades":
        relevant["method"]["trades"] = run["method"]["trades"]
    relevant["seed"] = cfg.experiment.seed
    relevant["data"] = {k: v for k, v in relevant["data"].items() if k not in ("root", "download", "loader_workers")}
    relevant["eval"] = {k: v for k, v in relevant["eval"].items() if not k.startswith("verify")}
    return config_hash(relevant)


def train_teacher(cfg: RunConfig, output_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Train ``cfg``'s teacher into ``output_dir`` and return the path of its best-PGD checkpoint."""
    run_training(teacher_run_config(cfg), output_dir, None, LoopContext(progress=progress))
    teacher_path = Path(output_dir) / "teacher.pt"
    shutil.copyfile(Path(output_dir) / runs.BEST_CHECKPOINT, teacher_path)
    return teacher_path


def prepare_teacher(cfg: RunConfig, progress: Callable[[str], None] | None = None,
                    cache_root: Path | None = None) -> Path | None:
    """The teacher checkpoint for ``cfg``: the configured file, a cached one, or a freshly trained one.

    Returns None when the method needs no teacher. A configured checkpoint is loaded once here so a bad
    file fails before any trial starts. Commands that need the same teacher at the same time (a sweep and
    an ablation) train it once: the others wait on a lock file beside the cache folder, then use it.
    """
    if not needs_teacher(cfg):
        return None
    if cfg.teacher.checkpoint:
        load_teacher(cfg, Path(cfg.teacher.checkpoint))
        return Path(cfg.teacher.checkpoint)
    folder = (cache_root or teacher_cache_root()) / _teacher_key(cfg)
    cached = folder / "teacher.pt"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cached.exists():
            if progress:
                progress(f"using the cached teacher {cached}")
            return cached
        if progress:
            progress(f"training the teacher ({cfg.teacher.training.method}, {cfg.teacher.arch}) into {folder}")
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        train_teacher(cfg, partial, progress)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    return cached


def load_teacher(cfg: RunConfig, path: Path | bytes) -> nn.Module:
    """Load the teacher of ``cfg`` from ``path`` or the file's bytes (crdnd-ray or RobustBench format), frozen
    in eval mode. Ray workers get the bytes through the object store, never a path on the driver's disk."""
    info = dataset_info(cfg.data)
    teacher_cfg = cfg.teacher
    kwargs: dict[str, Any] = dict(teacher_cfg.kwargs)
    model = load_model(path, arch=teacher_cfg.arch, kwargs=kwargs, num_classes=info.num_classes,
                       in_channels=info.in_channels, checkpoint_format=teacher_cfg.format,
                       mean=teacher_cfg.mean, std=teacher_cfg.std)
    model.requires_grad_(False)
    return model.eval()
