"""The ``crdnd-ray`` command line: train, teacher, evaluate, sweep, ablate, report, ui, server."""

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
from crdnd_ray.logs import LOG_FILE, route_library_logs
from crdnd_ray.progress import ProgressView, duration

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Search hyperparameters and reproduce ablations of CRDND robustness distillation.")
console = Console(stderr=True, soft_wrap=True)
stdout = Console(width=None if sys.stdout.isatty() else 160)

SET_HELP = "Override a config value: --set dotted.key=value (repeatable), e.g. --set train.epochs=5."
OUTPUT_HELP = "Folder for everything the command writes (default runs/<experiment>/<timestamp>)."


class UsageError(Exception):
    """Bad input on the command line; the message is shown as is."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from crdnd_ray.checkpoints import CheckpointError
    from crdnd_ray.data import DataError
    from crdnd_ray.engine.resources import ResourceError
    from crdnd_ray.robustness import VerifyError
    from crdnd_ray.tracking.uris import TrackingUnavailable

    return ConfigError, DataError, CheckpointError, UsageError, ResourceError, TrackingUnavailable, VerifyError


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
            hint = f"; {interrupt}" if str(interrupt) else ""
            console.print(f"[yellow]interrupted[/]: what finished so far is kept in the output folder{hint}.",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper


def load(config: Optional[Path], overrides: list[str]) -> RunConfig:
    """Load a config file with ``--set`` overrides and check the names it uses (ConfigError on bad input)."""
    from crdnd_ray.engine.preflight import check_config

    cfg = load_config(config, overrides or [])
    check_config(cfg)
    return cfg


def prepare_folder(cfg: RunConfig, output: Optional[Path], resume: Optional[Path] = None, kind: str = "") -> Path:
    """Run every preflight check, then create the output folder and write the resolved config into it.

    The folder is ``--resume``'s (which must hold a ``config.yaml``), ``--output``, or
    ``runs/<experiment>/<timestamp>[-kind]``. Nothing is created when a check fails.
    """
    from crdnd_ray.engine.preflight import preflight

    if resume is not None:
        folder = resume
    elif output is not None:
        folder = output
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = Path("runs") / cfg.experiment.name / (f"{stamp}-{kind}" if kind else stamp)
    preflight(cfg, folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs.write_config(folder, cfg)
    route_library_logs(folder)
    return folder


def resumed_config(resume: Path, overrides: list[str], kind: str) -> RunConfig:
    """The config of the folder that ``--resume`` continues (UsageError when it is not such a folder)."""
    if not (resume / runs.CONFIG_FILE).exists():
        raise UsageError(f"'{resume}' holds no {runs.CONFIG_FILE}, so it is not a crdnd-ray {kind} folder to resume. "
                         "Pass the output folder of the interrupted command.")
    return load(resume / runs.CONFIG_FILE, overrides)


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
    folder = prepare_folder(cfg, output, kind="teacher")
    started = time.perf_counter()
    path = train_teacher(cfg, folder, ProgressView(console, "teacher "))
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

    cfg = resumed_config(resume, set_, "run") if resume is not None else load(config, set_)
    if workers is not None:
        cfg = cfg.with_overrides({"scaling.num_workers": workers}, source="--workers")
    folder = prepare_folder(cfg, output, resume)
    started = time.perf_counter()
    final = train_run(cfg, folder, progress=ProgressView(console), resume=resume is not None)
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


def _dry_run(plan: Any, cfg: RunConfig, output: Optional[Path]) -> None:
    """Print a plan with the problems this machine would hit (missing data, teacher, store): as warnings,
    since a plan is often checked before it ships to the cluster that has them; then its cost per stage (a
    tuned ablation's tuning trials, then its seeds)."""
    from crdnd_ray.engine.cost import calibrate, estimate
    from crdnd_ray.engine.preflight import environment_problems

    plan.details["warnings"] = plan.details.get("warnings", []) + [str(p) for p in environment_problems(cfg, output)]
    stages = [(plan.kind, plan.trials, plan.concurrent, None)]
    tuning = plan.details.get("tuning")
    if isinstance(tuning, dict) and cfg.ablation is not None and cfg.ablation.tune is not None:
        stages.insert(0, ("tuning", tuning["trials"], tuning["concurrent"], cfg.ablation.tune.scheduler))
    calibration = calibrate(cfg)
    costs = {name: estimate(cfg, trials, concurrent, calibration, scheduler)
             for name, trials, concurrent, scheduler in stages}
    plan.details["cost"] = costs[plan.kind] if len(costs) == 1 else costs
    stdout.print_json(json.dumps({"plan": plan.__dict__, "config": cfg.run_dict()}, default=str))
    for name, trials, concurrent, _ in stages:
        cost = costs[name]
        saving = (f"; ASHA runs {cost['asha_fraction']:.0%} of the epochs: ≈ "
                  f"{duration(cost['device_hours_with_asha'] * 3600)}" if cost["asha_fraction"] < 1 else "")
        console.print(f"cost of the {name} training ({trials} trials × {cost['epochs']} epochs × "
                      f"{cost['examples_per_epoch']:,} examples), in device time on {cost['device']}: ≈ "
                      f"{duration(cost['device_hours'] * 3600)} without early stopping{saving}; ≈ "
                      f"{duration(cost['wall_hours'] * 3600)} of wall time at {concurrent} trial(s) at a time.",
                      highlight=False)
    console.print(f"Measured here: a step of {calibration['batch']} examples takes {calibration['step_s']:.3g} s; "
                  "evaluation is extra.", highlight=False)


def _check_outcome(kind: str, rows: list[dict[str, Any]], folder: Path) -> None:
    """Exit code of a sweep or ablation: 0 when a trial finished (failures listed), else TrainingFailed (1)."""
    from crdnd_ray.engine.distributed import TrainingFailed

    failed = [row for row in rows if row["status"] == "failed"]
    reasons = sorted({str(row["reason"]) for row in failed})
    if not any(row["status"] == "finished" for row in rows):
        raise TrainingFailed(f"no trial of the {kind} finished ({len(failed)} of {len(rows)} failed: "
                             f"{'; '.join(reasons) or 'none finished'}). The trials are in {folder}.")
    if failed:
        console.print(f"[yellow]{len(failed)} of {len(rows)} trial(s) failed[/]: {'; '.join(reasons)}",
                      highlight=False, soft_wrap=True)


def _print_trials(title: str, rows: list[dict[str, Any]], metric: str, mode: str) -> None:
    """The trials of a sweep as ``crdnd-ray report`` shows runs: ranked by ``metric``, the best marked."""
    import pandas as pd

    from crdnd_ray.report.compare import terminal_table

    frame = pd.DataFrame(rows).rename(columns={"trial": "run_name"})
    frame = frame.rename(columns={c: c.removeprefix("param.") for c in frame.columns if c.startswith("param.")})
    frame.attrs["sampled"] = [c.removeprefix("param.") for c in rows[0] if c.startswith("param.")] if rows else []
    stdout.print(terminal_table(frame, metric, mode, title), highlight=False, markup=False, end="")


@app.command()
@handle_errors
def sweep(
    config: Path = typer.Argument(..., help="A search-space YAML (search_spaces/*.yaml)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", help=OUTPUT_HELP),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted sweep in this folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan and exit."),
) -> None:
    """Search the settings of search.space (learning rate, temperatures, contrastive weight, compensation)."""
    from crdnd_ray.engine.cost import totals
    from crdnd_ray.engine.sweep import plan_sweep, run_sweep
    from crdnd_ray.engine.verify import VERIFY_COLUMNS

    cfg = resumed_config(resume, set_, "sweep") if resume is not None else load(config, set_)
    plan = plan_sweep(cfg)
    if dry_run:
        _dry_run(plan, cfg, output)
        return
    folder = prepare_folder(cfg, output, resume, "sweep")
    started = time.perf_counter()
    with ProgressView(console) as view:
        outcome = run_sweep(cfg, folder, resume=resume is not None, printer=view)
    _check_outcome("sweep", outcome["rows"], folder)
    assert cfg.search is not None
    metric, mode = cfg.search.metrics[0], cfg.search.modes[0]
    _print_trials(f"sweep of {len(outcome['rows'])} trials in {duration(time.perf_counter() - started)}",
                  outcome["rows"], metric, mode)
    if outcome["best"]:
        best = outcome["best"]
        verified = best.get(VERIFY_COLUMNS[0])
        chosen = (f"by verified AutoAttack accuracy {verified:.2f}; {metric} {best[metric]:.2f}"
                  if isinstance(verified, (int, float)) else f"{metric} {best[metric]:.2f}")
        stdout.print(f"best trial {best['trial']} ({chosen}); its config: {folder / 'best.yaml'} "
                     f"(crdnd-ray train {folder / 'best.yaml'})", highlight=False)
    if outcome["pareto"]:
        stdout.print(f"Pareto front ({len(outcome['pareto'])} trials): {folder / 'pareto.csv'}", highlight=False)
    spent = totals(outcome["rows"])
    stdout.print(f"compute: {spent['total_images']:,.0f} examples trained, {spent['total_attack_passes']:,.0f} attack "
                 f"passes, {duration(spent['total_device_s'])} of device time", highlight=False)
    stdout.print(f"results: {folder / 'results.csv'}; log: {folder / LOG_FILE}", highlight=False)
    if outcome["parent_run_id"]:
        stdout.print(f"MLflow: experiment '{cfg.experiment.name}', sweep run {outcome['parent_run_id']}; "
                     "open it with 'crdnd-ray ui'", highlight=False)


@app.command()
@handle_errors
def ablate(
    config: Path = typer.Argument(..., help="An ablation YAML (ablations/*.yaml)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", help=OUTPUT_HELP),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted ablation in this folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan (tuning and seeds) and exit."),
) -> None:
    """Run the ablation study (variants × seeds, each variant first tuned with ablation.tune) and print its table."""
    from crdnd_ray.engine.ablation import plan_ablation, run_ablation

    cfg = resumed_config(resume, set_, "ablation") if resume is not None else load(config, set_)
    plan = plan_ablation(cfg)
    if dry_run:
        _dry_run(plan, cfg, output)
        return
    folder = prepare_folder(cfg, output, resume, "ablation")
    started = time.perf_counter()
    with ProgressView(console) as view:
        outcome = run_ablation(cfg, folder, resume=resume is not None, printer=view)
    _check_outcome("ablation", outcome["rows"], folder)
    stdout.print(f"ablation of {len(outcome['rows'])} runs in {duration(time.perf_counter() - started)}\n")
    stdout.print(outcome["markdown"], highlight=False, markup=False)
    stdout.print("files: " + ", ".join(str(path) for path in outcome["files"]))
    if outcome["parent_run_id"]:
        stdout.print(f"MLflow: experiment '{cfg.experiment.name}', parent run {outcome['parent_run_id']}")


@app.command()
@handle_errors
def verify(
    target: str = typer.Argument(..., help="A run folder, a sweep or ablation folder, or an MLflow run id."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last (run folders and run ids)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Test examples (default: eval.final_limit)."),
    transfer: bool = typer.Option(True, "--transfer/--no-transfer", help="Run the transfer check (trains a surrogate)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="The store of a run id."),
) -> None:
    """AutoAttack and the gradient-masking checks of Carlini et al. on a trained model; verdicts in MLflow."""
    from crdnd_ray.engine.verify import verify_target

    if checkpoint not in ("best", "last"):
        raise UsageError(f"--checkpoint is best or last, not '{checkpoint}'.")
    with ProgressView(console) as view:
        verified = verify_target(target, tracking_uri=tracking_uri, checkpoint=checkpoint, limit=limit,
                                 transfer=transfer, printer=view)
    for name, result in verified:
        stdout.print(f"[bold]{name}[/]", highlight=False)
        for line in result.lines():
            stdout.print(f"  {line}", highlight=False, markup=False)
    if any(result.verdict == "warn" for _, result in verified):
        console.print("[yellow]some checks warn[/]: read each WARN line above before reporting these numbers.")


@app.command()
@handle_errors
def sync(
    folder: Path = typer.Argument(..., help="An output folder of train, sweep or ablate."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Send to this store instead of the folder's."),
) -> None:
    """Send what the tracking store missed (an outage, a killed run) from an output folder, and end its runs."""
    from crdnd_ray.config import TrackingConfig
    from crdnd_ray.tracking.sync import sync_folder

    if not (folder / runs.CONFIG_FILE).exists():
        raise UsageError(f"'{folder}' holds no {runs.CONFIG_FILE}, so it is not a crdnd-ray output folder. Pass the "
                         "folder that train, sweep or ablate wrote.")
    cfg = runs.read_config(folder)
    tracking = TrackingConfig(uri=tracking_uri) if tracking_uri else cfg.tracking
    kind, repaired = sync_folder(folder, tracking)
    stdout.print(f"{kind} folder {folder}: {repaired} run(s) sent or repaired in {tracking.uri}")


@app.command()
@handle_errors
def report(
    experiment: str = typer.Option("crdnd-digits", "--experiment", help="MLflow experiment name."),
    run: Optional[str] = typer.Option(None, "--run", help="Parent run id (default: the latest sweep or ablation)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated metrics to show."),
    fmt: str = typer.Option("table", "--format", help="table, md, csv or parquet."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write the table (and plots beside it) here."),
    tracking_uri: str = typer.Option("sqlite:///mlflow.db", "--tracking-uri", help="MLflow tracking URI."),
    wide: bool = typer.Option(False, "--wide", help="Every column, however wide (default: fitted to the terminal)."),
) -> None:
    """Comparison tables and plots of the runs recorded in MLflow."""
    from crdnd_ray.report import report_command

    if fmt not in ("table", "md", "csv", "parquet"):
        raise UsageError(f"--format '{fmt}' is not one of table, md, csv, parquet.")
    chosen = [m.strip() for m in metrics.split(",")] if metrics else None
    try:
        report_command(experiment, run, chosen, fmt, output, tracking_uri, wide=wide)
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


@app.command()
def server(
    folder: Path = typer.Argument(..., help="Folder for PostgreSQL's data, the artifacts and the logs (made on first use)."),
    port: int = typer.Option(5000, "--port", help="Port of the MLflow server."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback unless you ask otherwise)."),
    allowed_hosts: Optional[str] = typer.Option(
        None, "--allowed-hosts", help="Host headers to accept, comma-separated (MLflow's --allowed-hosts), e.g. "
        "'mlflow:*,localhost:*' when clients use the name 'mlflow'."),
) -> None:
    """Run an MLflow tracking server on PostgreSQL, serving artifacts, until Ctrl-C."""
    from crdnd_ray.tracking.postgres import serve

    raise typer.Exit(serve(folder, port=port, host=host, allowed_hosts=allowed_hosts))


def main() -> None:
    """Entry point of the console script: SIGTERM ends a command as Ctrl-C does."""
    from crdnd_ray.engine import interrupt_on_sigterm

    interrupt_on_sigterm()
    app(prog_name="crdnd-ray")


if __name__ == "__main__":
    sys.exit(main())
