"""Robust teachers and evaluation end to end: the digits ε, ``crdnd-ray teacher``, ``crdnd-ray evaluate``, caching.

The ε test is the issue's acceptance check of the digits default: at ``eval.eps`` of
search_spaces/digits.yaml a naturally trained small CNN falls below 30 % PGD-20 accuracy, while the PGD-AT
teacher that ``crdnd-ray teacher search_spaces/digits.yaml`` trains (its default ``teacher.training``)
keeps at least 30 points more.

Commands run as subprocesses with ``OMP_NUM_THREADS=1``: on a shared 2-core machine PyTorch's default of
two intra-op threads makes these tiny-tensor workloads several times slower (measured: the teacher
command 294 s with two threads against 68 s with one, under the same load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import small_config
from torch.utils.data import DataLoader

from crdnd_ray.attacks import evaluate
from crdnd_ray.checkpoints import load_model
from crdnd_ray.config import load_config
from crdnd_ray.data import build_datasets
from crdnd_ray.models import build_model
from crdnd_ray.engine.teachers import _teacher_key, prepare_teacher

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "search_spaces" / "digits.yaml"
CLI = str(Path(sys.executable).with_name("crdnd-ray"))
TEACHER_BUDGET_S = 120.0
"""The issue's bound on ``crdnd-ray teacher`` for the digits teacher on 2 cores."""


def _command(args: list[str], cwd: Path, timeout: float = 480) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    return done, time.perf_counter() - started


@pytest.fixture(scope="module")
def cli_teacher(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``crdnd-ray teacher search_spaces/digits.yaml`` with its default training settings, run once."""
    folder = tmp_path_factory.mktemp("cli-teacher")
    done, wall = _command(["teacher", str(DIGITS), "--output", str(folder / "out"),
                           "--set", "tracking.enabled=false"], cwd=folder)
    print(f"\ncrdnd-ray teacher (digits default, {load_config(DIGITS).teacher.training.epochs} epochs): "
          f"{wall:.1f} s wall\n{done.stdout}")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"folder": folder / "out", "wall_s": wall, "stdout": done.stdout, "stderr": done.stderr}


@pytest.fixture(scope="module")
def digits_test_set():
    cfg = load_config(DIGITS)
    return build_datasets(cfg.data)


def _train_natural(train_set, arch: str, kwargs: dict, epochs: int = 3, seed: int = 0) -> torch.nn.Module:
    """A small CNN trained with plain cross-entropy on clean digits (Adam), no attack at all."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10, in_channels=1, **kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.mark.slow
def test_teacher_command_writes_checkpoint_and_metrics(cli_teacher):
    folder = cli_teacher["folder"]
    for name in ("teacher.pt", "best.pt", "last.pt", "final_metrics.json", "metrics.jsonl", "config.yaml"):
        assert (folder / name).is_file(), f"{name} is missing from {sorted(p.name for p in folder.iterdir())}"
    cfg = load_config(DIGITS)
    epochs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == cfg.teacher.training.epochs
    final = json.loads((folder / "final_metrics.json").read_text())
    for which in ("best", "last"):
        metrics = final[which]
        assert set(cfg.eval.final_attacks) <= {k.removesuffix("_acc") for k in metrics}
        assert metrics["n_eval"] == 450
        assert metrics["clean_acc"] >= 90, metrics
        for attack in ("fgsm", "pgd20", "cw"):
            assert metrics[f"{attack}_acc"] <= metrics["clean_acc"], metrics
    teacher = load_model(folder / "teacher.pt", arch=cfg.teacher.arch, num_classes=10, in_channels=1)
    assert sum(p.numel() for p in teacher.parameters()) > 0
    assert "teacher checkpoint:" in cli_teacher["stdout"]
    written = sorted(p.name for p in folder.parent.iterdir())
    assert written == ["out"], f"the command wrote outside --output (its working folder holds {written})"
    assert cli_teacher["wall_s"] < TEACHER_BUDGET_S, (
        f"crdnd-ray teacher took {cli_teacher['wall_s']:.0f} s; the issue asks for under {TEACHER_BUDGET_S:.0f} s")


@pytest.mark.slow
def test_digits_eps_separates_natural_from_robust(cli_teacher, digits_test_set):
    """THE ε TEST: natural model < 30 % PGD-20, the PGD-AT teacher ≥ natural + 30 points, at eval.eps."""
    cfg = load_config(DIGITS)
    eps = cfg.eval.eps
    train_set, test_set, _ = digits_test_set
    natural = _train_natural(train_set, cfg.teacher.arch, dict(cfg.teacher.kwargs))
    teacher = load_model(cli_teacher["folder"] / "teacher.pt")
    loader = DataLoader(test_set, batch_size=256)
    natural_acc = evaluate(natural, loader, ["clean", "pgd20"], eps=eps)
    teacher_acc = evaluate(teacher, loader, ["clean", "pgd20"], eps=eps)
    print(f"\neps={eps}: natural {natural_acc}, teacher {teacher_acc}")
    assert natural_acc["n_eval"] == teacher_acc["n_eval"] == len(test_set)
    assert natural_acc["clean_acc"] >= 90, f"the natural model did not learn digits: {natural_acc}"
    assert natural_acc["pgd20_acc"] < 30, f"eps={eps} leaves the natural model {natural_acc['pgd20_acc']:.1f} %"
    assert teacher_acc["pgd20_acc"] >= natural_acc["pgd20_acc"] + 30, (natural_acc, teacher_acc)
    assert teacher_acc["clean_acc"] >= 90, teacher_acc


@pytest.mark.slow
def test_evaluate_command_reports_all_five_attacks(cli_teacher, tmp_path):
    """``crdnd-ray evaluate`` with the full suite; AutoAttack's Square is slow, so only 16 samples."""
    out = tmp_path / "out.json"
    limit = 16
    done, wall = _command(["evaluate", str(cli_teacher["folder"] / "teacher.pt"), "--config", str(DIGITS),
                           "--attacks", "clean,fgsm,pgd20,cw,autoattack", "--limit", str(limit), "--json", str(out),
                           "--set", "tracking.enabled=false"], cwd=tmp_path)
    print(f"\ncrdnd-ray evaluate ({limit} samples, 5 attacks): {wall:.1f} s wall\n{done.stdout}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    names = ["clean", "fgsm", "pgd20", "cw", "autoattack"]
    for name in names:
        assert 0 <= results[f"{name}_acc"] <= 100
        assert name in done.stdout, "the table shows every attack"
    assert results["n_eval"] == limit and results["eps"] == load_config(DIGITS).eval.eps
    for name in names[1:]:
        assert results[f"{name}_acc"] <= results["clean_acc"], results
    assert results["clean_acc"] >= 80


def test_evaluate_rejects_an_unknown_attack_and_a_bad_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from crdnd_ray.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(tmp_path / "x.pt"), "--attacks", "clean,pgd", "--set",
                                 "tracking.enabled=false"])
    assert result.exit_code == 2 and "--attacks" in result.stderr and "Traceback" not in result.output
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00" * 64)
    result = runner.invoke(app, ["evaluate", str(broken), "--attacks", "clean", "--set", "tracking.enabled=false"])
    assert result.exit_code == 2 and str(broken) in result.stderr and "Traceback" not in result.output


def _quick_teacher_config(**overrides):
    base = {"teacher.training.epochs": 1, "data.train_limit": 128, "eval.epoch_limit": 32, "eval.final_limit": 32,
            "eval.final_attacks": ["clean", "pgd20"], "teacher.kwargs": {"width": 8}}
    base.update(overrides)
    return small_config(**base)


def test_teacher_is_cached_by_config_hash(tmp_path):
    cache = tmp_path / "cache"
    cfg = _quick_teacher_config()
    messages: list[str] = []
    started = time.perf_counter()
    first = prepare_teacher(cfg, messages.append, cache_root=cache)
    trained_s = time.perf_counter() - started
    assert first is not None and first.is_file() and first.parent.parent == cache
    assert any("training the teacher" in m for m in messages)
    assert not list(cache.glob("*.partial")), "the partial folder is renamed once training finished"
    mtime = first.stat().st_mtime_ns

    messages.clear()
    started = time.perf_counter()
    second = prepare_teacher(_quick_teacher_config(), messages.append, cache_root=cache)
    cached_s = time.perf_counter() - started
    print(f"\nteacher trained in {trained_s:.1f} s, found in the cache in {cached_s:.3f} s")
    assert second == first and second.stat().st_mtime_ns == mtime
    assert any("cached" in m for m in messages) and not any("training" in m for m in messages)
    assert cached_s < 1.0 and cached_s < trained_s / 5

    # Student-only settings share the teacher; anything that changes the teacher gets a new folder.
    same = [{"method.contrastive.weight": 2.0}, {"method.temperature": 4.0}, {"method.compensation.kind": "none"},
            {"train.epochs": 5}, {"student.kwargs": {"width": 8}}, {"tracking.enabled": True},
            {"data.root": str(tmp_path / "elsewhere")}, {"search": None}, {"method.trades.beta": 3.0},
            {"train.weight_decay": 1e-3}, {"eval.verify": True}, {"eval.verify_top": 1}]
    for change in same:
        assert _teacher_key(_quick_teacher_config(**change)) == _teacher_key(cfg), change
    different = [{"teacher.training.lr": 0.1}, {"teacher.training.epochs": 2}, {"teacher.training.method": "trades"},
                 {"teacher.kwargs": {"width": 4}}, {"attack.eps": 0.1}, {"experiment.seed": 1},
                 {"data.train_limit": 64}, {"teacher.training.weight_decay": 1e-3}]
    keys = {_teacher_key(_quick_teacher_config(**change)) for change in different}
    assert len(keys) == len(different) and _teacher_key(cfg) not in keys
    trades = {"teacher.training.method": "trades"}
    assert (_teacher_key(_quick_teacher_config(**trades, **{"method.trades.beta": 3.0}))
            != _teacher_key(_quick_teacher_config(**trades))), "one TRADES β: method.trades.beta trains the teacher"
    third = prepare_teacher(_quick_teacher_config(**{"teacher.training.lr": 0.1}), cache_root=cache)
    assert third is not None and third != first and third.parent.parent == cache and third.is_file()
    assert first.stat().st_mtime_ns == mtime
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_prepare_teacher_is_none_for_methods_without_teacher(tmp_path):
    assert prepare_teacher(small_config(**{"method.name": "sat"}), cache_root=tmp_path / "c") is None
    assert not (tmp_path / "c").exists()
