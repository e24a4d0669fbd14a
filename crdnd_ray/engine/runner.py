"""One training run, start to finish: teacher, local or Ray Train execution, MLflow record."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from crdnd_ray.config import RunConfig

__all__ = ["train_run"]


def train_run(cfg: RunConfig, output_dir: Path, progress: Callable[[str], None] | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Prepare the teacher, train ``cfg`` (in-process for one worker, Ray Train otherwise), return final metrics.

    With one worker and ``scaling.in_process_single_worker`` the loop runs in this process (no Ray
    start-up); ``--workers N`` or ``scaling.num_workers > 1`` runs it on Ray Train.
    """
    from crdnd_ray.engine.loop import CHECKPOINT_DIR, LoopContext, run_training
    from crdnd_ray.teachers import load_teacher, prepare_teacher

    teacher_path = prepare_teacher(cfg, progress)
    if cfg.scaling.num_workers == 1 and cfg.scaling.in_process_single_worker:
        teacher = load_teacher(cfg, teacher_path) if teacher_path else None
        checkpoint = Path(output_dir) / CHECKPOINT_DIR
        resume_from = checkpoint if resume and checkpoint.exists() else None
        return run_training(cfg, output_dir, teacher, LoopContext(progress=progress, resume_from=resume_from))
    from crdnd_ray.engine.distributed import run_distributed

    if progress:
        progress(f"starting Ray Train with {cfg.scaling.num_workers} worker(s)")
    return run_distributed(cfg, output_dir, teacher_path, resume=resume)
