"""The MLflow UI in a real (headless) browser: the link `crdnd-ray ui` prints for a recorded sweep, and the saved view
of a store filled by hand (a trial stopped early: KILLED and grey), served by crdnd-ray's own MLflow server.

A small store gets a sweep (parent tagged run_kind=sweep, four nested trials, one stopped early by the
scheduler: MLflow status KILLED, tag status=stopped_early, grey run colour) and the sweep's saved view;
``mlflow server`` serves it and Chromium loads the links. Skipped without Debian's chromium.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from browser_check import MISSING, find_chromium, render
from conftest import CLI, REPO, free_port
from crdnd_ray.tracking import links as ui_links

pytestmark = [pytest.mark.slow, pytest.mark.skipif(find_chromium() is None, reason=MISSING)]

TRIALS = {  # name: (method.temperature, train.lr, epoch_pgd20_acc per epoch, finished)
    "trial_a1": (1.5, 0.1, [0.20, 0.31, 0.35], True),
    "trial_b2": (3.0, 0.3, [0.22, 0.36, 0.41], True),
    "trial_c3": (6.0, 0.9, [0.10], False),
    "trial_d4": (2.0, 0.5, [0.25, 0.33, 0.38], True),
}
PARAMS = ["method.temperature", "train.lr"]


def _fill_store(uri: str) -> tuple[str, str]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("crdnd-ui-check")
    parent = client.create_run(experiment, run_name="sweep-ui", tags={"run_kind": "sweep"}).info.run_id
    stamp = int(time.time() * 1000)
    for name, (temperature, lr, accuracies, finished) in TRIALS.items():
        run = client.create_run(experiment, run_name=name, tags={
            "mlflow.parentRunId": parent, "run_kind": "trial", "trial_id": name[-2:]}).info.run_id
        client.log_batch(run, params=[Param("method.temperature", str(temperature)), Param("train.lr", str(lr))])
        for epoch, accuracy in enumerate(accuracies):
            client.log_batch(run, metrics=[Metric("epoch_pgd20_acc", accuracy, stamp, epoch),
                                           Metric("epoch", epoch, stamp, epoch)])
        if finished:
            client.log_batch(run, metrics=[Metric("best_pgd20_acc", max(accuracies), stamp, 0)])
            client.set_tag(run, "status", "finished")
            client.set_terminated(run, "FINISHED")
        else:
            client.set_tag(run, "status", "stopped_early")
            for key, value in ui_links.run_color_tags("stopped_early").items():
                client.set_tag(run, key, value)
            client.set_terminated(run, ui_links.MLFLOW_STATUS["stopped_early"])
    client.set_tag(parent, "status", "finished")
    client.set_terminated(parent, "FINISHED")
    view = ui_links.trials_view(parent, params=PARAMS, metrics=["best_pgd20_acc", "epoch_pgd20_acc"],
                                chart_metric="epoch_pgd20_acc", created_ms=stamp)
    client.set_experiment_tag(experiment, view.tag_key, view.tag_value)
    return experiment, parent


@pytest.fixture
def ui_server(tmp_path: Path):
    """crdnd-ray's own ``mlflow server`` on a free loopback port over a filled SQLite store:
    (url, experiment id, parent id)."""
    from crdnd_ray.tracking.server import start_server, stop_server

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    experiment, parent = _fill_store(uri)
    process, url = start_server(free_port(), "127.0.0.1", uri, tmp_path / "artifacts", log_file=tmp_path / "server.log")
    try:
        yield url, experiment, parent
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def recorded_sweep(tmp_path_factory: pytest.TempPathFactory, digits_teacher: Path) -> Path:
    """A small real sweep (``crdnd-ray sweep`` on digits: 3 trials of 2 epochs) recorded in a SQLite store."""
    folder = tmp_path_factory.mktemp("recorded")
    done = subprocess.run([*CLI, "sweep", str(REPO / "search_spaces" / "digits.yaml"), "--output", "sweep",
                           "--set", "tracking.uri=sqlite:///mlflow.db", "--set", f"teacher.checkpoint={digits_teacher}",
                           "--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=4",
                           "--set", "eval.epoch_limit=32", "--set", "eval.final_limit=32",
                           "--set", "search.num_samples=3", "--set", "search.scheduler.kind=none",
                           "--set", "eval.verify=false"],
                          cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_the_printed_link_of_a_recorded_sweep_shows_its_trials_with_metric_columns(recorded_sweep: Path,
                                                                                   tmp_path: Path) -> None:
    import pandas as pd

    trials = list(pd.read_csv(recorded_sweep / "sweep" / "results.csv")["trial"])
    port = free_port()
    ui = subprocess.Popen([*CLI, "ui", "--port", str(port), "--tracking-uri", "sqlite:///mlflow.db"],
                          cwd=recorded_sweep, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        printed = dict(line.rsplit(": ", 1) for line in (ui.stdout.readline().strip() for _ in range(5)) if ": " in line)
        ranked = next(url for label, url in printed.items() if "trials ranked" in label)
        page = render(ranked, tmp_path, "recorded_sweep", expect=trials)
        print(f"\n{ranked}\nscreenshot: {page.screenshot}")
        for name in trials:
            assert name in page.text, f"{name} missing from the rendered page:\n{page.text[:3000]}"
        metric_columns = [c for c in page.column_headers if c.startswith("metrics.")]
        assert metric_columns and "params.`train.lr`" in page.column_headers, page.column_headers
        assert page.screenshot is not None and page.screenshot.stat().st_size > 10_000
        landing = render(next(url for label, url in printed.items() if "all runs" in label), screenshot=False,
                         expect=["matching runs"])
        assert landing.title.startswith("Runs"), landing.title
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(30)


def test_sweep_view_link_shows_ranked_trials_with_param_and_metric_columns(ui_server, tmp_path: Path) -> None:
    server, experiment, parent = ui_server
    view_url = ui_links.runs_url(server, experiment, view_key=f"sweep-{parent}")

    page = render(view_url, tmp_path, "sweep_view", expect=list(TRIALS))

    print(f"\n{view_url}\nscreenshot: {page.screenshot}  ({page.seconds:.1f} s)")
    for name in TRIALS:
        assert name in page.text, f"trial {name} missing from the rendered runs table:\n{page.text[:3000]}"
    assert "sweep-ui" not in page.text  # the view lists the sweep's trials, not the parent
    for column in ("metrics.`best_pgd20_acc`", "metrics.`epoch_pgd20_acc`", "params.`method.temperature`",
                   "params.`train.lr`", "tags.`status`"):
        assert column in page.column_headers, f"{column} is not a visible column: {page.column_headers}"
    assert "stopped_early" in page.text
    assert "rgb(176, 176, 176)" in page.dom  # the stopped trial's dot is grey (mlflow.runColor #b0b0b0)
    ranked = sorted(TRIALS, key=lambda n: -max(TRIALS[n][2]) if TRIALS[n][3] else 1.0)
    positions = [page.text.index(name) for name in ranked]
    assert positions == sorted(positions), f"trials not ranked by best_pgd20_acc: {ranked}"
    assert page.screenshot is not None and page.screenshot.stat().st_size > 10_000

    # The same view's chart mode: one parallel-coordinates chart of the searched params, coloured by the
    # best metric (the UI colours by the chart's last selected metric).
    charts = render(ui_links.runs_url(server, experiment, view_key=f"sweep-{parent}", mode="CHART"),
                    tmp_path, "sweep_view_chart", expect=["Parallel Coordinates"])
    assert "Parallel Coordinates" in charts.text and "Showing all runs" in charts.text
    assert 'class="parcoords"' in charts.dom

    # The bare experiment link must land on the runs table, not on the GenAI overview.
    landing = render(ui_links.experiment_url(server, experiment), screenshot=False, expect=["sweep-ui"])
    assert landing.title.startswith("Runs"), landing.title
    assert "sweep-ui" in landing.text and "Token Usage" not in landing.text
