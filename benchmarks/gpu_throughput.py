"""GPU training throughput: eager vs CUDA-graphed inner attack, the project's loop vs a hand-written loop.

The workload of DESIGN.md's GPU measurements: CIFAR-100 shapes (``data.name: synthetic``), a WRN-34-10
teacher, ResNet-18 and MobileNetV2 students, PGD-10 (ε 8/255, step 2/255, gaussian start, student
BatchNorm in eval mode), the RSLAD step (``--method crdnd`` for CRDND's), bf16 autocast and channels_last,
batch 128 and 512. Networks are randomly initialised (throughput does not depend on their weights). For
each student × batch × (eager, graphed) it times, in this one process:

* ``project``: ``engine.loop.run_training`` with ``train.cuda_graphs`` false or true, ``--epochs`` epochs of
  ``--steps`` steps; images/s from ``metrics.jsonl``, median over the epochs after the first (which holds
  the loader start, the warm-up and the capture). Evaluation is cut to 64 clean examples.
* ``hand``: a hand-written RSLAD loop on batches already on the GPU; graphed, its attack (teacher forward
  and the PGD steps) is captured with ``torch.cuda.graph`` directly, not through ``crdnd_ray.graphs``;
  images/s over ``--steps`` steps after ``--warmup`` steps.

The table is printed and written to ``benchmarks/results/gpu_throughput.json``. Without a CUDA device it
says so and exits 0 without running or writing anything.

    .venv/bin/python benchmarks/gpu_throughput.py [--quick] [--students resnet18 mobilenetv2] [--batches 128 512]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
TEACHER = {"arch": "wideresnet", "kwargs": {"depth": 34, "widen_factor": 10}}
EPS, STEP_SIZE, PGD_STEPS, ALPHA, LOSS_SCALE = 8 / 255, 2 / 255, 10, 5 / 6, 0.1


def build_student(arch: str) -> nn.Module:
    """A random CIFAR-100 student on the GPU, in channels_last."""
    from crdnd_ray.models import build_model

    torch.manual_seed(0)
    return build_model(arch, num_classes=100).cuda().to(memory_format=torch.channels_last)


def build_teacher() -> nn.Module:
    """A random, frozen WRN-34-10 for CIFAR-100 on the GPU, in channels_last."""
    from crdnd_ray.models import build_model

    torch.manual_seed(1)
    teacher = build_model(TEACHER["arch"], num_classes=100, **TEACHER["kwargs"]).cuda()
    return teacher.to(memory_format=torch.channels_last).eval().requires_grad_(False)


def run_project(student_arch: str, batch: int, graphed: bool, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Time ``run_training`` on the synthetic dataset; images/s is the median after the first epoch."""
    from crdnd_ray.config import load_config
    from crdnd_ray.engine.loop import LoopContext, read_metrics, run_training

    cfg = load_config(REPO / "search_spaces" / "digits.yaml", {
        "tracking.enabled": False, "experiment.seed": 0, "data.name": "synthetic", "data.batch_size": batch,
        "data.eval_batch_size": 64, "data.loader_workers": args.loader_workers,
        "student.arch": student_arch, "student.kwargs": {}, "teacher.arch": TEACHER["arch"],
        "teacher.kwargs": TEACHER["kwargs"], "method.name": args.method,
        "attack.eps": "8/255", "attack.step_size": "2/255", "attack.steps": PGD_STEPS, "eval.eps": "8/255",
        "eval.epoch_attacks": ["clean"], "eval.epoch_limit": 64, "eval.final_attacks": ["clean"],
        "eval.final_limit": 64, "train.epochs": args.epochs, "train.max_steps_per_epoch": args.steps,
        "train.lr": 0.05, "train.schedule": "constant", "train.bf16": True, "train.channels_last": True,
        "train.pin_memory": True, "train.cuda_graphs": graphed, "scaling.torch_threads": None,
    })
    teacher = build_teacher()
    lines: list[str] = []
    run_training(cfg, folder, teacher, LoopContext(device=torch.device("cuda"), progress=lines.append))
    rates = [row["images_per_s"] for row in read_metrics(folder / "metrics.jsonl")]
    return {"images_per_s": round(statistics.median(rates[1:] or rates), 1),
            "images_per_s_by_epoch": [round(rate, 1) for rate in rates],
            "graphs_line": next((line for line in lines if line.startswith("CUDA graphs")), None)}


def _rslad_attack(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits on ``x`` and PGD-10 on ``KL(p_T(x) ‖ p_S(x'))`` from ``x + 0.001·N(0, 1)``, student in eval."""
    with torch.no_grad():
        teacher_logits = teacher(x)
    target = F.softmax(teacher_logits.float(), dim=1)
    student.eval()
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    with torch.enable_grad():
        for _ in range(PGD_STEPS):
            x_adv.requires_grad_(True)
            loss = F.kl_div(F.log_softmax(student(x_adv).float(), dim=1), target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + STEP_SIZE * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    student.train()
    return teacher_logits, x_adv.detach()


def _captured_by_hand(attack: Any, example: torch.Tensor) -> Any:
    """``attack`` replayed from a CUDA graph: two warm-up calls and the capture on one side stream."""
    static_x = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        for _ in range(2):
            attack(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        static_out = attack(static_x)

    def replay(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        static_x.copy_(x)
        graph.replay()
        return static_out

    return replay


def run_hand(student_arch: str, batch: int, graphed: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Time a hand-written RSLAD loop on GPU-resident batches, its attack eager or captured by hand."""
    student, teacher = build_student(student_arch), build_teacher()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
    batches = [torch.rand(batch, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
               for _ in range(4)]

    def attack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _rslad_attack(student, teacher, x)

    if graphed:
        attack = _captured_by_hand(attack, batches[0])

    def step(x: torch.Tensor) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            teacher_logits, x_adv = attack(x)
            target = F.softmax(teacher_logits.float(), dim=1)
            adv = F.kl_div(F.log_softmax(student(x_adv).float(), dim=1), target, reduction="batchmean")
            nat = F.kl_div(F.log_softmax(student(x).float(), dim=1), target, reduction="batchmean")
            loss = LOSS_SCALE * (ALPHA * adv + (1 - ALPHA) * nat)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for index in range(args.warmup):
        step(batches[index % len(batches)])
    torch.cuda.synchronize()
    started = time.perf_counter()
    for index in range(args.steps):
        step(batches[index % len(batches)])
    torch.cuda.synchronize()
    return {"images_per_s": round(args.steps * batch / (time.perf_counter() - started), 1)}


def machine_info() -> dict[str, Any]:
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "platform": platform.platform()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer steps and epochs (a smoke run).")
    parser.add_argument("--students", nargs="+", default=["resnet18", "mobilenetv2"])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--method", choices=["rslad", "crdnd"], default="rslad", help="The project loop's method.")
    parser.add_argument("--epochs", type=int, default=None, help="Project loop epochs (default 3, 2 with --quick).")
    parser.add_argument("--steps", type=int, default=None, help="Steps per epoch / timed hand steps (default 30).")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed steps of the hand-written loop.")
    parser.add_argument("--loader-workers", type=int, default=4, help="DataLoader workers of the project loop.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_throughput.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device is visible (torch.cuda.is_available() is false). This benchmark "
              "measures GPU throughput only; nothing was run or written. Run it on a machine with a GPU.")
        return 0
    args.epochs = args.epochs or (2 if args.quick else 3)
    args.steps = args.steps or (10 if args.quick else 30)

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="crdnd-gpu-throughput-") as scratch:
        for student in args.students:
            for batch in args.batches:
                for graphed in (False, True):
                    mode = "graphed" if graphed else "eager"
                    facts = {"student": student, "batch": batch, "mode": mode, "method": args.method}
                    print(f"{student} batch {batch} {mode}: project loop ...", flush=True)
                    folder = Path(scratch) / f"{student}-{batch}-{mode}"
                    results.append({**facts, "loop": "project", **run_project(student, batch, graphed, args, folder)})
                    print(f"{student} batch {batch} {mode}: hand-written loop ...", flush=True)
                    results.append({**facts, "loop": "hand", **run_hand(student, batch, graphed, args)})
                    gc.collect()
                    torch.cuda.empty_cache()

    rate = {(r["student"], r["batch"], r["mode"], r["loop"]): r["images_per_s"] for r in results}
    summary = []
    for student in args.students:
        for batch in args.batches:
            row = {"student": student, "batch": batch}
            for loop in ("project", "hand"):
                row[f"{loop}_graphed_over_eager"] = round(rate[student, batch, "graphed", loop]
                                                          / rate[student, batch, "eager", loop], 2)
            for mode in ("eager", "graphed"):
                row[f"project_over_hand_{mode}"] = round(rate[student, batch, mode, "project"]
                                                         / rate[student, batch, mode, "hand"], 3)
            summary.append(row)

    header = f"{'student':12s} {'batch':>5s} {'mode':8s} {'loop':8s} {'img/s':>9s}  note"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        note = r.get("graphs_line") or ""
        print(f"{r['student']:12s} {r['batch']:5d} {r['mode']:8s} {r['loop']:8s} {r['images_per_s']:9.1f}  {note}")
    for row in summary:
        print(f"{row['student']} batch {row['batch']}: graphed/eager project {row['project_graphed_over_eager']}x, "
              f"hand {row['hand_graphed_over_eager']}x; project/hand eager {row['project_over_hand_eager']}, "
              f"graphed {row['project_over_hand_graphed']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(), "settings": vars(args), "results": results,
                                    "summary": summary}, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
