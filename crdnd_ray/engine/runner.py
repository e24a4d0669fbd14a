"""One training run, start to finish: teacher, local or Ray Train execution, and its MLflow run.

The run is recorded while it trains: each epoch's report feeds a :class:`~crdnd_ray.tracking.RunRecord`
(in this process, or from Ray Train's controller with several workers). The MLflow run id is kept in the
run folder's ``run.json``, so ``train --resume`` continues the same MLflow run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from crdnd_ray import runs
from crdnd_ray.config import RunConfig, flatten
from crdnd_ray.engine.loop import LoopContext, run_training
from crdnd_ray.engine.preflight import check_config
from crdnd_ray.engine.teachers import load_teacher, prepare_teacher
from crdnd_ray.tracking.record import RunRecord
from crdnd_ray.tracking.store import Recorder

__all__ = ["open_record", "train_run"]


def train_run(cfg: RunConfig, output_dir: Path, progress: Callable[[str], None] | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Prepare the teacher, train ``cfg`` (in-process for one worker, Ray Train otherwise), return final metrics.

    With one worker and ``scaling.in_process_single_worker`` the loop runs in this process (no Ray
    start-up); ``--workers N`` or ``scaling.num_workers > 1`` runs it on Ray Train. When tracking is on, the
    run is a top-level MLflow run, finished with its status — also when it fails or is interrupted.
    """
    output_dir = Path(output_dir)
    check_config(cfg)
    teacher_path = prepare_teacher(cfg, progress)
    record = open_record(cfg, output_dir, resume) if cfg.tracking.enabled else None
    if record is not None and progress:
        progress(f"recording in MLflow: experiment '{cfg.experiment.name}', run {record.run_id} "
                 f"({record.recorder.tracking_uri})")
    try:
        final = _execute(cfg, output_dir, teacher_path, progress, resume, record.report if record else None)
    except KeyboardInterrupt:
        if record is not None:
            record.finish(interrupted=True)
        raise KeyboardInterrupt(f"continue it with 'crdnd-ray train --resume {output_dir}'") from None
    except BaseException as error:
        if record is not None:
            record.finish(error=f"{type(error).__name__}: {error}".strip(": "))
        raise
    if record is not None:
        record.finish()
    return final


def open_record(cfg: RunConfig, output_dir: Path, resume: bool) -> RunRecord:
    """The MLflow run of a ``train`` run folder: the one in its ``run.json`` when resuming, else a new one."""
    recorder = Recorder(cfg.tracking, cfg.experiment.name)
    known = runs.read_run_info(output_dir).get("mlflow_run_id") if resume else None
    if known:
        return RunRecord.reopen(recorder, known, output_dir)
    record = RunRecord.start(recorder, f"train-{output_dir.name}", flatten(cfg.run_dict()),
                             {"method": cfg.method.name, "seed": cfg.experiment.seed,
                              "output_dir": str(output_dir.resolve())}, output_dir)
    runs.update_run_info(output_dir, mlflow_run_id=record.run_id, tracking_uri=recorder.tracking_uri)
    return record


def _execute(cfg: RunConfig, output_dir: Path, teacher_path: Path | None, progress: Callable[[str], None] | None,
             resume: bool, report: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    if cfg.scaling.num_workers == 1 and cfg.scaling.in_process_single_worker:
        teacher = load_teacher(cfg, teacher_path) if teacher_path else None
        state = output_dir / runs.STATE_DIR
        context = LoopContext(progress=progress, resume_from=state if resume and state.exists() else None,
                              report=(lambda row, _checkpoint: report(row)) if report else None)
        return run_training(cfg, output_dir, teacher, context)
    from crdnd_ray.engine.distributed import run_distributed

    if progress:
        progress(f"starting Ray Train with {cfg.scaling.num_workers} worker(s)")
    return run_distributed(cfg, output_dir, teacher_path, resume=resume, report=report)
