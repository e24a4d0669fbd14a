"""Tests of crdnd_ray.methods: registry-driven conformance of every method, and CRDND's components.

Everything runs on CPU on the bundled sklearn digits (1×8×8, scaled to [0, 1]) with tiny
``small_cnn`` networks. Torch is limited to one intra-op thread while this module runs: on a
2-core machine shared with other processes, two spinning threads made each step ~20× slower.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits

from conftest import run_gloo_ranks

from crdnd_ray.config import AttackConfig, MethodConfig
from crdnd_ray.methods import METHODS, Distiller, build_distiller
from crdnd_ray.methods.base import distillation_kl, kl_divergence
from crdnd_ray.methods.compensation import TransitionMatrix, compensated_target, confidence_weights
from crdnd_ray.methods.contrastive import ContrastiveRelation, infonce_loss, relation_loss
from crdnd_ray.models import build_model

NUM_CLASSES = 10
ATTACK = AttackConfig(eps=0.2, step_size=0.05, steps=3)

CRDND_VARIANTS: dict[str, dict] = {
    "confidence-infonce": {},
    "transition-relation": {"compensation": {"kind": "transition"}, "contrastive": {"kind": "relation"}},
    "student-fallback-asymmetric": {
        "compensation": {"kind": "confidence", "fallback": "student", "on_adversarial": False},
        "contrastive": {"kind": "infonce", "symmetric": False, "denoise": False},
    },
    "denoised-contrast-only": {"compensation": {"kind": "none"}, "contrastive": {"kind": "infonce"}},
    "zero-contrast-weight": {"contrastive": {"kind": "infonce", "weight": 0.0}},
}
CASES = [(name, {}) for name in sorted(METHODS) if name != "crdnd"] + [
    ("crdnd", overrides) for overrides in CRDND_VARIANTS.values()
]
CASE_IDS = [name for name in sorted(METHODS) if name != "crdnd"] + [f"crdnd-{key}" for key in CRDND_VARIANTS]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target)


@pytest.fixture(scope="module")
def teacher(digits) -> torch.nn.Module:
    """A small CNN trained for three clean epochs (about 93% training accuracy)."""
    x, y = digits
    torch.manual_seed(0)
    model = build_model("small_cnn", NUM_CLASSES, in_channels=1, width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(3):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 128):
            index = order[start : start + 128]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(dim=1) == y).float().mean() > 0.85
    return model


@pytest.fixture(scope="module")
def batch(digits) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits
    return x[:64], y[:64]


def make(name: str, teacher: torch.nn.Module, seed: int = 0, **method: object) -> Distiller:
    torch.manual_seed(seed)
    student = build_model("small_cnn", NUM_CLASSES, in_channels=1, width=8)
    config = MethodConfig(name=name, **method)
    return build_distiller(name, student, copy.deepcopy(teacher), config, ATTACK, NUM_CLASSES)


def test_build_distiller_rejects_unknown_names(teacher):
    with pytest.raises(ValueError, match="Valid methods are: .*crdnd.*rslad"):
        make("nope", teacher)


def test_registry_holds_every_method():
    assert set(METHODS) == {"crdnd", "rslad", "ard", "iad", "adaad", "sat", "trades", "natural"}
    assert all(cls.name == name for name, cls in METHODS.items())


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=CASE_IDS)
def test_method_conformance(name, overrides, teacher, batch):
    x, y = batch
    distiller = make(name, teacher, **overrides)
    distiller.train()
    if distiller.teacher is not None:
        assert not any(module.training for module in distiller.teacher.modules())
        teacher_before = {key: value.clone() for key, value in distiller.teacher.state_dict().items()}
    trainable = {id(p) for p in distiller.student.parameters()} | {id(p) for p in distiller.extras.parameters()}
    optimizer = torch.optim.Adam(distiller.parameter_groups(weight_decay=0.0), lr=5e-3)

    losses = []
    for step in range(6):
        torch.manual_seed(123)
        loss, parts = distiller(x, y)
        assert loss.dim() == 0 and math.isfinite(loss.item())
        assert all(torch.isfinite(value).all() and not value.requires_grad for value in parts.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            for parameter in distiller.parameters():
                if id(parameter) in trainable:
                    assert parameter.grad is not None, "every student/extra parameter must get a gradient (DDP)"
                else:
                    assert parameter.grad is None
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < losses[0], losses
    if distiller.teacher is not None:
        assert not any(module.training for module in distiller.teacher.modules())
        for key, value in distiller.teacher.state_dict().items():
            assert torch.equal(value, teacher_before[key]), key
        assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())


def test_crdnd_without_components_equals_rslad(teacher, batch):
    x, y = batch
    rslad = make("rslad", teacher, seed=3)
    crdnd = make("crdnd", teacher, seed=3, compensation={"kind": "none"}, contrastive={"kind": "none"})
    assert len(crdnd.extras) == 0
    results = []
    for distiller in (rslad, crdnd):
        distiller.train()
        torch.manual_seed(7)
        loss, parts = distiller(x, y)
        loss.backward()
        results.append((loss, parts, [p.grad for p in distiller.student.parameters()]))
    (loss_r, parts_r, grads_r), (loss_c, parts_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_r, rtol=0, atol=0)
    torch.testing.assert_close(parts_c["kd_adv"], parts_r["kd_adv"])
    torch.testing.assert_close(parts_c["kd_nat"], parts_r["kd_nat"])
    for grad_c, grad_r in zip(grads_c, grads_r):
        torch.testing.assert_close(grad_c, grad_r)
    assert {"kd_adv", "kd_nat", "train_teacher_acc", "train_adv_acc"} <= set(parts_c)


def test_rslad_loss_is_a_tenth_of_batch_mean_kl(teacher, batch):
    x, y = batch
    rslad = make("rslad", teacher)
    torch.manual_seed(0)
    loss, parts = rslad(x, y)
    expected = 0.1 * (5 / 6 * parts["kd_adv"] + 1 / 6 * parts["kd_nat"])
    torch.testing.assert_close(loss.detach(), expected)


def test_crdnd_creates_only_extras_it_uses(teacher):
    assert set(make("crdnd", teacher).extras) == {"contrast"}
    assert set(make("crdnd", teacher, contrastive={"weight": 0.0}).extras) == set()
    assert set(make("crdnd", teacher, contrastive={"kind": "none"}).extras) == set()
    both = make("crdnd", teacher, compensation={"kind": "transition"}, contrastive={"kind": "relation"})
    assert set(both.extras) == {"transition", "contrast"}


def test_transition_group_has_no_weight_decay_and_its_own_lr(teacher):
    distiller = make("crdnd", teacher, compensation={"kind": "transition", "lr": 0.3})
    groups = {group["name"]: group for group in distiller.parameter_groups(weight_decay=5e-4)}
    assert groups["student"]["weight_decay"] == 5e-4
    assert groups["contrast"]["weight_decay"] == 5e-4 and "lr" not in groups["contrast"]
    assert groups["transition"]["weight_decay"] == 0.0 and groups["transition"]["lr"] == 0.3
    plain = make("crdnd", teacher, compensation={"kind": "transition"})
    assert "lr" not in {group["name"]: group for group in plain.parameter_groups(1e-4)}["transition"]


def test_confidence_weights_follow_the_teacher():
    y = torch.tensor([0, 1, 2])
    teacher = torch.tensor([[0.98, 0.01, 0.01], [0.90, 0.05, 0.05], [0.2, 0.2, 0.6]])
    weights = confidence_weights(teacher, y, beta=1.0)
    assert weights[0] > 0.97
    assert weights[1] < 0.1
    torch.testing.assert_close(weights[2], torch.tensor(0.6))
    assert torch.all(confidence_weights(teacher, y, beta=0.0) == 1)
    assert confidence_weights(teacher, y, beta=2.0)[1] < weights[1]

    flipped = torch.tensor([[0.05, 0.90, 0.05], [0.90, 0.05, 0.05], [0.2, 0.2, 0.6]])
    adversarial = confidence_weights(teacher, y, beta=1.0, teacher_probs_adv=flipped)
    assert adversarial[0] < 0.1
    torch.testing.assert_close(adversarial[1:], weights[1:])


def test_compensated_target_mixes_teacher_and_fallback():
    teacher = torch.softmax(torch.randn(4, 5), dim=1)
    onehot = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    weights = torch.tensor([1.0, 0.0, 0.5, 0.25])
    target = compensated_target(teacher, weights, onehot)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(target[0], teacher[0])
    torch.testing.assert_close(target[1], onehot[1])
    torch.testing.assert_close(target[2], 0.5 * teacher[2] + 0.5 * onehot[2])


def test_kl_reductions():
    logits = torch.randn(6, 4)
    target = torch.softmax(torch.randn(6, 4), dim=1)
    per_sample = (target * (target.log() - F.log_softmax(logits, dim=1))).sum(dim=1)
    log_probs = F.log_softmax(logits, dim=1)
    torch.testing.assert_close(kl_divergence(target, log_probs, "none"), per_sample)
    torch.testing.assert_close(kl_divergence(target, log_probs, "batchmean"), per_sample.mean())
    torch.testing.assert_close(kl_divergence(target, log_probs, "elementmean"), per_sample.mean() / 4)
    soft = torch.softmax(torch.randn(6, 4) / 3, dim=1)
    expected = 9 * F.kl_div(F.log_softmax(logits / 3, dim=1), soft, reduction="batchmean")
    torch.testing.assert_close(distillation_kl(logits, soft, temperature=3.0), expected)


def test_infonce_prefers_aligned_embeddings():
    torch.manual_seed(0)
    teacher = F.normalize(torch.randn(32, 16), dim=1)
    aligned = F.normalize(teacher + 0.1 * torch.randn(32, 16), dim=1)
    shuffled = aligned[torch.roll(torch.arange(32), 1)]
    for symmetric in (True, False):
        good = infonce_loss(aligned, teacher, temperature=0.1, symmetric=symmetric)
        bad = infonce_loss(shuffled, teacher, temperature=0.1, symmetric=symmetric)
        assert good < 0.5 < math.log(32) < bad


def test_denoising_weights_ignore_down_weighted_pairs():
    torch.manual_seed(0)
    teacher = F.normalize(torch.randn(8, 16), dim=1)
    student = teacher.clone()
    student[0] = -teacher[0]
    weights = torch.ones(8)
    assert infonce_loss(student, teacher, 0.1, weights=weights) > 1.0
    weights[0] = 0.0
    assert infonce_loss(student, teacher, 0.1, weights=weights) < infonce_loss(student, teacher, 0.1) / 4


def test_relation_loss_is_zero_when_similarities_agree():
    torch.manual_seed(0)
    teacher = F.normalize(torch.randn(16, 8), dim=1)
    assert relation_loss(teacher.clone(), teacher, temperature=0.1).abs() < 1e-6
    other = F.normalize(torch.randn(16, 8), dim=1)
    assert relation_loss(other, teacher, temperature=0.1) > 0.1


def test_transition_matrix_stays_row_stochastic():
    torch.manual_seed(0)
    transition = TransitionMatrix(5)
    assert transition.diagonal_mass() > 0.9
    optimizer = torch.optim.SGD(transition.parameters(), lr=5.0)
    target = torch.softmax(torch.randn(32, 5) * 3, dim=1)
    student = torch.log_softmax(torch.randn(32, 5), dim=1)
    first = None
    for _ in range(20):
        loss = kl_divergence(target, transition(student))
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    matrix = transition.matrix()
    assert loss.item() < first
    assert torch.all(matrix >= 0)
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(5))
    noisy = transition(student).exp()
    torch.testing.assert_close(noisy, student.exp() @ matrix)
    assert transition.penalty() > 0


def test_iad_introspection_starts_at_begin(teacher, batch):
    x, y = batch
    distiller = make("iad", teacher, iad={"begin": 2, "beta": 0.1})
    distiller.train()
    _, early = distiller(x, y)
    assert "introspection" not in early
    distiller.set_epoch(2)
    _, late = distiller(x, y)
    assert {"introspection", "weight_mean"} <= set(late)


def _contrastive_module(kind: str) -> ContrastiveRelation:
    torch.manual_seed(11)
    return ContrastiveRelation(kind, student_dim=12, teacher_dim=10, dim=6, temperature=0.2, symmetric=True)


def _contrastive_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(8, 12, generator=generator)
    teacher = torch.randn(8, 10, generator=generator)
    weights = torch.rand(8, generator=generator)
    weights[3] = 0.0
    return student, teacher, weights


def _contrastive_worker(rank: int, world_size: int, out: str) -> None:
    student, teacher, weights = _contrastive_data()
    local = slice(rank * 4, rank * 4 + 4)
    results = {}
    for kind in ("infonce", "relation"):
        module = _contrastive_module(kind)
        loss = module(student[local], teacher[local], weights[local])
        loss.backward()
        grads = {}
        for name, parameter in module.named_parameters():
            grad = parameter.grad.clone()
            dist.all_reduce(grad)
            grads[name] = grad / world_size
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[kind] = (mean_loss / world_size, grads)
    if rank == 0:
        torch.save(results, out)


def test_contrastive_loss_over_two_ranks_equals_full_batch(tmp_path: Path):
    out = str(tmp_path / "distributed.pt")
    run_gloo_ranks(_contrastive_worker, 2, out)
    distributed = torch.load(out)
    student, teacher, weights = _contrastive_data()
    for kind in ("infonce", "relation"):
        module = _contrastive_module(kind)
        loss = module(student, teacher, weights)
        loss.backward()
        mean_loss, grads = distributed[kind]
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        for name, parameter in module.named_parameters():
            torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-5, atol=1e-6, msg=f"{kind} {name}")


@pytest.mark.parametrize(("name", "bn_updates_during_attack"), [
    ("crdnd", False), ("rslad", False), ("adaad", False), ("sat", False), ("trades", False), ("ard", True), ("iad", True),
])
def test_each_method_attacks_with_its_published_batchnorm_mode(name, bn_updates_during_attack, teacher, batch):
    """RSLAD, CRDND, AdaAD, PGD-AT and TRADES attack the student with BatchNorm in eval mode; ARD and IAD in train mode,
    which moves the running statistics during the attack's forward passes."""
    x, y = batch
    distiller = make(name, teacher)
    distiller.train()
    norms = [m for m in distiller.student.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms, "the conformance student must have BatchNorm layers"
    before = [m.num_batches_tracked.item() for m in norms]
    adversarial = distiller.inner_attack(x, lambda logits: torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    after = [m.num_batches_tracked.item() for m in norms]
    assert (after != before) == bn_updates_during_attack
    assert distiller.student.training, "the student's mode is restored after the attack"
    assert (adversarial - x).abs().max() <= ATTACK.eps + 1e-6 and adversarial.min() >= 0 and adversarial.max() <= 1


def test_accuracy_parts_are_percentages_like_every_accuracy_reported():
    from crdnd_ray.methods.base import accuracy

    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])).item() == pytest.approx(50.0)
