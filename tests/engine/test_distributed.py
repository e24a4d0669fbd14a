"""Tests of data-parallel training (engine.distributed on Ray Train) and of resuming runs.

* Gradient equivalence runs two gloo processes (torch.multiprocessing, no Ray). PyTorch's SyncBatchNorm
  refuses CPU tensors (the test records its error), so the student's BatchNorm layers run on their
  running statistics for that step: per-shard batch statistics then cannot differ from the full
  batch's, and everything else the step does (inner attack, compensation, the contrastive loss's
  all-gather with gradient, DDP's gradient averaging) is compared exactly as the loop runs it.
* The Ray tests share the session's local Ray (``ray_session``); one 2-worker run with an injected
  worker death serves both the fault-tolerance and the identical-metrics tests.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import REPO, TIMING_KEYS, run_gloo_ranks, small_config
from torch import nn
from typer.testing import CliRunner

from crdnd_ray import runs
from crdnd_ray.cli import app
from crdnd_ray.config import RunConfig
from crdnd_ray.data import build_datasets, dataset_info
from crdnd_ray.engine.distributed import build_trainer, init_ray, run_distributed, wrap_data_parallel
from crdnd_ray.engine.loop import LoopContext, run_training
from crdnd_ray.engine.resources import plan_resources
from crdnd_ray.engine.teachers import load_teacher
from crdnd_ray.methods import build_distiller
from crdnd_ray.models import build_model

BATCH = 64
"""Metric keys that measure time and so differ between two otherwise identical runs."""


def _gradient_config(teacher: Path) -> RunConfig:
    """CRDND with contrast and confidence compensation; a deterministic inner attack (no random start)."""
    return small_config(**{
        "teacher.checkpoint": str(teacher),
        "method.name": "crdnd",
        "method.compensation.kind": "confidence",
        "method.contrastive.kind": "infonce",
        "method.contrastive.weight": 0.5,
        "attack.start": "none",
        "attack.bn_mode": "eval",
    })


def _fixed_batch(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    train, _, _ = build_datasets(cfg.data)
    images, labels = zip(*(train[i] for i in range(BATCH)))
    return torch.stack(images), torch.stack(labels)


def _first_step(cfg: RunConfig, images: torch.Tensor, labels: torch.Tensor,
                world_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and the parameter gradients of one training step, built and wrapped as the loop does."""
    info = dataset_info(cfg.data)
    torch.manual_seed(cfg.experiment.seed)
    student = build_model(cfg.student.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                          **cfg.student.kwargs)
    teacher = load_teacher(cfg, Path(cfg.teacher.checkpoint))
    distiller = build_distiller(cfg.method.name, student, teacher, cfg.method, cfg.attack, info.num_classes)
    distiller.train()
    for module in distiller.student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    trained = wrap_data_parallel(distiller, torch.device("cpu"), world_size)
    loss, _ = trained(images, labels)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in distiller.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _sync_batchnorm_error() -> str:
    """The error SyncBatchNorm raises on CPU tensors in a gloo process group ('' if it runs)."""
    layer = nn.SyncBatchNorm(4).train()
    try:
        layer(torch.randn(4, 4, 2, 2))
    except ValueError as error:
        return str(error)
    return ""


def _gradient_worker(rank: int, world_size: int, cfg_dict: dict, out: str) -> None:
    cfg = RunConfig.model_validate(cfg_dict)
    images, labels = _fixed_batch(cfg)
    local = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    loss, grads = _first_step(cfg, images[local], labels[local], world_size)
    dist.all_reduce(loss)
    sync_error = _sync_batchnorm_error()
    if rank == 0:
        torch.save({"loss": loss / world_size, "grads": grads, "sync_error": sync_error}, out)


def test_two_gloo_ranks_give_the_full_batch_gradient(digits_teacher: Path, tmp_path: Path):
    cfg = _gradient_config(digits_teacher)
    out = str(tmp_path / "ranks.pt")
    run_gloo_ranks(_gradient_worker, 2, cfg.run_dict(), out)
    distributed = torch.load(out)
    images, labels = _fixed_batch(cfg)
    loss, grads = _first_step(cfg, images, labels, world_size=1)

    assert "expected input tensor to be on GPU" in distributed["sync_error"]
    assert {"extras.contrast.student_head.linear.weight", "extras.contrast.teacher_head.linear.weight"} <= set(grads)
    torch.testing.assert_close(distributed["loss"], loss, rtol=1e-5, atol=1e-6)
    assert set(distributed["grads"]) == set(grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _own_folder_worker(rank: int, world_size: int, cfg_dict: dict, teacher: bytes, base: str, resume: bool) -> None:
    """One rank of ``run_training`` with a run folder of its own (``base/rank<r>``) that only rank 0 fills;
    its reports go to ``base/reports-<r>.json``."""
    cfg = RunConfig.model_validate(cfg_dict)
    folder = Path(base) / f"rank{rank}"
    reports: list[dict] = []
    run_training(cfg, folder, load_teacher(cfg, teacher), LoopContext(
        rank=rank, world_size=world_size, report=lambda row, _checkpoint: reports.append(row),
        wrap=functools.partial(wrap_data_parallel, device=torch.device("cpu"), world_size=world_size),
        resume_from=folder / runs.STATE_DIR if resume else None))
    (Path(base) / f"reports-{rank}.json").write_text(json.dumps(reports))


@pytest.mark.slow
def test_only_rank_0_reads_the_run_folder(digits_teacher: Path, tmp_path: Path):
    """Resume state and the final evaluation's checkpoints reach rank 1 over the process group: its own run
    folder never exists, yet it resumes at rank 0's epoch and reports rank 0's final metrics."""
    teacher = digits_teacher.read_bytes()
    first = small_config(**{"train.epochs": 1, "train.max_steps_per_epoch": 3})
    run_gloo_ranks(_own_folder_worker, 2, first.run_dict(), teacher, str(tmp_path), False)
    run_gloo_ranks(_own_folder_worker, 2, first.with_overrides({"train.epochs": 2}).run_dict(), teacher,
                   str(tmp_path), True)

    assert not (tmp_path / "rank1").exists()
    rank0, rank1 = (json.loads((tmp_path / f"reports-{rank}.json").read_text()) for rank in (0, 1))
    assert [row["epoch"] for row in rank0] == [row["epoch"] for row in rank1] == [2]
    assert rank0 == rank1
    final = runs.read_final(tmp_path / "rank0")
    assert {key: rank1[-1][key] for key in final} == final and final["best_n_eval"] == 64
    assert [row["epoch"] for row in runs.read_metrics(tmp_path / "rank0")] == [1, 2]


def _record_reports_callback(path: Path):
    """A Ray Train UserCallback (runs in the controller) that appends every rank's metrics per report."""
    from ray.train import UserCallback

    class RecordReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as file:
                file.write(json.dumps(metrics) + "\n")

    return RecordReports()


@pytest.fixture(scope="module")
def killed_worker_run(ray_session, digits_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-worker, 3-epoch run in which rank 1 dies at the start of epoch 1 (``max_failures=1``)."""
    output = tmp_path_factory.mktemp("killed-worker")
    reports = output.parent / f"{output.name}-reports.jsonl"
    cfg = small_config(**{"teacher.checkpoint": str(digits_teacher), "train.epochs": 3,
                          "scaling.num_workers": 2, "scaling.max_failures": 1})
    plan = plan_resources(cfg.scaling, init_ray(cfg.scaling))
    trainer = build_trainer(cfg, output, digits_teacher, plan, name="train",
                            callbacks=[_record_reports_callback(reports)],
                            extra_config={"kill_rank_at_epoch": [1, 1]})
    trainer.fit()
    return {"output": output, "reports": [json.loads(line) for line in reports.read_text().splitlines()]}


@pytest.mark.slow
def test_killed_worker_resumes_from_the_checkpoint(killed_worker_run: dict):
    output = killed_worker_run["output"]
    assert (output / ".fault-injected").read_text().startswith("rank 1 killed at epoch 1")
    assert [row["epoch"] for row in runs.read_metrics(output)] == [1, 2, 3]
    # Epoch 0 was reported before the failure; the new group resumed from its checkpoint at epoch 1.
    reports = [ranks[0] for ranks in killed_worker_run["reports"]]
    assert [row["epoch"] for row in reports] == [1, 2, 3]
    killed_at = (output / ".fault-injected").stat().st_mtime
    assert reports[0]["epoch_started_at"] < killed_at < reports[1]["epoch_started_at"]
    final = json.loads((output / "final_metrics.json").read_text())
    assert final["last"]["n_eval"] == 64 and 0 <= final["last"]["pgd20_acc"] <= 100


@pytest.mark.slow
def test_every_rank_reports_identical_metrics(killed_worker_run: dict):
    reports = killed_worker_run["reports"]
    assert reports and all(len(ranks) == 2 for ranks in reports)
    for rank0, rank1 in reports:
        assert rank0 == rank1
    assert {"loss", "contrast", "epoch_clean_acc", "epoch_pgd20_acc", "images_per_s"} <= set(reports[0][0])
    assert {"best_pgd20_acc", "last_cw_acc"} <= set(reports[-1][0])


@pytest.mark.slow
def test_one_ray_train_worker_matches_the_local_loop(ray_session, digits_teacher: Path, tmp_path: Path):
    cfg = small_config(**{"teacher.checkpoint": str(digits_teacher), "scaling.in_process_single_worker": False})
    run_training(cfg, tmp_path / "local", load_teacher(cfg, digits_teacher), LoopContext())
    run_distributed(cfg, tmp_path / "ray", digits_teacher)

    local, remote = (runs.read_metrics(tmp_path / name) for name in ("local", "ray"))
    assert [row["epoch"] for row in remote] == [row["epoch"] for row in local] == [1, 2]
    for mine, theirs in zip(local, remote):
        assert set(mine) == set(theirs)
        for key in set(mine) - set(TIMING_KEYS):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-5, abs=1e-6), key
    assert runs.read_final(tmp_path / "ray") == pytest.approx(runs.read_final(tmp_path / "local"))


@pytest.mark.slow
def test_ray_processes_know_their_own_cluster(ray_session):
    """Ray Train's PlacementGroupCleaner uses the State API, which needs $RAY_ADDRESS with several Rays."""
    @ray_session.remote(num_cpus=0.01)
    def inside() -> tuple[str | None, int]:
        from ray.util.state import list_nodes

        return os.environ.get("RAY_ADDRESS"), len(list_nodes())

    address, nodes = ray_session.get(inside.remote())
    gcs_port = ray_session.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    assert address is not None and address.rsplit(":", 1)[1] == gcs_port
    assert nodes == 1
    assert "RAY_ADDRESS" not in os.environ or os.environ["RAY_ADDRESS"] != address


@pytest.mark.slow
def test_cli_reports_an_impossible_request_with_exit_code_2(ray_session, digits_teacher: Path, tmp_path: Path):
    cpus = ray_session.cluster_resources()["CPU"]
    started = time.perf_counter()
    result = CliRunner().invoke(app, [
        "train", str(REPO / "search_spaces" / "digits.yaml"), "--output", str(tmp_path / "run"), "--workers", "8",
        "--set", "tracking.enabled=false", "--set", f"teacher.checkpoint={digits_teacher}",
        "--set", "scaling.resources_per_worker={CPU: 1}",
    ])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "error:" in message and "asks for 8.01 CPU" in message and f"only {cpus:g} CPU" in message
    assert "Traceback" not in result.output
    assert time.perf_counter() - started < 30

    result = CliRunner().invoke(app, [
        "train", str(REPO / "search_spaces" / "digits.yaml"), "--output", str(tmp_path / "gpu"),
        "--set", "tracking.enabled=false", "--set", f"teacher.checkpoint={digits_teacher}",
        "--set", "scaling.use_gpu=true", "--set", "scaling.in_process_single_worker=false",
    ])
    assert result.exit_code == 2, result.output
    assert "has no GPU" in " ".join(result.output.split())


@pytest.mark.slow
def test_a_two_worker_cli_run_writes_nothing_outside_its_output_folder(digits_teacher: Path, tmp_path: Path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "TUNE_"))}
    env["HOME"] = str(home)
    command = [
        str(Path(sys.executable).with_name("crdnd-ray")), "train", str(REPO / "search_spaces" / "digits.yaml"),
        "--workers", "2", "--output", "out", "--set", "tracking.enabled=false", "--set", "train.epochs=1",
        "--set", f"teacher.checkpoint={digits_teacher}", "--set", "eval.epoch_limit=64",
        "--set", "eval.final_limit=64", "--set", "attack.steps=3",
    ]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (home / "ray_results").exists() and not (home / ".ray").exists()
    assert sorted(os.listdir(home)) == []
    assert sorted(os.listdir(work)) == ["out"]
    assert (work / "out" / "final_metrics.json").exists() and (work / "out" / "ray_train").is_dir()


@pytest.mark.slow
def test_a_dead_worker_without_retries_is_named_with_the_resume_command(ray_session, digits_teacher: Path,
                                                                        tmp_path: Path):
    from crdnd_ray.engine.distributed import TrainingFailed

    cfg = small_config(**{"teacher.checkpoint": str(digits_teacher), "train.epochs": 3, "scaling.num_workers": 2,
                          "scaling.max_failures": 0})
    with pytest.raises(TrainingFailed) as caught:
        run_distributed(cfg, tmp_path / "run", digits_teacher, extra_config={"kill_rank_at_epoch": [1, 1]})
    message = str(caught.value)
    print(f"\n{message}")
    assert "the worker process of rank 1 died" in message and f"crdnd-ray train --resume {tmp_path / 'run'}" in message
    assert "scaling.max_failures" in message and "OOM" not in message
    assert [row["epoch"] for row in runs.read_metrics(tmp_path / "run")] == [1], "the checkpointed epoch is kept"
