"""Links into the MLflow 3.17 web UI that open what a researcher needs at the first click.

Pure functions: nothing here imports MLflow or talks to a server. A caller that records a sweep writes one
experiment tag (the *saved view*, :func:`trials_view`) with its own ``MlflowClient`` and prints the URLs.

What the UI of MLflow 3.17.2 does (read in its minified bundle, ``mlflow/server/js/build/static/js``, and
checked in headless Chromium by ``tests/test_ui_browser.py``):

- ``#/experiments/<id>`` redirects to the GenAI "Overview" unless the *workflow type* is machine learning.
  The type comes from the ``workflowType`` URL parameter, else the browser's ``localStorage`` key
  ``mlflow.workflowType`` (default ``genai``); the ``mlflow.experimentKind`` experiment tag is *not*
  consulted for that. Every URL built here therefore carries ``workflowType=machine_learning``.
- The runs table reads its filter and sort from the URL parameters ``searchFilter``, ``orderByKey`` (a
  :func:`column_id`), ``orderByAsc``, ``startTime``, ``lifecycleFilter``, ``modelVersionFilter``,
  ``datasetsFilter``; its view mode from ``compareRunsMode`` (``TABLE``, ``CHART``, ``ARTIFACT``).
- Visible columns, their order and widths, and the charts exist only as UI state: the browser's
  ``localStorage``, or a saved view stored as the experiment tag ``mlflow.sharedViewState.<key>`` and opened
  with ``?viewStateShareKey=<key>``. A saved view also carries the filter and sort; the UI ignores it when the
  URL holds any filter/sort parameter, so a view URL must not add them.
- A saved view cannot expand nested runs (``runsExpanded`` is excluded from shared state), and sorting by
  anything but the start time turns nesting off: a view sorted by a metric shows the sweep's trials as a
  flat ranked list (filtered to the parent's children with :func:`children_filter`).
- Run status: the table marks FINISHED with a green check and FAILED *and* KILLED with the same red cross;
  the run page says "Finished", "Failed" or "Killed". :data:`MLFLOW_STATUS` maps a trial's outcome so that a
  scheduler-stopped trial is no longer a green "Finished"; the ``status`` tag column (in :func:`trials_view`)
  tells stopped from failed, and the run tag ``mlflow.runColor`` (:func:`run_color_tags`), which the UI
  reads as the run's colour in the table and the charts, greys stopped trials out.
- The chart view's parallel-coordinates plot is coloured by the *last* metric of the chart's
  ``selectedMetrics``; the legacy compare page (:func:`compare_url`) colours by the first metric that every
  compared run logged (in logging order) and has no parameter to choose it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence
from urllib.parse import quote, urlencode

__all__ = [
    "EXPERIMENT_DESCRIPTION",
    "MLFLOW_STATUS",
    "NOTE_TAG",
    "RUN_COLOR_TAG",
    "SAVED_VIEW_TAG_PREFIX",
    "STOPPED_EARLY_COLOR",
    "SavedView",
    "children_filter",
    "column_id",
    "compare_url",
    "experiment_url",
    "parallel_coordinates_chart",
    "run_color_tags",
    "run_url",
    "runs_url",
    "runs_view_state",
    "saved_view",
    "trials_view",
]

SAVED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
"""Experiment-tag prefix of the UI's saved views (one tag per view, the suffix is the view's key)."""

RUN_COLOR_TAG = "mlflow.runColor"
"""Run tag the UI reads as the run's colour (CSS colour) in the runs table and the charts; its colour picker
writes the same tag."""

STOPPED_EARLY_COLOR = "#b0b0b0"
"""Grey: the colour :func:`run_color_tags` gives a trial the scheduler stopped early."""

MLFLOW_STATUS = {"finished": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED", "killed": "KILLED"}
"""MLflow run status (``MlflowClient.set_terminated``) per run outcome: KILLED shows a red cross in the runs
table (the one FAILED also gets) and "Killed" on the run page, where FINISHED would show a green "Finished".
A trial the scheduler stopped early and a run the user interrupted are both KILLED; the ``status`` tag tells
them apart."""

NOTE_TAG = "mlflow.note.content"
"""Experiment (or run) tag the UI shows as its description, in Markdown."""

EXPERIMENT_DESCRIPTION = """\
Runs recorded by crdnd-ray. Accuracies are percentages (0-100) of the evaluation examples still classified
correctly; epochs count from 1.

| metric | what it is |
|---|---|
| `epoch_<attack>_acc` (e.g. `epoch_pgd20_acc`) | accuracy of each epoch's model on the `eval.epoch_limit` first test examples: the curve, and what a sweep's scheduler and searcher compare |
| `epoch_<attack>_best_so_far` | the best accuracy up to this epoch under the last of `eval.epoch_attacks` (it selects the checkpoint): the epoch that reaches it is saved as `best.pt` |
| `best_<attack>_acc`, `last_<attack>_acc`, `best_n_eval`, `last_n_eval`, `best_epoch` | the final attack suite (`eval.final_attacks` on `eval.final_limit` examples) on the best-epoch and the last checkpoint, how many examples it used, and which epoch was best |
| `verify_<check>` | the strong check of a chosen checkpoint (AutoAttack, PGD with restarts and more steps, a transfer attack, accuracy against eps); `verify_worst_case_acc` counts an example only if it survives every attack at eps |
| `train_adv_acc`, `train_teacher_acc`, `train_teacher_adv_acc` | accuracy on the training batches (the student on its PGD examples, the teacher on clean and adversarial ones): a diagnostic, not robustness |
| `loss` and its terms (`kd_adv`, `kd_nat`, `contrast`, ...) | the epoch's mean training loss and its parts |
| `weight_mean`, `weight_min` | CRDND's per-example trust weights of the teacher (compensation) |
| `cost_images`, `cost_attack_passes`, `cost_device_s`, `cost_wall_s` | compute spent up to this epoch: images trained on, forward-backward passes spent on attacks, device and wall-clock seconds |
| `epoch`, `lr`, `images_per_s`, `epoch_time_s` | the epoch, its learning rate, training throughput and duration |

A run's tag `status` says how it ended: `finished`, `stopped_early` (the scheduler stopped it: shown as
Killed, in grey), `failed` (with `status_reason`) or `killed` (interrupted by the user).
"""
"""The experiment description (:data:`NOTE_TAG`) every experiment gets when crdnd-ray first writes to it: the
metric vocabulary, so that a reader of the UI knows which accuracy is which."""

ColumnKind = Literal["attributes", "params", "metrics", "tags"]
ViewMode = Literal["TABLE", "CHART", "ARTIFACT"]

_WORKFLOW = {"workflowType": "machine_learning"}
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
_FIXED_WIDTHS = {"attributes.`Run Name`": 170, "runDateAndNestInfo": 150, "duration": 80}
_DEFAULT_FACETS = {
    "startTime": "ALL",
    "lifecycleFilter": "Active",
    "modelVersionFilter": "All Runs",
    "datasetsFilter": [],
}


def column_id(kind: ColumnKind, key: str) -> str:
    """The runs table's id of a column (and sort key): ``params.`train.lr```, ``metrics.`best_pgd20_acc```."""
    if kind not in ("attributes", "params", "metrics", "tags"):
        raise ValueError(f"A column kind is attributes, params, metrics or tags, not '{kind}'.")
    return f"{kind}.`{key}`"


def _base(server: str) -> str:
    server = server.strip().rstrip("/")
    if not server.startswith(("http://", "https://")):
        raise ValueError(f"The MLflow server address '{server}' must start with http:// or https://.")
    return server


def _query(params: dict[str, str]) -> str:
    return urlencode(params, quote_via=quote, safe="")


def _run_ids(run_ids: Iterable[str]) -> list[str]:
    ids = [str(run_id) for run_id in run_ids]
    for run_id in ids:
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", run_id):
            raise ValueError(f"'{run_id}' is not an MLflow run id.")
    return ids


def children_filter(parent_run_id: str) -> str:
    """A runs-table search filter that keeps the child runs (the trials) of one parent run."""
    (parent,) = _run_ids([parent_run_id])
    return f"tags.`mlflow.parentRunId` = '{parent}'"


def experiment_url(server: str, experiment_id: str) -> str:
    """The experiment's page in the model-training workflow: the UI redirects it to the runs table."""
    return f"{_base(server)}/#/experiments/{quote(str(experiment_id), safe='')}?{_query(_WORKFLOW)}"


def runs_url(server: str, experiment_id: str, *, view_key: str | None = None, search_filter: str | None = None,
             order_by: str | None = None, ascending: bool = False, mode: ViewMode | None = None) -> str:
    """The experiment's runs table.

    With ``view_key`` it opens the saved view of that key (columns, widths, filter, sort, charts: see
    :func:`saved_view`); ``search_filter``/``order_by`` are then refused, because the UI skips a saved view
    when the URL carries a filter or sort of its own. Without it, ``search_filter`` (MLflow search syntax)
    and ``order_by`` (a :func:`column_id`, e.g. ``metrics.`best_pgd20_acc```) go into the URL; the table then
    shows the browser's own column choice. ``mode`` picks the table, chart or artifact view.
    """
    params: dict[str, str] = {}
    if view_key is not None:
        if search_filter is not None or order_by is not None:
            raise ValueError("A saved view carries its own filter and sort; pass view_key alone.")
        params["viewStateShareKey"] = _checked_key(view_key)
    else:
        if search_filter:
            params["searchFilter"] = search_filter
        if order_by:
            params["orderByKey"] = order_by
            params["orderByAsc"] = "true" if ascending else "false"
    if mode is not None:
        if mode not in ("TABLE", "CHART", "ARTIFACT"):
            raise ValueError(f"The view mode is TABLE, CHART or ARTIFACT, not '{mode}'.")
        params["compareRunsMode"] = mode
    params.update(_WORKFLOW)
    return f"{_base(server)}/#/experiments/{quote(str(experiment_id), safe='')}/runs?{_query(params)}"


def run_color_tags(status: str) -> dict[str, str]:
    """Run tags that colour a trial by outcome: grey (:data:`STOPPED_EARLY_COLOR`) when stopped early, none
    otherwise (the UI then picks the run's colour from its id)."""
    return {RUN_COLOR_TAG: STOPPED_EARLY_COLOR} if status == "stopped_early" else {}


def run_url(server: str, experiment_id: str, run_id: str) -> str:
    """One run's page (overview, metrics, artifacts)."""
    (run,) = _run_ids([run_id])
    return f"{_base(server)}/#/experiments/{quote(str(experiment_id), safe='')}/runs/{run}?{_query(_WORKFLOW)}"


def compare_url(server: str, run_ids: Sequence[str], experiment_ids: Sequence[str]) -> str:
    """The compare page of several runs (parallel coordinates, scatter, box and contour plots, tables).

    Its parallel-coordinates plot starts with the first three differing params and, as axis and colour, the
    first metric that every compared run logged, in logging order; nothing in the URL chooses it (pick it in
    the page's "Metrics" box: the colour follows the last metric chosen there). For a chosen colour metric
    open the chart view of a saved view instead (:func:`parallel_coordinates_chart`).
    """
    ids = _run_ids(run_ids)
    if not ids:
        raise ValueError("compare_url needs at least one run id.")
    params = {"runs": json.dumps(ids, separators=(",", ":")),
              "experiments": json.dumps([str(e) for e in experiment_ids], separators=(",", ":")), **_WORKFLOW}
    return f"{_base(server)}/#/compare-runs?{_query(params)}"


def parallel_coordinates_chart(params: Sequence[str], color_metric: str, other_metrics: Sequence[str] = (),
                               section: str = "Sweep", chart_id: str = "crdnd-parallel") -> dict:
    """UI state for the chart view: one section holding a parallel-coordinates chart of ``params`` against
    the metrics, coloured by ``color_metric`` (the UI colours by the last selected metric; runs without it
    are left out). Merge the result into :func:`runs_view_state` (``charts=``)."""
    section_id = f"{chart_id}-section"
    metrics = [m for m in other_metrics if m != color_metric] + [color_metric]
    chart = {
        "uuid": chart_id, "type": "PARALLEL", "runsCountToCompare": 100, "metricSectionId": section_id,
        "deleted": False, "isGenerated": False, "displayName": f"{', '.join(params)} vs {color_metric}",
        "selectedParams": list(params), "selectedMetrics": metrics, "showAllRuns": True,
    }
    sections = [{"uuid": section_id, "name": section, "display": True, "isReordered": False, "deleted": False,
                 "isGenerated": False, "columns": 1, "cardHeight": 480}]  # one full-width chart per row
    return {"compareRunCharts": [chart], "compareRunSections": sections}


def runs_view_state(*, params: Sequence[str] = (), metrics: Sequence[str] = (), tags: Sequence[str] = (),
                    order_by: str | None = None, ascending: bool = False, search_filter: str = "",
                    column_width: int | None = None, charts: dict | None = None,
                    show_all_runs_in_charts: bool = True) -> dict:
    """The runs-page state a saved view restores: these tag, metric and param columns, in this order after
    the run name, start time and duration (``column_width`` pixels wide, default sized to the name), the
    filter, the sort (a :func:`column_id`; default the start time, the only order that keeps child runs
    nested under their parent) and optionally charts (:func:`parallel_coordinates_chart`)."""
    named = [("tags", t) for t in tags] + [("metrics", m) for m in metrics] + [("params", p) for p in params]
    columns = [column_id(kind, key) for kind, key in named]
    widths = {column_id(kind, key): column_width or min(220, max(120 if kind == "tags" else 90, 7 * len(key) + 40))
              for kind, key in named}
    state: dict = {
        "searchFilter": search_filter,
        "orderByKey": order_by or "attributes.start_time",
        "orderByAsc": bool(ascending),
        **_DEFAULT_FACETS,
        "selectedColumns": columns,
        "columnOrder": [*_FIXED_WIDTHS, *columns],
        "columnWidths": {**_FIXED_WIDTHS, **widths},
    }
    if show_all_runs_in_charts:
        state["runsHiddenMode"] = "SHOW_ALL"
    if charts:
        state.update(charts)
    return state


@dataclass(frozen=True)
class SavedView:
    """A saved runs-table view: write ``tag_value`` as the experiment tag ``tag_key``, then open
    :meth:`url`. The view also appears under "Views" on the experiment's runs page."""

    key: str
    tag_key: str
    tag_value: str

    def url(self, server: str, experiment_id: str, mode: ViewMode | None = None) -> str:
        return runs_url(server, experiment_id, view_key=self.key, mode=mode)


def _checked_key(key: str) -> str:
    if not _KEY_PATTERN.match(key):
        raise ValueError(f"A saved-view key is 1-200 letters, digits, '_', '-' or '.', not '{key}'.")
    return key


def saved_view(key: str, name: str, state: dict, created_ms: int) -> SavedView:
    """The experiment tag that stores ``state`` (:func:`runs_view_state`) as the saved view ``key``.

    The value is the UI's envelope ``{"name", "createdAt", "updatedAt", "state"}`` with the state as a JSON
    string; MLflow limits an experiment tag's value to 20 000 characters.
    """
    _checked_key(key)
    value = json.dumps({"name": name, "createdAt": int(created_ms), "updatedAt": int(created_ms),
                        "state": json.dumps(state, separators=(",", ":"))}, separators=(",", ":"))
    if len(value) > 20000:
        raise ValueError(f"The saved view '{key}' is {len(value)} characters; MLflow keeps at most 20000 in a tag.")
    return SavedView(key=key, tag_key=SAVED_VIEW_TAG_PREFIX + key, tag_value=value)


def trials_view(parent_run_id: str, *, metrics: Sequence[str], params: Sequence[str] = (), mode: Literal["max", "min"] = "max",
                tags: Sequence[str] = ("status",), kind: str = "sweep", created_ms: int = 0,
                chart_metric: str | None = None) -> SavedView:
    """The saved view of one sweep or ablation: its trials (the parent's children) ranked by ``metrics[0]``
    (best first for ``mode``), with the ``tags`` (default the ``status`` tag, which names the trials the
    scheduler stopped early), the ``params`` and the ``metrics`` as columns and, in the chart view, a
    parallel-coordinates plot of the params coloured by ``chart_metric`` (default ``metrics[0]``; the plot
    leaves out runs without the colour metric, so a per-epoch metric that every trial reports, also one
    stopped early, is the right colour).

    Key ``<kind>-<parent_run_id>``: one view per sweep or ablation, rewritten (same key) when it is resumed.
    """
    if not metrics:
        raise ValueError("A trials view needs at least one metric to rank the trials by.")
    charts = parallel_coordinates_chart(params, chart_metric or metrics[0]) if params else None
    state = runs_view_state(params=params, metrics=metrics, tags=tags, order_by=column_id("metrics", metrics[0]),
                            ascending=(mode == "min"), search_filter=children_filter(parent_run_id), charts=charts)
    title = f"{kind.capitalize()} {parent_run_id[:8]}: trials by {metrics[0]}"
    return saved_view(f"{kind}-{parent_run_id}", title, state, created_ms)
