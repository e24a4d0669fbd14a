"""The ``crdnd-ray`` command line: train, teacher, evaluate, sweep, ablate, report, ui."""

from __future__ import annotations

import functools
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from crdnd_ray import runs
from crdnd_ray.config import ConfigError, RunConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Search hyperparameters and reproduce ablations of CRDND robustness distillation.")
console = Console(stderr=True)
stdout = Console(width=None if sys.stdout.isatty() else 160)

SET_HELP = "Override a config value: --set dotted.key=value (repeatable), e.g. --set train.epochs=5."
OUTPUT_HELP = "Folder for everything the command writes (default runs/<experiment>/<timestamp>)."


class UsageError(Exception):
    """Bad input on the command line; the message is shown as is."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from crdnd_ray.checkpoints import CheckpointError
    from crdnd_ray.data import DataError
    from crdnd_ray.engine.resources import ResourceError

    return ConfigError, DataError, CheckpointError, UsageError, ResourceError


def _run_failures() -> tuple[type[BaseException], ...]:
    from crdnd_ray.engine.distributed import TrainingFailed
    from crdnd_ray.engine.loop import DivergedError

    return TrainingFailed, DivergedError


def handle_errors(command: Callable) -> Callable:
    """Show errors as one red paragraph without a traceback: exit 2 for bad input, 1 for a failed run."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except _user_errors() as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except _run_failures() as error:
            console.print(f"[bold red]the run failed:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as interrupt:
            hint = f" ({interrupt})" if str(interrupt) else ""
            console.print(f"[yellow]interrupted[/]: what finished so far is kept in the output folder{hint}.")
            raise typer.Exit(130) from None

    return wrapper


def progress_printer(prefix: str = "") -> Callable[[str], None]:
    """A progress callback that prints timestamped lines to stderr."""
    started = time.perf_counter()

    def show(message: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:7.1f}s[/] {prefix}{message}", highlight=False)

    return show


def load(config: Optional[Path], overrides: list[str]) -> RunConfig:
    """Load a config file with ``--set`` overrides and run the preflight checks (ConfigError on bad input)."""
    from crdnd_ray.engine.preflight import preflight

    cfg = load_config(config, overrides or [])
    preflight(cfg)
    return cfg


def output_folder(cfg: RunConfig, output: Optional[Path], kind: str = "") -> Path:
    """The command's output folder: ``--output`` or ``runs/<experiment>/<timestamp>[-kind]``."""
    if output is not None:
        folder = output
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = Path("runs") / cfg.experiment.name / (f"{stamp}-{kind}" if kind else stamp)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def print_metrics_table(title: str, rows: dict[str, dict[str, float]]) -> None:
    """Print accuracies (percent) as a table: one row per checkpoint or model, one column per metric."""
    columns = sorted({key for values in rows.values() for key in values if key.endswith("_acc")},
                     key=lambda name: ["clean_acc", "fgsm_acc", "pgd20_acc", "cw_acc", "autoattack_acc"].index(name)
                     if name in ("clean_acc", "fgsm_acc", "pgd20_acc", "cw_acc", "autoattack_acc") else 99)
    table = Table(title=title)
    table.add_column("")
    for column in columns:
        table.add_column(column.removesuffix("_acc"), justify="right")
    for name, values in rows.items():
        table.add_row(name, *(f"{values[c]:.2f}" if c in values else "-" for c in columns))
    stdout.print(table)


@app.command()
@handle_errors
def teacher(
    config: Optional[Path] = typer.Argument(None, help="Config YAML (default: the embedded digits defaults)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", help=OUTPUT_HELP),
) -> None:
    """Train a robust teacher (PGD-AT or TRADES, teacher.training) and write its checkpoint."""
    from crdnd_ray.engine.teachers import train_teacher

    cfg = load(config, set_)
    folder = output_folder(cfg, output, "teacher")
    runs.write_config(folder, cfg)
    started = time.perf_counter()
    path = train_teacher(cfg, folder, progress_printer("teacher "))
    final = runs.read_final(folder) or {}
    print_metrics_table(f"teacher ({time.perf_counter() - started:.1f} s)", _by_checkpoint(final))
    stdout.print(f"teacher checkpoint: {path}\nuse it with --set teacher.checkpoint={path}")


def _by_checkpoint(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    return {which: {k.removeprefix(which + "_"): v for k, v in flat.items() if k.startswith(which + "_")}
            for which in ("best", "last")}


@app.command()
@handle_errors
def train(
    config: Optional[Path] = typer.Argument(None, help="Config YAML (a run, sweep or ablation file)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", help=OUTPUT_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Ray Train workers (scaling.num_workers)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run in this folder."),
) -> None:
    """Distil one student: the teacher is prepared (cached), then the run trains and is evaluated."""
    from crdnd_ray.engine.runner import train_run

    if resume is not None:
        saved = resume / runs.CONFIG_FILE
        if not saved.exists():
            raise UsageError(f"'{resume}' holds no config.yaml, so it is not a crdnd-ray run folder to resume.")
        cfg = load(saved, set_)
        folder = resume
    else:
        cfg = load(config, set_)
        folder = output_folder(cfg, output)
    if workers is not None:
        cfg = cfg.with_overrides({"scaling.num_workers": workers}, source="--workers")
    runs.write_config(folder, cfg)
    started = time.perf_counter()
    final = train_run(cfg, folder, progress=progress_printer(), resume=resume is not None)
    print_metrics_table(f"{cfg.method.name} ({time.perf_counter() - started:.1f} s)", _by_checkpoint(final))
    stdout.print(f"results in {folder}")


@app.command()
@handle_errors
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A model checkpoint (crdnd-ray format, or RobustBench with --set teacher.format=robustbench)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config YAML for data and eval settings."),
    attacks: str = typer.Option("clean,fgsm,pgd20,cw,autoattack", "--attacks", help="Comma-separated attacks."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N test examples."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the accuracies to this JSON file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Evaluate a checkpoint under the attack suite and print the accuracies."""
    from crdnd_ray.attacks import parse_attack
    from crdnd_ray.checkpoints import load_model
    from crdnd_ray.data import build_datasets
    from crdnd_ray.engine.loop import configure_threads, evaluate_distributed

    cfg = load(config, set_)
    names = [name.strip() for name in attacks.split(",") if name.strip()]
    for name in names:
        try:
            parse_attack(name, cfg.eval.eps)
        except ValueError as error:
            raise UsageError(f"--attacks: {error}") from None
    configure_threads(cfg)
    _, test_set, info = build_datasets(cfg.data)
    if cfg.teacher.format == "robustbench":
        model = load_model(checkpoint, arch=cfg.teacher.arch, kwargs=cfg.teacher.kwargs, num_classes=info.num_classes,
                           in_channels=info.in_channels, checkpoint_format="robustbench",
                           mean=cfg.teacher.mean, std=cfg.teacher.std)
    else:
        model = load_model(checkpoint, num_classes=info.num_classes, in_channels=info.in_channels)
    started = time.perf_counter()
    try:
        results = evaluate_distributed(model, test_set, names, eps=cfg.eval.eps, limit=limit,
                                       batch_size=cfg.data.eval_batch_size)
    except RuntimeError as error:
        if "torchattacks" in str(error):
            raise UsageError(str(error)) from None
        raise
    results["eps"] = cfg.eval.eps
    results["seconds"] = time.perf_counter() - started
    print_metrics_table(f"{checkpoint} on {int(results['n_eval'])} {cfg.data.name} test examples, "
                        f"eps={cfg.eval.eps:.4g} ({results['seconds']:.1f} s)", {"accuracy %": results})
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))
        stdout.print(f"wrote {json_path}")


def _sweep_folder(cfg: RunConfig, output: Optional[Path], resume: Optional[Path], kind: str) -> Path:
    if resume is not None:
        if not (resume / runs.CONFIG_FILE).exists():
            raise UsageError(f"'{resume}' holds no config.yaml, so it is not a crdnd-ray {kind} folder to resume.")
        return resume
    return output_folder(cfg, output, kind)


def _print_rows(title: str, rows: list[dict[str, Any]], metrics: list[str]) -> None:
    table = Table(title=title)
    params = sorted({key for row in rows for key in row if key.startswith("param.")})
    for column in ["trial", "status", "epochs", *[p.removeprefix("param.").split(".", 1)[-1] for p in params],
                   *metrics, "wall_time_s"]:
        table.add_column(column, justify="left" if column in ("trial", "status") else "right", overflow="fold")
    for row in rows:
        cells = [row["trial"].removeprefix("trial-")[:8], row["status"], str(row["epochs"])]
        cells += [_cell(row.get(p)) for p in params]
        cells += [_cell(row.get(m)) for m in metrics] + [_cell(row.get("wall_time_s"))]
        table.add_row(*cells)
    stdout.print(table)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command()
@handle_errors
def sweep(
    config: Path = typer.Argument(..., help="A search-space YAML (search_spaces/*.yaml)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", help=OUTPUT_HELP),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted sweep in this folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan and exit."),
) -> None:
    """Search temperature, contrastive weight and compensation with Ray Tune + Optuna."""
    from crdnd_ray.engine.sweep import plan_sweep, run_sweep

    cfg = load(resume / runs.CONFIG_FILE if resume else config, set_)
    plan = plan_sweep(cfg)
    if dry_run:
        stdout.print_json(json.dumps({"plan": plan.__dict__, "config": cfg.run_dict()}, default=str))
        return
    folder = _sweep_folder(cfg, output, resume, "sweep")
    runs.write_config(folder, cfg)
    started = time.perf_counter()
    outcome = run_sweep(cfg, folder, resume=resume is not None, printer=progress_printer())
    assert cfg.search is not None
    metrics = cfg.search.metrics + [m for m in ("best_clean_acc", "best_pgd20_acc") if m not in cfg.search.metrics]
    _print_rows(f"sweep of {len(outcome['rows'])} trials ({time.perf_counter() - started:.1f} s)", outcome["rows"], metrics)
    if outcome["best"]:
        best = outcome["best"]
        stdout.print(f"best trial {best['trial']}: " + ", ".join(f"{m}={best[m]:.2f}" for m in metrics if m in best))
        stdout.print(f"best config: {folder / 'best.yaml'}  (crdnd-ray train {folder / 'best.yaml'})")
        stdout.print((folder / "best.yaml").read_text())
    if outcome["pareto"]:
        stdout.print(f"Pareto front ({len(outcome['pareto'])} trials): {folder / 'pareto.csv'}")
    stdout.print(f"results: {folder / 'results.csv'}, {folder / 'results.parquet'}")
    if outcome["parent_run_id"]:
        stdout.print(f"MLflow: experiment '{cfg.experiment.name}', parent run {outcome['parent_run_id']} "
                     f"({cfg.tracking.uri}); open it with 'crdnd-ray ui'")


@app.command()
@handle_errors
def ablate(
    config: Path = typer.Argument(..., help="An ablation YAML (ablations/*.yaml)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", help=OUTPUT_HELP),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted ablation in this folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan (tuning and seeds) and exit."),
) -> None:
    """Run the ablation study (each variant tuned first with ablation.tune, then variants × seeds) and print the
    table with paired statistics."""
    from crdnd_ray.engine.ablation import plan_ablation, run_ablation

    cfg = load(resume / runs.CONFIG_FILE if resume else config, set_)
    if dry_run:
        plan = plan_ablation(cfg)
        stdout.print_json(json.dumps({"plan": plan.__dict__, "config": cfg.run_dict()}, default=str))
        return
    folder = _sweep_folder(cfg, output, resume, "ablation")
    runs.write_config(folder, cfg)
    started = time.perf_counter()
    outcome = run_ablation(cfg, folder, resume=resume is not None, printer=progress_printer())
    stdout.print(f"ablation of {len(outcome['rows'])} runs in {time.perf_counter() - started:.1f} s\n")
    stdout.print(outcome["markdown"], highlight=False, markup=False)
    stdout.print("files: " + ", ".join(str(path) for path in outcome["files"]))
    if outcome["parent_run_id"]:
        stdout.print(f"MLflow: experiment '{cfg.experiment.name}', parent run {outcome['parent_run_id']}")


@app.command()
@handle_errors
def report(
    experiment: str = typer.Option("crdnd-digits", "--experiment", help="MLflow experiment name."),
    run: Optional[str] = typer.Option(None, "--run", help="Parent run id (default: the latest sweep or ablation)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated metrics to show."),
    fmt: str = typer.Option("table", "--format", help="table, md, csv or parquet."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write the table (and plots beside it) here."),
    tracking_uri: str = typer.Option("sqlite:///mlflow.db", "--tracking-uri", help="MLflow tracking URI."),
) -> None:
    """Comparison tables and plots of the runs recorded in MLflow."""
    from crdnd_ray.report import report_command

    if fmt not in ("table", "md", "csv", "parquet"):
        raise UsageError(f"--format '{fmt}' is not one of table, md, csv, parquet.")
    chosen = [m.strip() for m in metrics.split(",")] if metrics else None
    try:
        report_command(experiment, run, chosen, fmt, output, tracking_uri)
    except ValueError as error:
        raise UsageError(str(error)) from None


@app.command()
@handle_errors
def ui(
    port: int = typer.Option(5000, "--port", help="Port of the MLflow UI."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback unless you ask otherwise)."),
    tracking_uri: str = typer.Option("sqlite:///mlflow.db", "--tracking-uri", help="MLflow backend store."),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="Experiment to open."),
) -> None:
    """Serve the MLflow UI on loopback to compare runs."""
    from crdnd_ray.tracking.server import serve_ui

    raise typer.Exit(serve_ui(port=port, host=host, tracking_uri=tracking_uri, experiment=experiment))


def main() -> None:
    """Entry point of the console script."""
    app(prog_name="crdnd-ray")


if __name__ == "__main__":
    sys.exit(main())
