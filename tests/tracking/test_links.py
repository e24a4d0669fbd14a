"""crdnd_ray.tracking.links without a browser: URL shapes and the saved-view tag (the browser test opens them)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest

from crdnd_ray.tracking import links as ui_links

SERVER = "http://127.0.0.1:5000/"
PARENT = "cc6b80e7bd7f43c38e696b0301a2f9f1"


def _hash_query(url: str) -> tuple[str, dict[str, str]]:
    fragment = urlsplit(url).fragment
    path, _, query = fragment.partition("?")
    return path, {key: values[0] for key, values in parse_qs(query).items()}


def test_experiment_and_runs_urls_open_the_model_training_runs_table() -> None:
    path, query = _hash_query(ui_links.experiment_url(SERVER, "7"))
    assert path == "/experiments/7" and query == {"workflowType": "machine_learning"}

    url = ui_links.runs_url(SERVER, "7", search_filter=ui_links.children_filter(PARENT),
                            order_by=ui_links.column_id("metrics", "best_pgd20_acc"))
    assert url.startswith("http://127.0.0.1:5000/#/experiments/7/runs?")
    path, query = _hash_query(url)
    assert query == {"searchFilter": f"tags.`mlflow.parentRunId` = '{PARENT}'",
                     "orderByKey": "metrics.`best_pgd20_acc`", "orderByAsc": "false",
                     "workflowType": "machine_learning"}
    assert " " not in url and "`" not in url


def test_a_saved_view_url_carries_only_its_key() -> None:
    path, query = _hash_query(ui_links.runs_url(SERVER, "7", view_key="sweep-x", mode="CHART"))
    assert path == "/experiments/7/runs"
    assert query == {"viewStateShareKey": "sweep-x", "compareRunsMode": "CHART", "workflowType": "machine_learning"}
    with pytest.raises(ValueError, match="own filter and sort"):
        ui_links.runs_url(SERVER, "7", view_key="sweep-x", order_by="metrics.`a`")
    with pytest.raises(ValueError, match="saved-view key"):
        ui_links.runs_url(SERVER, "7", view_key="bad key?")


def test_trials_view_tag_holds_the_ui_envelope() -> None:
    view = ui_links.trials_view(PARENT, params=["method.temperature", "train.lr"],
                                metrics=["epoch_pgd20_acc", "best_pgd20_acc"], created_ms=1234)
    assert view.key == f"sweep-{PARENT}" and view.tag_key == f"mlflow.sharedViewState.sweep-{PARENT}"
    envelope = json.loads(view.tag_value)
    assert envelope["createdAt"] == envelope["updatedAt"] == 1234 and isinstance(envelope["state"], str)
    state = json.loads(envelope["state"])
    assert state["searchFilter"] == ui_links.children_filter(PARENT)
    assert state["orderByKey"] == "metrics.`epoch_pgd20_acc`" and state["orderByAsc"] is False
    assert state["selectedColumns"] == ["tags.`status`", "metrics.`epoch_pgd20_acc`", "metrics.`best_pgd20_acc`",
                                        "params.`method.temperature`", "params.`train.lr`"]
    assert set(state["selectedColumns"]) <= set(state["columnOrder"]) == set(state["columnWidths"])
    (chart,) = state["compareRunCharts"]
    assert chart["type"] == "PARALLEL" and chart["selectedMetrics"] == ["epoch_pgd20_acc"]
    assert ui_links.trials_view(PARENT, metrics=["loss"], mode="min").tag_value.count('\\"orderByAsc\\":true') == 1
    ablation = ui_links.trials_view(PARENT, metrics=["best_pgd20_acc"], tags=("variant", "seed", "status"),
                                    kind="ablation")
    assert ablation.key == f"ablation-{PARENT}" and "compareRunCharts" not in json.loads(json.loads(ablation.tag_value)["state"])
    _, query = _hash_query(view.url(SERVER, "3"))
    assert query["viewStateShareKey"] == view.key
    with pytest.raises(ValueError, match="at least one metric"):
        ui_links.trials_view(PARENT, metrics=[])


def test_compare_url_and_bad_input() -> None:
    path, query = _hash_query(ui_links.compare_url(SERVER, ["a1", "b2"], ["3"]))
    assert path == "/compare-runs"
    assert json.loads(query["runs"]) == ["a1", "b2"] and json.loads(query["experiments"]) == ["3"]
    with pytest.raises(ValueError):
        ui_links.compare_url(SERVER, ["x' OR 1=1"], ["3"])
    with pytest.raises(ValueError):
        ui_links.children_filter("a' or '1")
    with pytest.raises(ValueError):
        ui_links.experiment_url("127.0.0.1:5000", "1")
    with pytest.raises(ValueError):
        ui_links.column_id("metric", "x")  # type: ignore[arg-type]


def test_status_mapping_and_colour_tags() -> None:
    assert ui_links.MLFLOW_STATUS == {"finished": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED",
                                     "killed": "KILLED"}
    assert ui_links.run_color_tags("stopped_early") == {"mlflow.runColor": ui_links.STOPPED_EARLY_COLOR}
    assert ui_links.run_color_tags("finished") == {} == ui_links.run_color_tags("failed")
