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
    start-up); ``--workers N`` or ``scaling.num_workers > 1`` runs it on Ray Train. When tracking is on,
    the run is recorded as a top-level MLflow run — also when it fails or is interrupted, with what it
    reached and the reason.
    """
    from crdnd_ray.teachers import prepare_teacher

    teacher_path = prepare_teacher(cfg, progress)
    try:
        final = _execute(cfg, Path(output_dir), teacher_path, progress, resume)
    except BaseException as error:
        _record(cfg, Path(output_dir), progress, "failed", f"{type(error).__name__}: {error}".strip(": "))
        raise
    _record(cfg, Path(output_dir), progress, "finished", None)
    return final


def _execute(cfg: RunConfig, output_dir: Path, teacher_path: Path | None, progress: Callable[[str], None] | None,
             resume: bool) -> dict[str, Any]:
    from crdnd_ray.engine.loop import CHECKPOINT_DIR, LoopContext, run_training
    from crdnd_ray.teachers import load_teacher

    if cfg.scaling.num_workers == 1 and cfg.scaling.in_process_single_worker:
        teacher = load_teacher(cfg, teacher_path) if teacher_path else None
        checkpoint = output_dir / CHECKPOINT_DIR
        resume_from = checkpoint if resume and checkpoint.exists() else None
        return run_training(cfg, output_dir, teacher, LoopContext(progress=progress, resume_from=resume_from))
    from crdnd_ray.engine.distributed import run_distributed

    if progress:
        progress(f"starting Ray Train with {cfg.scaling.num_workers} worker(s)")
    return run_distributed(cfg, output_dir, teacher_path, resume=resume)


def _record(cfg: RunConfig, output_dir: Path, progress: Callable[[str], None] | None, status: str,
            reason: str | None) -> None:
    if not cfg.tracking.enabled:
        return
    from crdnd_ray.tracking import Recorder, log_finished_run

    recorder = Recorder(cfg.tracking, cfg.experiment.name)
    run_id = log_finished_run(recorder, cfg.run_dict(), output_dir, name=f"train-{output_dir.name}",
                              tags={"method": cfg.method.name, "seed": cfg.experiment.seed,
                                    "output_dir": str(output_dir.resolve())},
                              status=status if status == "failed" else None, reason=reason)
    if progress:
        progress(f"recorded in MLflow: experiment '{cfg.experiment.name}', run {run_id} ({recorder.tracking_uri})")
