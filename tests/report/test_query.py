"""Tests of ``crdnd_ray.report``: tables from a real SQLite MLflow store match what was recorded, and the
``report`` command prints and writes them with their plots."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("mlflow")

import pyarrow.parquet as pq  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from crdnd_ray import report, tables  # noqa: E402
from crdnd_ray.config import TrackingConfig  # noqa: E402
from crdnd_ray.tracking.store import Recorder  # noqa: E402
from crdnd_ray.tracking.uris import normalize_tracking_uri  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
EXPERIMENT = "report-exp"
TRIALS = [  # (temperature, compensation kind, final metrics or None when stopped early)
    (1.0, "none", {"best_clean_acc": 70.0, "best_pgd20_acc": 30.0, "best_cw_acc": 28.0}),
    (2.0, "confidence", {"best_clean_acc": 65.0, "best_pgd20_acc": 35.0, "best_cw_acc": 33.0}),
    (4.0, "transition", None),
    (3.0, "confidence", {"best_clean_acc": 60.0, "best_pgd20_acc": 33.0, "best_cw_acc": 31.0}),
]


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG and len(data) > 2000, path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A SQLite store with an older ablation parent, a sweep parent with four trials (one stopped early)
    and a top-level training run; plus a second experiment holding only top-level runs."""
    folder = tmp_path_factory.mktemp("store")
    uri = normalize_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    recorder = Recorder(TrackingConfig(uri=uri), EXPERIMENT)
    ablation = recorder.start_parent("ablation", "old-ablation", {"ablation.seeds": [0]}, {})
    child = recorder.start_run("abl-0", {"method.name": "crdnd"}, {"variant": "full", "seed": 0},
                               parent_run_id=ablation)
    recorder.log_metrics(child, {"best_pgd20_acc": 1.0})
    recorder.finish(child, "finished")
    recorder.finish(ablation, "finished")
    time.sleep(0.02)
    sweep = recorder.start_parent("sweep", "sweep-1", {"search.num_samples": len(TRIALS)}, {})
    children = []
    for index, (temperature, kind, final) in enumerate(TRIALS):
        sampled = {"method.temperature": temperature, "method.compensation.kind": kind}
        params = {"method.name": "crdnd", "train.epochs": 3, "train.lr": 0.05, "experiment.seed": index, **sampled}
        run = recorder.start_run(f"trial-{index}", params, {"trial_id": f"t{index}"}, parent_run_id=sweep,
                                 sampled=sampled)
        epochs = 3 if final else 1
        for epoch in range(epochs):
            recorder.log_epoch(run, {"epoch": epoch, "loss": 2.0 - epoch * 0.3 + index, "epoch_clean_acc": 50.0 + epoch + index,
                                     "epoch_pgd20_acc": 20.0 + epoch + index, "lr": 0.05}, step=epoch)
        if final:
            recorder.log_metrics(run, final)
            recorder.finish(run, "finished")
        else:
            recorder.finish(run, "stopped_early", "The scheduler stopped the trial after epoch 0.")
        children.append(run)
        time.sleep(0.005)
    recorder.finish(sweep, "finished")
    single = recorder.start_run("train-0", {"method.name": "rslad"}, {})
    recorder.log_metrics(single, {"best_pgd20_acc": 40.0})
    recorder.finish(single, "finished")

    other = Recorder(TrackingConfig(uri=uri), "plain-train")
    plain = []
    for index in range(2):
        run = other.start_run(f"train-{index}", {"method.name": ["rslad", "crdnd"][index], "train.lr": 0.1}, {})
        other.log_metrics(run, {"best_clean_acc": 50.0 + index, "best_pgd20_acc": 25.0 + index})
        other.finish(run, "finished")
        plain.append(run)
    return {"uri": uri, "folder": folder, "sweep": sweep, "ablation": ablation, "children": children,
            "single": single, "plain": plain}


def test_runs_frame_matches_the_store(store: dict) -> None:
    frame = report.runs_frame(store["uri"], EXPERIMENT, parent_run_id=store["sweep"])
    assert list(frame["run_id"]) == store["children"]
    assert list(frame.columns[:5]) == ["run_id", "run_name", "status", "method.compensation.kind", "method.temperature"]
    assert frame.attrs["sampled"] == ["method.compensation.kind", "method.temperature"]
    assert "experiment.seed" in frame.columns and "train.lr" not in frame.columns
    client = MlflowClient(tracking_uri=store["uri"])
    for row in frame.to_dict("records"):
        run = client.get_run(row["run_id"])
        assert row["run_name"] == run.info.run_name
        assert row["status"] == run.data.tags["status"]
        assert row["method.temperature"] == float(run.data.params["sampled.method.temperature"])
        assert row["method.compensation.kind"] == run.data.params["method.compensation.kind"]
        for metric in frame.attrs["metrics"]:
            if metric in run.data.metrics:
                assert row[metric] == run.data.metrics[metric], metric
            else:
                assert pd.isna(row[metric]), metric
    assert frame.attrs["metrics"] == ["best_clean_acc", "best_pgd20_acc", "best_cw_acc", "epoch_clean_acc", "epoch_pgd20_acc",
                                      "epoch"]
    assert list(frame["status"]) == ["finished", "finished", "stopped_early", "finished"]
    assert list(frame["epoch"]) == [2.0, 2.0, 0.0, 2.0]

    chosen = report.runs_frame(store["uri"], EXPERIMENT, parent_run_id=store["sweep"], metrics=["loss", "best_cw_acc"])
    assert list(chosen.columns[-2:]) == ["loss", "best_cw_acc"]
    with pytest.raises(ValueError, match="'nope' were not recorded.*Recorded metrics are: .*best_clean_acc"):
        report.runs_frame(store["uri"], EXPERIMENT, parent_run_id=store["sweep"], metrics=["nope"])
    top = report.runs_frame(store["uri"], EXPERIMENT, top_level=True)
    assert set(top["run_id"]) == {store["sweep"], store["ablation"], store["single"]}


def _printed_csv(text: str) -> pd.DataFrame:
    table = text.split("\n\n", 1)[0]
    return pd.read_csv(io.StringIO(table))


def test_report_command_prints_the_latest_sweep_and_writes_files(store: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    expected = report.runs_frame(store["uri"], EXPERIMENT, parent_run_id=store["sweep"])
    report.report_command(EXPERIMENT, None, None, "csv", None, store["uri"])
    printed = capsys.readouterr().out
    shown = _printed_csv(printed)
    assert list(shown["run_id"]) == list(expected["run_id"])
    pd.testing.assert_frame_equal(shown, expected, check_dtype=False, check_exact=False)
    for name in ("history.png", "params.png", "pareto.png"):
        assert_png(tmp_path / "report" / "sweep-1" / name)
        assert f"wrote {Path('report') / 'sweep-1' / name}" in printed
    assert not (tmp_path / "mlruns").exists()

    output = tmp_path / "out" / "sweep.parquet"
    report.report_command(EXPERIMENT, store["sweep"], ["best_pgd20_acc", "best_clean_acc"], "table", output,
                          store["uri"], wide=True)
    printed = capsys.readouterr().out
    assert "sweep sweep-1" in printed and store["children"][0] in printed
    chosen = report.runs_frame(store["uri"], EXPERIMENT, parent_run_id=store["sweep"],
                               metrics=["best_pgd20_acc", "best_clean_acc"])
    pd.testing.assert_frame_equal(pq.read_table(output).to_pandas(), chosen)
    for suffix in ("history", "params", "pareto"):
        assert_png(tmp_path / "out" / f"sweep_{suffix}.png")

    report.report_command(EXPERIMENT, store["single"], None, "md", tmp_path / "single.md", store["uri"])
    lines = (tmp_path / "single.md").read_text().splitlines()
    assert len(lines) == 3 and store["single"] in lines[2]
    assert not list(tmp_path.glob("single_*.png")), "no one-point plots for a single run"


def test_the_terminal_table_fits_120_columns_ranks_by_the_metric_and_marks_the_best(
        store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    report.report_command(EXPERIMENT, None, None, "table", None, store["uri"], width=120)
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if "│" in line or "┃" in line]
    assert max(len(line) for line in printed.splitlines()) <= 120
    assert not any(run_id in printed for run_id in store["children"]), "no 32-character run ids"
    header = table[0]
    assert "temperature" in header and "kind" in header and "best_pgd20_acc" in header
    order = [next(name for name in ("trial-0", "trial-1", "trial-2", "trial-3") if name in line) for line in table[1:]]
    assert order == ["trial-1", "trial-3", "trial-0", "trial-2"], "best first by best_pgd20_acc, unfinished last"
    assert "★" in table[1] and sum("★" in line for line in table) == 1
    assert "★ best by best_pgd20_acc (max)" in printed
    report.report_command(EXPERIMENT, store["ablation"], None, "table", None, store["uri"], width=120)
    assert (tmp_path / "report" / "sweep-1").is_dir() and not (tmp_path / "report" / "old-ablation").exists(), \
        "each parent's plots in a folder of its own; none for a one-run report"


def test_report_command_falls_back_to_top_level_runs(store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    report.report_command("plain-train", None, None, "csv", None, store["uri"])
    shown = _printed_csv(capsys.readouterr().out)
    assert list(shown["run_id"]) == store["plain"]
    assert list(shown["method.name"]) == ["rslad", "crdnd"]
    assert list(shown["best_pgd20_acc"]) == [25.0, 26.0]


def test_report_command_errors(store: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no experiment named 'missing'.*Existing experiments: plain-train, report-exp\."):
        report.report_command("missing", None, None, "table", None, store["uri"])
    with pytest.raises(ValueError, match="There is no run with id 'deadbeef'"):
        report.report_command(EXPERIMENT, "deadbeef", None, "table", None, store["uri"])
    with pytest.raises(ValueError, match="belongs to another experiment"):
        report.report_command("plain-train", store["sweep"], None, "table", None, store["uri"])
    with pytest.raises(ValueError, match="There is no MLflow database"):
        report.report_command(EXPERIMENT, None, None, "table", None, f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()
    with pytest.raises(ValueError, match="not one of"):
        report.report_command(EXPERIMENT, None, None, "xlsx", None, store["uri"])


def test_every_table_format_reads_back(store: dict, tmp_path: Path) -> None:
    frame = report.runs_frame(store["uri"], EXPERIMENT, parent_run_id=store["sweep"])
    parquet = tables.write_table(frame, tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(pq.read_table(parquet).to_pandas(), frame)
    csv = tables.write_table(frame, tmp_path / "t.csv")
    pd.testing.assert_frame_equal(pd.read_csv(csv), frame, check_dtype=False)
    markdown = tables.write_table(frame, tmp_path / "t.md").read_text().splitlines()
    assert len(markdown) == len(frame) + 2
    assert [cell.strip() for cell in markdown[0].strip("|").split("|")] == list(frame.columns)
    assert markdown[1].count("---:") == sum(tables.is_numeric_column(frame, c) for c in frame.columns)
    assert "| trial-2 | stopped_early | transition | 4 | 2 |  |  |  | 52 | 22 | 0 |" in markdown[4]
    assert report.format_table(frame, "md") == tables.markdown_table(frame)
    assert report.format_table(frame, "csv") == frame.to_csv(index=False)
    text = report.format_table(frame, "table", title="sweep")
    assert all(run_id in text for run_id in frame["run_id"]) and "stopped_early" in text
    with pytest.raises(ValueError, match=r"\.csv, \.parquet or \.md"):
        tables.write_table(frame, tmp_path / "t.xlsx")

    mixed = pd.DataFrame({"a": [1, "x", None], "b": [{"k": 1}, [1, 2], 3.5]})
    back = pq.read_table(tables.write_table(mixed, tmp_path / "mixed.parquet")).to_pandas()
    assert list(back["a"][:2]) == ["1", "x"] and pd.isna(back["a"][2])
    assert list(back["b"]) == ["{'k': 1}", "[1, 2]", "3.5"]


def test_a_narrow_table_keeps_the_parameters_that_go_with_the_metric_and_only_tags_that_vary() -> None:
    from crdnd_ray.report.compare import terminal_table

    frame = pd.DataFrame({
        "run_name": [f"trial-{i}" for i in range(6)], "status": ["finished"] * 6, "seed": ["0"] * 6,
        "verify": ["pass", None, None, "warn", None, None],
        "method.compensation.beta": [1.5, 0.8, 2.5, 0.5, 2.0, 1.0],
        "method.contrastive.weight": [0.1, 0.2, 0.4, 0.3, 0.9, 0.6],
        "train.lr": [0.1, 0.2, 0.4, 0.8, 1.6, 3.2],
        "epoch_pgd20_acc": [20.0, 30.0, 40.0, 50.0, 55.0, 60.0],
    })
    frame.attrs["sampled"] = ["method.compensation.beta", "method.contrastive.weight", "train.lr"]
    header = next(line for line in terminal_table(frame, "epoch_pgd20_acc", "max", "t", width=80).splitlines()
                  if "┃" in line)
    assert "lr" in header and "weight" in header and "beta" not in header, \
        "the learning rate follows PGD-20 exactly, the weight nearly; beta does not"
    assert "verify" in header and "seed" not in header, "a tag with one value for every run says nothing"
