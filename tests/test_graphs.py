"""Tests of crdnd_ray.graphs: one attack phase, two runners (eager call, CUDA-graph capture and replay).

On CPU: the loop falls back to eager attacks and says why in one progress line, every method routes its
inner attack through the runner it is given, and the split into ``attack_phase`` + ``loss`` is exactly
the forward. The CUDA tests (skipped without a GPU) check that a replayed graph gives the eager loss and
gradients from the same random state, that replays do not run the Python attack again, that a failed
capture falls back with one line, and that the NaN check still fires with graphs on. The GPU benchmark
exits cleanly without CUDA.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, small_config
from torch.utils.data import DataLoader, TensorDataset

from crdnd_ray import attacks
from crdnd_ray.config import AttackConfig, MethodConfig
from crdnd_ray.engine.loop import DivergedError, LoopContext, run_training
from crdnd_ray.graphs import EagerRunner, GraphRunner, RunnerSource, eager_reason
from crdnd_ray.methods import METHODS, build_distiller
from crdnd_ray.models import build_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ATTACK = AttackConfig(eps=0.2, step_size=0.05, steps=3)
TINY_RUN = {"method.name": "rslad", "train.epochs": 1, "train.max_steps_per_epoch": 2, "attack.steps": 1,
            "eval.epoch_attacks": ["clean"], "eval.final_attacks": ["clean"], "eval.epoch_limit": 32,
            "eval.final_limit": 32}


def random_teacher(device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model("small_cnn", 10, in_channels=1, width=8).to(device)


def distiller_for(name: str, device: str = "cpu"):
    torch.manual_seed(0)
    student = build_model("small_cnn", 10, in_channels=1, width=8)
    return build_distiller(name, student, random_teacher(), MethodConfig(), ATTACK, 10).to(device)


def digits_batch(device: str = "cpu", size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(size, 1, 8, 8, generator=generator)
    y = torch.randint(10, (size,), generator=generator)
    return x.to(device), y.to(device)


class RecordingRunner(EagerRunner):
    """An eager runner that remembers which functions it ran, with which tag."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, object]] = []

    def __call__(self, fn, *inputs, tag=None):
        self.calls.append((fn, tag))
        return super().__call__(fn, *inputs, tag=tag)


@pytest.mark.parametrize(("setting", "reason"), [("auto", "device is cpu"), (True, "device is cpu"),
                                                 (False, "train.cuda_graphs is false")])
def test_cpu_run_says_once_why_attacks_are_eager(tmp_path, setting, reason):
    lines: list[str] = []
    cfg = small_config(**TINY_RUN, **{"train.cuda_graphs": setting})
    run_training(cfg, tmp_path / "run", random_teacher(), LoopContext(progress=lines.append))
    graph_lines = [line for line in lines if "CUDA graphs" in line]
    assert graph_lines == [f"CUDA graphs off: {reason}"]
    assert lines[0] == graph_lines[0]


def test_runner_source_is_eager_off_cuda_and_says_why():
    heard: list[str] = []
    source = RunnerSource("auto", torch.device("cpu"), heard.append)
    assert isinstance(source(), EagerRunner) and isinstance(source(), EagerRunner)
    assert heard == ["CUDA graphs off: device is cpu"]
    assert eager_reason(True, torch.device("cuda"), collectives_in_attack=True).startswith("SyncBatchNorm")
    assert eager_reason("auto", torch.device("cuda")) is None


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_its_attack_phase_through_the_runner(name):
    distiller = distiller_for(name).train()
    runner = RecordingRunner()
    distiller.attack_runner = runner
    x, y = digits_batch()
    pgd_calls = []
    original = attacks.pgd

    def counting_pgd(*args, **kwargs):
        pgd_calls.append(args[0])
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attacks, "pgd", counting_pgd)
        distiller(x, y)
    assert runner.calls == [(distiller.attack_phase, True)]
    assert len(pgd_calls) == (0 if name == "natural" else 1)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_forward_is_the_loss_of_the_attack_phase(name):
    distiller = distiller_for(name).train()
    x, y = digits_batch()
    torch.manual_seed(5)
    state = {k: v.clone() for k, v in distiller.state_dict().items()}
    loss, parts = distiller(x, y)
    distiller.load_state_dict(state)
    torch.manual_seed(5)
    split_loss, split_parts = distiller.loss(x, y, *distiller.attack_phase(x, y))
    assert torch.equal(loss, split_loss)
    assert parts.keys() == split_parts.keys()


def test_gpu_benchmark_without_cuda_says_so_and_exits_zero(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device is visible" in result.stdout and "nothing was run or written" in result.stdout
    assert not out.exists()


def _step(distiller, x, y, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    distiller.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = distiller(x, y)
    loss.backward()
    grads = [p.grad.detach().clone() for p in distiller.student.parameters() if p.grad is not None]
    return loss.detach().float(), grads


@needs_cuda
@pytest.mark.parametrize("name", sorted(set(METHODS) - {"natural"}))
def test_graphed_steps_match_eager_steps_from_the_same_random_state(name):
    x, y = digits_batch("cuda", 64)
    eager = distiller_for(name, "cuda").train()
    graphed = copy.deepcopy(eager)
    runner = GraphRunner("cuda")
    graphed.attack_runner = runner
    for seed in range(4):
        eager_loss, eager_grads = _step(eager, x, y, seed)
        graphed_loss, graphed_grads = _step(graphed, x, y, seed)
        torch.testing.assert_close(graphed_loss, eager_loss, rtol=2e-2, atol=1e-3)
        for got, expected in zip(graphed_grads, eager_grads, strict=True):
            torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-3)
    for got, expected in zip(graphed.student.buffers(), eager.student.buffers(), strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=1e-3)
    assert runner.graphs == 1 and runner.failure is None


@needs_cuda
def test_replays_do_not_run_the_python_attack_again(monkeypatch):
    x, y = digits_batch("cuda", 64)
    distiller = distiller_for("rslad", "cuda").train()
    distiller.attack_runner = GraphRunner("cuda")
    calls = []
    original = attacks.pgd
    monkeypatch.setattr(attacks, "pgd", lambda *a, **k: calls.append(1) or original(*a, **k))
    for _ in range(5):
        distiller(x, y)
    assert len(calls) == 2, "one warm-up call and one capture; the other three calls replay the graph"


@needs_cuda
def test_failed_capture_falls_back_with_one_line():
    heard: list[str] = []
    runner = GraphRunner("cuda", heard.append)

    def syncs_with_the_host(x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * float(x.sum().item()),)

    x = torch.ones(4, device="cuda")
    for _ in range(4):
        (out,) = runner(syncs_with_the_host, x)
        torch.testing.assert_close(out, x * 4)
    assert len(heard) == 1 and heard[0].startswith("capture failed")
    assert runner.failure == heard[0] and runner.graphs == 0
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


@needs_cuda
def test_graphed_evaluation_matches_eager_evaluation():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=1, width=8).cuda().eval()
    x, y = digits_batch("cpu", 96)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    names = ["clean", "fgsm", "pgd5", "cw"]
    torch.manual_seed(3)
    eager = attacks.evaluate(model, loader, names, eps=0.1, device="cuda")
    torch.manual_seed(3)
    runner = GraphRunner("cuda")
    graphed = attacks.evaluate(model, loader, names, eps=0.1, device="cuda", runner=runner)
    assert graphed == pytest.approx(eager, abs=100 / 96 + 1e-9)
    assert runner.graphs == len(names)


@needs_cuda
def test_nan_check_fires_with_graphs_on(tmp_path):
    teacher = random_teacher("cuda")
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.fill_(float("nan"))
    lines: list[str] = []
    cfg = small_config(**{**TINY_RUN, "train.max_steps_per_epoch": 6, "train.cuda_graphs": True})
    with pytest.raises(DivergedError, match="epoch 0, between steps 0 and 5"):
        run_training(cfg, tmp_path / "run", teacher, LoopContext(device=torch.device("cuda"), progress=lines.append))
    assert lines[0].startswith("CUDA graphs on")
