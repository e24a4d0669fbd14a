"""Robustness numbers that survive a stronger attack: the attacks of a verification, and its surrogate.

Plain PyTorch and the project's core (attacks, checkpoints, config, data, the training loop); no Ray,
no MLflow, no plotting. :func:`verify_model` attacks one model at the run's ``eps`` on the first ``limit``
test examples (clean, FGSM, PGD-20, AutoAttack, PGD-100 × 5 restarts, PGD-20 at several eps, and a transfer
attack from an independently trained surrogate) and judges the accuracies with
:func:`crdnd_ray.robustness.run_checks`; :func:`verify_run_folder` verifies a run folder written by the loop.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from crdnd_ray import attacks, runs
from crdnd_ray.attacks import logits_of, model_device, training_flags_restored
from crdnd_ray.checkpoints import load_model
from crdnd_ray.config import RunConfig
from crdnd_ray.data import build_datasets
from crdnd_ray.engine.loop import LoopContext, configure_threads, run_training
from crdnd_ray.engine.teachers import teacher_run_config
from crdnd_ray.robustness import (SURROGATE_DIR, VERIFY_FILE, VerifyError, VerifyResult, VerifySettings,
                                  eps_multiples, read_verify, run_checks, write_verify)
from crdnd_ray.tracking.store import Recorder, download_artifact
from crdnd_ray.tracking.uris import TrackingUnavailable

__all__ = ["VERIFY_COLUMNS", "record_verification", "surrogate_config", "train_surrogate", "verified_columns",
           "ablation_choice", "sweep_choice", "verify_model", "verify_rows", "verify_run_folder", "verify_target", "verify_trials", "warnings_of"]


def _correct(model: nn.Module, attack: attacks.AttackFn, batches: list[tuple[Tensor, Tensor]],
             target: nn.Module | None = None) -> Tensor:
    """Per example, whether ``target`` (default ``model``) still classifies ``attack(model, x, y)`` right."""
    judged = target if target is not None else model
    hits = []
    for x, y in batches:
        x_adv = attack(model, x, y)
        with torch.no_grad():
            hits.append(logits_of(judged(x_adv)).argmax(dim=1) == y)
    return torch.cat(hits).cpu()


def _pct(correct: Tensor) -> float:
    return 100.0 * int(correct.sum()) / len(correct)


def verify_model(model: nn.Module, dataset: Dataset, *, eps: float, limit: int | None = None,
                 batch_size: int = 256, device: torch.device | str | None = None,
                 surrogate: nn.Module | None = None, settings: VerifySettings | None = None,
                 checkpoint: str | None = None,
                 progress: Callable[[str], None] | None = None) -> VerifyResult:
    """Attack ``model`` on the first ``limit`` examples of ``dataset`` at ``eps`` and run the checks.

    Args:
        model: Classifier for inputs in ``[0, 1]``; attacked in eval mode, its training flags restored.
        dataset: Yields ``(x, y)`` with ``x`` in ``[0, 1]``; usually the run's test set.
        eps: The run's L∞ radius (``eval.eps``).
        limit: The first ``limit`` examples (all when None); every attack sees the same ones.
        batch_size: Examples per attack batch.
        device: Where to attack; the model's device when None.
        surrogate: An independently trained model of the same task for the ``transfer`` check
            (:func:`train_surrogate`); without it that check is left out.
        settings: Stronger attacks and tolerances (:class:`VerifySettings` defaults when None).
        checkpoint: ``best`` or ``last`` when the model is a run's checkpoint (names the metrics).
        progress: Called with a short line before each stage.

    AutoAttack (standard, through torchattacks 3.5.1) is required: without it this raises the
    install hint of :func:`crdnd_ray.attacks.parse_attack` before any work.
    """
    settings = settings or VerifySettings()
    if not 0 < eps < settings.large_eps:
        raise ValueError(f"verify_model needs 0 < eps < settings.large_eps ({settings.large_eps:g}), got eps={eps}; "
                         "raise large_eps or check the run's eval.eps.")
    autoattack = attacks.parse_attack("autoattack", eps)
    say = progress or (lambda line: None)
    started, started_cpu = time.perf_counter(), time.process_time()
    run_device = torch.device(device) if device is not None else model_device(model)
    total = len(dataset) if limit is None else min(limit, len(dataset))
    if total == 0:
        raise ValueError("verify_model got an empty dataset; check the test split and the limit.")
    loader = DataLoader(Subset(dataset, range(total)), batch_size=batch_size, shuffle=False)
    batches = [(x.to(run_device), y.to(run_device)) for x, y, *_ in loader]
    multiples = eps_multiples(eps, settings)
    long_attack = attacks.parse_attack(f"pgd{settings.long_steps}", eps)
    correct: dict[str, Tensor] = {}
    devices = [run_device] if run_device.type == "cuda" else []

    with torch.random.fork_rng(devices=devices), training_flags_restored(model, False):
        torch.manual_seed(settings.seed)
        for name in ("clean", "fgsm", "pgd20"):
            say(f"{name} on {total} examples at eps {eps:g}")
            correct[name] = _correct(model, attacks.parse_attack(name, eps), batches)
        say(f"AutoAttack (standard) on {total} examples")
        clock, clock_cpu = time.perf_counter(), time.process_time()
        correct["autoattack"] = _correct(model, autoattack, batches)
        if run_device.type == "cuda":
            torch.cuda.synchronize(run_device)
        autoattack_s, autoattack_cpu = time.perf_counter() - clock, time.process_time() - clock_cpu
        say(f"PGD-{settings.long_steps} with {settings.restarts} restarts")
        correct[settings.long_name] = torch.stack(
            [_correct(model, long_attack, batches) for _ in range(settings.restarts)]).all(dim=0)
        say(f"PGD-20 at eps {', '.join(f'{m:g}' for m in multiples)} × {eps:g} and at {settings.large_eps:g}")
        curve = {f"pgd20_eps_x{m:g}": correct["pgd20"] if m == 1 else
                 _correct(model, attacks.parse_attack("pgd20", m * eps), batches) for m in multiples}
        curve["pgd20_large_eps"] = _correct(model, attacks.parse_attack("pgd20", settings.large_eps), batches)
        if surrogate is not None:
            say("transfer attack: PGD-20 on the surrogate")
            surrogate = surrogate.to(run_device)
            with training_flags_restored(surrogate, False):
                correct["transfer"] = _correct(surrogate, attacks.parse_attack("pgd20", eps), batches, target=model)
                correct["surrogate_clean"] = _correct(surrogate, attacks.parse_attack("clean", eps), batches)

    at_eps = [hits for name, hits in correct.items() if name != "surrogate_clean"]
    accuracies = {name: _pct(hits) for name, hits in {**correct, **curve}.items()}
    accuracies["worst_case"] = _pct(torch.stack(at_eps).all(dim=0))
    timings = {"autoattack": autoattack_s, "autoattack_cpu": autoattack_cpu, "total": time.perf_counter() - started,
               "total_cpu": time.process_time() - started_cpu}
    return VerifyResult(eps=eps, n_eval=total, accuracies=accuracies, checks=run_checks(accuracies, eps, settings),
                        settings=settings, timings=timings, checkpoint=checkpoint)


def surrogate_config(cfg: RunConfig, epochs: int | None = None) -> RunConfig:
    """The run config of the transfer surrogate of ``cfg``.

    The surrogate is the *student's* architecture trained the way the project trains robust teachers
    (``teacher.training``: PGD-AT or TRADES, its learning rate, ``epochs`` or its epoch count), from the seed
    ``experiment.seed + 1``: independent weights, initialisation and data order. It is trained adversarially
    because perturbations from a naturally trained surrogate hardly transfer to a robust model, so a
    natural surrogate would let every model pass; a robust surrogate of the same architecture is the
    strongest cheap black-box attacker, and a model whose white-box PGD it beats hides its gradients. Its
    final evaluation is kept cheap (clean and PGD-20, no AutoAttack).
    """
    overrides: dict[str, Any] = {"teacher.arch": cfg.student.arch, "teacher.kwargs": cfg.student.kwargs,
                                 "experiment.seed": cfg.experiment.seed + 1}
    if epochs is not None:
        overrides["teacher.training.epochs"] = epochs
    run = teacher_run_config(cfg.with_overrides(overrides, source="the surrogate's settings"))
    return run.with_overrides({"eval.final_attacks": ["clean", "pgd20"], "eval.autoattack": False},
                              source="the surrogate's settings")


def train_surrogate(cfg: RunConfig, output_dir: Path, *, epochs: int | None = None,
                    device: torch.device | str = "cpu",
                    progress: Callable[[str], None] | None = None) -> Path:
    """Train the transfer surrogate of ``cfg`` (:func:`surrogate_config`) into ``output_dir``; return its ``best.pt``.

    A surrogate already finished in ``output_dir`` with the same config is reused, so verifying the best
    and then the last checkpoint of a run trains it once.
    """
    output_dir = Path(output_dir)
    run = surrogate_config(cfg, epochs)
    best = output_dir / runs.BEST_CHECKPOINT
    if best.exists() and (output_dir / runs.CONFIG_FILE).exists() and runs.read_config(output_dir) == run:
        return best
    if progress:
        progress(f"training the transfer surrogate ({run.method.name}, {run.student.arch}, "
                 f"{run.train.epochs} epochs) into {output_dir}")
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    runs.write_config(partial, run)
    run_training(run, partial, None, LoopContext(device=torch.device(device), progress=progress))
    shutil.rmtree(output_dir, ignore_errors=True)
    partial.rename(output_dir)
    return best


def verify_run_folder(folder: str | Path, *, checkpoint: Literal["best", "last"] = "best", limit: int | None = None,
                      surrogate: str | Path | None = None, transfer: bool = True,
                      surrogate_epochs: int | None = None, settings: VerifySettings | None = None,
                      device: torch.device | str | None = None, progress: Callable[[str], None] | None = None,
                      write: bool = True) -> VerifyResult:
    """Verify the ``checkpoint`` of a crdnd-ray run folder (``config.yaml`` plus ``best.pt``/``last.pt``).

    Attacks the run's test set at the run's ``eval.eps``, on the first ``limit`` examples (default: the run's
    ``eval.final_limit``, the whole test set when that is unset), with batches of ``data.eval_batch_size``.
    For the ``transfer`` check it uses the surrogate checkpoint ``surrogate``, or else trains one into
    ``<folder>/verify/surrogate`` (:func:`train_surrogate`, reused when it exists; ``surrogate_epochs``
    overrides its epochs); ``transfer=False`` leaves the check out. ``device`` defaults to the GPU when
    there is one. With ``write`` the result is stored in ``<folder>/verify.json`` (:func:`write_verify`).

    Raises:
        VerifyError: When the folder lacks ``config.yaml`` or the checkpoint.
    """
    folder = Path(folder)
    model_path = folder / (runs.BEST_CHECKPOINT if checkpoint == "best" else runs.LAST_CHECKPOINT)
    if not (folder / runs.CONFIG_FILE).is_file():
        raise VerifyError(f"'{folder}' holds no config.yaml, so it is not a crdnd-ray run folder. Pass the folder "
                          "that 'crdnd-ray train' or a sweep trial wrote (it holds config.yaml, best.pt and last.pt).")
    if not model_path.is_file():
        raise VerifyError(f"'{folder}' holds no {checkpoint}.pt: the run has not finished an epoch yet. Let it "
                          "train at least one epoch, or verify the other checkpoint.")
    cfg = runs.read_config(folder)
    run_device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    configure_threads(cfg, run_device)
    model = load_model(model_path).to(run_device)
    files = {"model": str(model_path)}
    surrogate_model = None
    if transfer:
        surrogate_path = Path(surrogate) if surrogate is not None else train_surrogate(
            cfg, folder / SURROGATE_DIR, epochs=surrogate_epochs, device=run_device, progress=progress)
        surrogate_model = load_model(surrogate_path)
        files["surrogate"] = str(surrogate_path)
    _, test_set, _ = build_datasets(cfg.data)
    result = verify_model(model, test_set, eps=cfg.eval.eps,
                          limit=cfg.eval.final_limit if limit is None else limit, batch_size=cfg.data.eval_batch_size,
                          device=run_device, surrogate=surrogate_model, settings=settings, checkpoint=checkpoint,
                          progress=progress)
    result = replace(result, files=files)
    if write:
        write_verify(folder, result)
    return result




VERIFY_COLUMNS = ("verify_autoattack_acc", "verify_gap_pgd20_autoattack", "verify_worst_case_acc")
"""The verified numbers a sweep's or ablation's table shows next to the searched ones (plus ``verify``)."""


def verify_trials(folder: Path, trial_ids: list[str], progress: Callable[[str], None] | None = None,
                  ) -> dict[str, VerifyResult]:
    """Verify the best checkpoint of these trials of a sweep or ablation folder (``trials/<id>/``).

    One transfer surrogate serves them all: it is trained once into ``<folder>/verify/surrogate`` (and again
    only for a trial whose surrogate config differs).
    """
    results: dict[str, VerifyResult] = {}
    for trial_id in trial_ids:
        trial_folder = Path(folder) / "trials" / trial_id
        surrogate = train_surrogate(runs.read_config(trial_folder), Path(folder) / SURROGATE_DIR, progress=progress)
        if progress:
            progress(f"verifying trial {trial_id}: AutoAttack and the sanity checks")
        results[trial_id] = verify_run_folder(trial_folder, surrogate=surrogate, progress=progress)
    return results


def verified_columns(result: VerifyResult) -> dict[str, Any]:
    """The columns a results table gets for a verified run: :data:`VERIFY_COLUMNS` and the verdict ``verify``."""
    metrics = result.metrics()
    return {**{name: metrics.get(name) for name in VERIFY_COLUMNS}, "verify": result.verdict}


def record_verification(recorder: Recorder, run_id: str, result: VerifyResult, folder: Path) -> None:
    """Log a verification to its MLflow run: the numbers as metrics, the verdicts as tags, ``verify.json``."""
    recorder.log_metrics(run_id, result.metrics())
    recorder.set_tags(run_id, result.tags())
    recorder.log_artifacts(run_id, [Path(folder) / VERIFY_FILE])


def warnings_of(result: VerifyResult, name: str) -> list[str]:
    """The plain-language line of every check that warns, naming the run."""
    return [f"{name}: {check.message}" for check in result.checks if check.verdict == "warn"]


def verify_rows(folder: Path, rows: list[dict[str, Any]], trial_ids: list[str], recorder: Recorder | None,
                parent_run_id: str | None, printer: Callable[[str], None]) -> None:
    """Verify the trials ``trial_ids`` of a sweep's or ablation's result ``rows``: add the verified columns
    to their rows, log each verification to the trial's MLflow run, and print every warning in plain words."""
    results = verify_trials(folder, trial_ids, printer)
    for row in rows:
        result = results.get(row["trial_id"])
        if result is None:
            continue
        row.update(verified_columns(result))
        for line in warnings_of(result, row["trial"]):
            printer(f"warning: {line}")
        run_id = recorder.find_child(parent_run_id, row["trial_id"]) if recorder and parent_run_id else None
        if run_id is not None:
            try:
                record_verification(recorder, run_id, result, Path(folder) / "trials" / row["trial_id"])
            except TrackingUnavailable:
                printer(f"the verification of {row['trial']} waits in its folder: the tracking store does not answer")


def verify_target(target: str, *, tracking_uri: str | None = None, checkpoint: Literal["best", "last"] = "best",
                  limit: int | None = None, transfer: bool = True,
                  printer: Callable[[str], None] = print) -> list[tuple[str, VerifyResult]]:
    """``crdnd-ray verify TARGET``: verify a run folder, the best trials of a sweep folder (its ``verify_top``
    and Pareto front; for an ablation folder each variant's best seed), or an MLflow run by id (its
    ``config.yaml`` and checkpoint are downloaded). Results go to ``verify.json`` in each folder and to the
    run's MLflow record when it has one. Returns ``(name, result)`` per verified run.
    """
    import tempfile

    import pandas as pd

    from crdnd_ray.config import TrackingConfig

    path = Path(target)
    info = runs.read_run_info(path) if path.is_dir() else {}
    kind = info.get("kind")
    if kind in ("sweep", "ablation"):
        cfg = runs.read_config(path)
        table = path / ("results.csv" if kind == "sweep" else "cells.csv")
        if not table.is_file():
            raise VerifyError(f"'{path}' holds no {table.name}: the {kind} has not written its results yet. "
                              f"Let it finish (or --resume it) first.")
        rows = pd.read_csv(table).to_dict("records")
        chosen = (sweep_choice(rows, cfg) if kind == "sweep" else ablation_choice(rows, cfg))
        recorder = Recorder(cfg.tracking, cfg.experiment.name) if cfg.tracking.enabled else None
        verify_rows(path, rows, chosen, recorder, info.get("mlflow_run_id"), printer)
        pd.DataFrame(rows).to_csv(table, index=False)
        return [(row["trial"], read_verify(path / "trials" / row["trial_id"])["best"]) for row in rows
                if row["trial_id"] in chosen]
    if path.is_dir():
        result = verify_run_folder(path, checkpoint=checkpoint, limit=limit, transfer=transfer, progress=printer)
        cfg = runs.read_config(path)
        if info.get("mlflow_run_id") and cfg.tracking.enabled:
            record_verification(Recorder(cfg.tracking, cfg.experiment.name), info["mlflow_run_id"], result, path)
        return [(str(path), result)]
    if not re.fullmatch(r"[0-9a-f]{32}", target):
        raise VerifyError(f"'{target}' is neither a folder nor an MLflow run id. Pass a run, sweep or ablation output "
                          "folder, or a 32-character run id (with --tracking-uri for its store).")
    tracking = TrackingConfig(uri=tracking_uri) if tracking_uri else TrackingConfig()
    folder = Path(tempfile.mkdtemp(prefix="crdnd-ray-verify-"))
    for name in (runs.CONFIG_FILE, runs.BEST_CHECKPOINT if checkpoint == "best" else runs.LAST_CHECKPOINT):
        try:
            shutil.copy(download_artifact(tracking, target, name), folder / name)
        except Exception as error:  # noqa: BLE001 - MLflow raises several types for a missing run or artifact
            raise VerifyError(f"The MLflow run {target} in {tracking.uri} has no artifact '{name}' ({error}). Pass "
                              "the store that holds it with --tracking-uri, or verify its output folder.") from None
    result = verify_run_folder(folder, checkpoint=checkpoint, limit=limit, transfer=transfer, progress=printer)
    cfg = runs.read_config(folder)
    record_verification(Recorder(tracking, cfg.experiment.name), target, result, folder)
    return [(target, result)]


def sweep_choice(rows: list[dict[str, Any]], cfg: RunConfig) -> list[str]:
    """A sweep's trials to verify: its ``eval.verify_top`` best by the searched metric and its Pareto front."""
    from crdnd_ray.analysis import pareto_rows

    assert cfg.search is not None
    metric, mode = cfg.search.metrics[0], cfg.search.modes[0]
    ranked = sorted((row for row in rows if row["status"] != "failed" and _number(row.get(metric))),
                    key=lambda row: row[metric], reverse=mode == "max")
    chosen = [row["trial_id"] for row in ranked[:cfg.eval.verify_top]]
    if len(cfg.search.metrics) > 1:
        chosen += [row["trial_id"] for row in pareto_rows(rows, cfg.search.metrics, cfg.search.modes)]
    return list(dict.fromkeys(chosen))


def ablation_choice(rows: list[dict[str, Any]], cfg: RunConfig) -> list[str]:
    """An ablation's trials to verify: each variant's best finished seed by its first metric, or every finished
    seed with ``eval.verify_seeds: all``."""
    assert cfg.ablation is not None
    metric = cfg.ablation.metrics[0]
    finished = [row for row in rows if row["status"] == "finished" and _number(row.get(metric))]
    if cfg.eval.verify_seeds == "all":
        return [row["trial_id"] for row in finished]
    best: dict[str, dict[str, Any]] = {}
    for row in finished:
        if row["variant"] not in best or row[metric] > best[row["variant"]][metric]:
            best[row["variant"]] = row
    return [row["trial_id"] for row in best.values()]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == value
