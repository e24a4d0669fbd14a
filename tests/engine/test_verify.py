"""Tests for crdnd_ray.engine.verify: AutoAttack and the gradient-masking checks on a digits student.

One honest PGD-AT student and its surrogate are trained once for the module; the masked model is that
student with its logits multiplied by 1e4, so the softmax saturates and cross-entropy gradients vanish.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from conftest import small_config
from crdnd_ray.checkpoints import load_model
from crdnd_ray.config import load_config
from crdnd_ray.data import build_datasets
from crdnd_ray.engine.loop import run_training
from crdnd_ray.engine.verify import surrogate_config, train_surrogate, verify_model, verify_run_folder
from crdnd_ray.robustness import (CHECKS, GRADIENT_MASKING_CHECKS, SURROGATE_DIR, VERIFY_FILE, VerifyError,
                                  VerifyResult, VerifySettings, read_verify, run_checks)

pytest.importorskip("torchattacks", reason="verification needs AutoAttack from torchattacks")

LIMIT = 150


class Saturated(nn.Module):
    """Gradient masking by construction: the same predictions, logits scaled until the softmax saturates."""

    def __init__(self, model: nn.Module, scale: float = 1e4) -> None:
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.model(x)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished PGD-AT run of the digits student (small_cnn, width 16), as `crdnd-ray train` leaves it."""
    cfg = small_config(**{"method.name": "sat", "train.lr": 0.05, "train.epochs": 6, "attack.steps": 5,
                          "eval.final_attacks": ["clean"], "eval.final_limit": LIMIT})
    folder = tmp_path_factory.mktemp("run")
    run_training(cfg, folder, None)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.run_dict(), sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def honest(run_folder: Path) -> VerifyResult:
    return verify_run_folder(run_folder)


@pytest.fixture(scope="module")
def masked(run_folder: Path, honest: VerifyResult) -> VerifyResult:
    cfg = load_config(run_folder / "config.yaml")
    _, test_set, _ = build_datasets(cfg.data)
    surrogate = load_model(train_surrogate(cfg, run_folder / SURROGATE_DIR))
    model = Saturated(load_model(run_folder / "best.pt"))
    return verify_model(model, test_set, eps=cfg.eval.eps, limit=LIMIT, surrogate=surrogate)


def test_honest_student_passes_the_gradient_masking_checks(honest):
    print("\n".join(honest.lines()))
    assert [check.name for check in honest.checks] == list(CHECKS)
    assert honest.gradient_masking == "pass"
    for name in GRADIENT_MASKING_CHECKS:
        assert honest.check(name).verdict == "pass", honest.check(name).message
    acc = honest.accuracies
    assert honest.n_eval == LIMIT and honest.eps == 0.2
    assert acc["clean"] > 85 and acc["clean"] >= acc["fgsm"] >= acc["pgd20"] >= acc["autoattack"] > 10
    assert acc["pgd20_eps_x0.5"] >= acc["pgd20"] >= acc["pgd20_eps_x2"] >= acc["pgd20_large_eps"]
    assert acc["pgd20_large_eps"] == 0
    assert acc["transfer"] > acc["pgd20"] and acc["surrogate_clean"] > 70
    assert acc["worst_case"] <= min(acc["autoattack"], acc["pgd100x5"], acc["transfer"])
    assert honest.timings["total"] >= honest.timings["autoattack"] > 0 and honest.timings["autoattack_cpu"] > 0


def test_saturated_logits_are_flagged_by_eps_growth_transfer_and_the_autoattack_gap(honest, masked):
    print("\n".join(masked.lines()))
    flagged = {check.name for check in masked.checks if check.verdict == "warn"}
    assert {"eps_growth", "transfer", "autoattack_gap"} <= flagged
    assert masked.gradient_masking == "warn" and masked.verdict == "warn"
    assert honest.check("eps_growth").verdict == honest.check("transfer").verdict == "pass"
    acc = masked.accuracies
    assert acc["clean"] == honest.accuracies["clean"]
    assert acc["fgsm"] >= acc["clean"] - 2
    assert acc["pgd20"] > honest.accuracies["pgd20"] + 30
    assert acc["pgd20_large_eps"] > 20
    assert acc["autoattack"] <= honest.accuracies["pgd20"]
    assert masked.check("autoattack_gap").numbers["gap"] > honest.check("autoattack_gap").numbers["gap"] + 30


def test_warnings_are_plain_sentences_with_the_numbers(masked):
    for check in masked.checks:
        assert re.fullmatch(r"[A-Z(].*[.)]", check.message), check.message
        assert not re.search(r"[{}\[\]]|_acc|pgd20_|None|nan", check.message.replace("[0, 1]", "")), check.message
    gap = masked.check("autoattack_gap")
    assert re.fullmatch(r"PGD-20 overstates robustness by (\d+\.\d) points: AutoAttack finds \1 points more "
                        r"adversarial examples \(PGD-20 \d+\.\d %, AutoAttack \d+\.\d %\)\. "
                        r"Report AutoAttack, not PGD-20\.", gap.message), gap.message
    assert f"{gap.numbers['pgd20']:.1f} %" in gap.message
    assert "gradient masking" in masked.check("transfer").message
    assert "gradient masking" in masked.check("eps_growth").message
    assert "at eps 1 " in masked.check("eps_growth").message


def test_verify_json_holds_every_check_and_reads_back(run_folder, honest):
    stored = json.loads((run_folder / VERIFY_FILE).read_text())
    assert stored["format"] == "crdnd-ray-verify/1" and list(stored["results"]) == ["best"]
    entry = stored["results"]["best"]
    assert [check["name"] for check in entry["checks"]] == list(CHECKS)
    assert all(check["verdict"] in ("pass", "warn") and check["message"] for check in entry["checks"])
    assert entry["verdict"] == honest.verdict and entry["gradient_masking"] == "pass"
    assert entry["files"]["model"].endswith("best.pt") and SURROGATE_DIR.as_posix() in entry["files"]["surrogate"]
    assert read_verify(run_folder)["best"] == honest


def test_metrics_and_tags_are_flat_and_named_by_checkpoint(honest):
    metrics, tags = honest.metrics(), honest.tags()
    assert metrics["verify_autoattack_acc"] == honest.accuracies["autoattack"]
    assert metrics["verify_gap_pgd20_autoattack"] == pytest.approx(
        honest.accuracies["pgd20"] - honest.accuracies["autoattack"])
    for name in ("verify_clean_acc", "verify_fgsm_acc", "verify_pgd20_acc", "verify_pgd100x5_acc",
                 "verify_transfer_acc", "verify_worst_case_acc", "verify_pgd20_eps_x2_acc",
                 "verify_pgd20_large_eps_acc", "verify_gap_pgd20_pgd100x5", "verify_gap_whitebox_transfer",
                 "verify_autoattack_time_s", "verify_n_warn", "verify_n_eval"):
        assert isinstance(metrics[name], float), name
    assert set(tags) == {f"verify.{name}" for name in CHECKS} | {"verify.gradient_masking", "verify"}
    assert set(tags.values()) <= {"pass", "warn"} and tags["verify"] == honest.verdict
    last = replace(honest, checkpoint="last")
    assert "verify_last_autoattack_acc" in last.metrics() and last.tags()["verify_last"] == honest.verdict


def test_the_surrogate_is_an_independent_robust_student_trained_once(run_folder, honest):
    cfg = load_config(run_folder / "config.yaml")
    surrogate = surrogate_config(cfg)
    assert surrogate.student == cfg.student and surrogate.method.name == cfg.teacher.training.method
    assert surrogate.experiment.seed == cfg.experiment.seed + 1
    path = run_folder / SURROGATE_DIR / "best.pt"
    before = path.stat().st_mtime_ns
    assert train_surrogate(cfg, run_folder / SURROGATE_DIR) == path and path.stat().st_mtime_ns == before
    another_trial = cfg.with_overrides({"method.contrastive.weight": 1.5, "method.compensation.kind": "transition",
                                        "train.lr": 3.0}, source="another trial of a sweep")
    assert train_surrogate(another_trial, run_folder / SURROGATE_DIR) == path, "one surrogate serves a whole sweep"
    assert path.stat().st_mtime_ns == before


def test_tolerances_decide_the_verdicts(honest):
    gap = honest.check("autoattack_gap").numbers["gap"]
    loose = replace(honest.settings, gap_tolerance=gap, steps_tolerance=100)
    strict = replace(honest.settings, gap_tolerance=max(gap - 0.1, 0))
    judged = {c.name: c.verdict for c in run_checks(honest.accuracies, honest.eps, loose)}
    assert judged["autoattack_gap"] == judged["more_iterations"] == "pass"
    if gap > 0:
        judged = {c.name: c.verdict for c in run_checks(honest.accuracies, honest.eps, strict)}
        assert judged["autoattack_gap"] == "warn"


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(VerifyError, match="no config.yaml.*crdnd-ray train"):
        verify_run_folder(tmp_path)
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(VerifyError, match="no last.pt.*at least one epoch"):
        verify_run_folder(tmp_path, checkpoint="last")
    with pytest.raises(VerifyError, match="has not been verified yet"):
        read_verify(tmp_path)
    with pytest.raises(ValueError, match="gap_tolerance is negative"):
        VerifySettings(gap_tolerance=-1)


def test_without_torchattacks_nothing_runs_and_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    attacked = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    model.register_forward_hook(lambda *args: attacked.append(True))
    data = TensorDataset(torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(RuntimeError, match=r"pip install --no-deps torchattacks==3\.5\.1"):
        verify_model(model, data, eps=0.1)
    assert not attacked
