"""Tests for crdnd_ray.attacks on a tiny MLP trained naturally on sklearn's digits."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from crdnd_ray.attacks import (
    DEFAULT_EVAL_ATTACKS,
    EVAL_ATTACKS,
    ce_loss,
    cw_inf,
    cw_margin_loss,
    evaluate,
    fgsm,
    kl_loss,
    parse_attack,
    pgd,
)

EPS = 0.08
"""On digits in [0, 1] this leaves the natural MLP roughly 50 % PGD-20 accuracy."""

try:
    import torchattacks
except ImportError:
    torchattacks = None

needs_torchattacks = pytest.mark.skipif(torchattacks is None, reason="torchattacks is not installed")


class TinyNet(nn.Module):
    """A digits MLP with BatchNorm and Dropout, so that train/eval mode matters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1)
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.features(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


@pytest.fixture(scope="module")
def model(digits: dict[str, torch.Tensor]) -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = digits["x_train"], digits["y_train"]
    for _ in range(15):
        for start in range(0, len(x), 64):
            loss = F.cross_entropy(net(x[start : start + 64]), y[start : start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.zero_grad(set_to_none=True)
    net.eval()
    return net


@pytest.fixture()
def scratch_model(model: TinyNet) -> TinyNet:
    """A copy for tests that switch modes: train-mode forwards would move the shared BatchNorm stats."""
    return copy.deepcopy(model)


@pytest.fixture()
def batch(digits: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return digits["x_test"][:64], digits["y_test"][:64]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(dim=1) == y).float().mean().item()


@pytest.mark.parametrize("start", ["uniform", "gaussian", "none"])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_pgd_stays_in_ball_and_box(scratch_model, batch, start, bn_mode):
    model = scratch_model
    x, y = batch
    model.train(bn_mode == "train")
    torch.manual_seed(1)
    x_adv = pgd(model, x, ce_loss(y), eps=EPS, step_size=EPS / 4, steps=5, start=start, bn_mode=bn_mode)
    assert model.training == (bn_mode == "train")
    assert x_adv.shape == x.shape
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert all(p.grad is None for p in model.parameters())
    if start != "none":
        assert (x_adv != x).any()


def test_pgd_gaussian_start_respects_tiny_eps(model, batch):
    x, y = batch
    x_adv = pgd(model, x, ce_loss(y), eps=1e-4, step_size=0.0, steps=0, start="gaussian", gaussian_std=0.01)
    assert (x_adv - x).abs().max().item() <= 1e-4 + 1e-7
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


def test_pgd_eval_mode_restores_every_training_flag(scratch_model, batch):
    model = scratch_model
    x, y = batch
    seen_modes: list[bool] = []
    hook = model.features[2].register_forward_pre_hook(lambda module, args: seen_modes.append(module.training))
    model.train()
    model.features[4].eval()
    pgd(model, x, ce_loss(y), eps=EPS, step_size=EPS / 4, steps=2, bn_mode="eval")
    assert model.training and model.features[2].training and model.head.training
    assert not model.features[4].training
    assert seen_modes == [False, False]
    seen_modes.clear()
    pgd(model, x, ce_loss(y), eps=EPS, step_size=EPS / 4, steps=2, bn_mode="train")
    assert seen_modes == [True, True]
    hook.remove()
    assert all(p.grad is None for p in model.parameters())


def test_pgd_works_under_no_grad_and_is_deterministic(model, batch):
    x, y = batch
    with torch.no_grad():
        torch.manual_seed(3)
        first = pgd(model, x, ce_loss(y), eps=EPS, step_size=EPS / 4, steps=5)
        torch.manual_seed(3)
        second = pgd(model, x, ce_loss(y), eps=EPS, step_size=EPS / 4, steps=5)
    assert torch.equal(first, second)
    assert _accuracy(model, first, y) < _accuracy(model, x, y)


def test_pgd_rejects_bad_settings(model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="start"):
        pgd(model, x, ce_loss(y), eps=EPS, step_size=0.01, steps=1, start="zeros")
    with pytest.raises(ValueError, match="bn_mode"):
        pgd(model, x, ce_loss(y), eps=EPS, step_size=0.01, steps=1, bn_mode="frozen")


def test_fgsm_and_cw_presets(model, batch):
    x, y = batch
    x_fgsm = fgsm(model, x, y, EPS)
    assert (x_fgsm - x).abs().max().item() <= EPS + 1e-6
    torch.manual_seed(0)
    x_cw = cw_inf(model, x, y, EPS, step_size=EPS / 4, steps=10)
    assert (x_cw - x).abs().max().item() <= EPS + 1e-6
    assert _accuracy(model, x_cw, y) < _accuracy(model, x, y)


def test_kl_attack_increases_kl(model, batch):
    x, _ = batch
    temperature = 2.0
    with torch.no_grad():
        target = F.softmax(model(x) / temperature, dim=1)
    loss_fn = kl_loss(target, temperature=temperature)

    def kl_at(points: torch.Tensor) -> float:
        with torch.no_grad():
            return loss_fn(model(points)).item()

    torch.manual_seed(0)
    x_adv = pgd(model, x, loss_fn, eps=EPS, step_size=EPS / 4, steps=10, start="gaussian")
    noise = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    assert kl_at(x) == pytest.approx(0.0, abs=1e-4)
    assert kl_at(x_adv) > 10 * kl_at(noise) > 0
    expected = F.kl_div(F.log_softmax(model(x_adv) / temperature, 1), target, reduction="sum").item()
    assert kl_at(x_adv) == pytest.approx(expected)


def test_cw_margin_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 5.0, 1.0], [4.0, 1.0, 0.0], [0.0, 60.0, 3.0]])
    y = torch.tensor([0, 0, 0])
    # Row 0: real 2, best other 5 -> -max(2 - 5 + 10, 0) = -7.
    # Row 1: real 4, best other 1 -> -max(4 - 1 + 10, 0) = -13.
    # Row 2: real 0, best other 60 -> -max(0 - 60 + 10, 0) = 0 (margin beyond kappa).
    assert cw_margin_loss(y, kappa=10.0)(logits).item() == pytest.approx(-20.0)
    assert cw_margin_loss(y, kappa=0.0)(logits).item() == pytest.approx(-3.0)


def test_ce_loss_is_summed():
    logits = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 0])
    assert ce_loss(y)(logits).item() == pytest.approx(F.cross_entropy(logits, y, reduction="sum").item())


def _registered_names() -> list[str]:
    names = [f"{name}20" if name == "pgd" else name for name in EVAL_ATTACKS]
    if torchattacks is None:
        names.remove("autoattack")
    return names


def test_registry_covers_default_suite():
    assert {"pgd20" if n == "pgd" else n for n in EVAL_ATTACKS} == set(DEFAULT_EVAL_ATTACKS)


def test_robust_accuracy_never_exceeds_clean(scratch_model, digits):
    model = scratch_model
    loader = DataLoader(TensorDataset(digits["x_test"], digits["y_test"]), batch_size=64)
    names = _registered_names() + ["pgd5"]
    calls: list[tuple[str, int, int]] = []
    model.train()
    torch.manual_seed(0)
    results = evaluate(model, loader, names, eps=EPS, limit=64, progress=lambda *a: calls.append(a))
    assert all(m.training for m in model.modules())
    print("\naccuracies at eps", EPS, results)
    assert results["n_eval"] == 64
    assert set(results) == {f"{name}_acc" for name in names} | {"n_eval"}
    assert results["clean_acc"] > 80.0
    for name in names:
        assert results[f"{name}_acc"] <= results["clean_acc"], name
    assert results["pgd20_acc"] < results["clean_acc"]
    assert results["pgd20_acc"] <= results["pgd5_acc"] + 5.0
    assert [call for call in calls if call[0] == "pgd20"] == [("pgd20", 64, 64)]
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_uses_the_same_samples_and_the_limit(model, digits):
    loader = DataLoader(TensorDataset(digits["x_test"], digits["y_test"]), batch_size=50)
    results = evaluate(model, loader, ["clean", "CLEAN", "fgsm"], eps=0.0, limit=70)
    assert results["n_eval"] == 70
    assert results["clean_acc"] == results["fgsm_acc"]
    assert results["clean_acc"] == pytest.approx(_accuracy(model, digits["x_test"][:70], digits["y_test"][:70]))
    full = evaluate(model, loader, ["clean"], eps=EPS)
    assert full["n_eval"] == len(digits["x_test"])


@needs_torchattacks
def test_pgd20_matches_torchattacks(model, digits):
    x, y = digits["x_test"][:300], digits["y_test"][:300]
    torch.manual_seed(0)
    ours = _accuracy(model, parse_attack("pgd20", EPS)(model, x, y), y)
    reference = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=20, random_start=True)
    theirs = _accuracy(model, reference(x, y), y)
    print(f"\nPGD-20 at eps {EPS}: ours {ours:.2f}%, torchattacks {theirs:.2f}%")
    assert 20.0 <= theirs <= 80.0
    assert abs(ours - theirs) <= 2.0


@needs_torchattacks
def test_autoattack_leaves_caller_rng_alone(model, batch):
    x, y = batch
    attack = parse_attack("autoattack", EPS)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    x_adv = attack(model, x[:8], y[:8])
    assert torch.equal(torch.rand(3), expected)
    assert all(p.grad is None for p in model.parameters())
    assert (x_adv - x[:8]).abs().max().item() <= EPS + 1e-6


def test_autoattack_without_torchattacks_explains_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps torchattacks==3\.5\.1") as info:
        parse_attack("autoattack", EPS)
    assert "make install" in str(info.value) and "mlflow" in str(info.value)


@pytest.mark.parametrize("name", ["pgd", "pgd0", "pgdx", "deepfool", ""])
def test_unknown_attack_names_list_the_valid_ones(model, digits, name):
    with pytest.raises(ValueError, match="clean, fgsm, pgd<K>.*cw, autoattack"):
        parse_attack(name, EPS)
    loader = DataLoader(TensorDataset(digits["x_test"][:4], digits["y_test"][:4]), batch_size=4)
    with pytest.raises(ValueError, match="valid names"):
        evaluate(model, loader, ["clean", name], eps=EPS)


def test_parse_attack_names_are_case_insensitive(model, batch):
    x, y = batch
    torch.manual_seed(0)
    upper = parse_attack(" PGD3 ", EPS)(model, x, y)
    torch.manual_seed(0)
    lower = parse_attack("pgd3", EPS)(model, x, y)
    assert torch.equal(upper, lower)
    assert torch.equal(parse_attack("FGSM", EPS)(model, x, y), fgsm(model, x, y, EPS))
