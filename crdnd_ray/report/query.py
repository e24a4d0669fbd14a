"""Reading recorded runs back from an MLflow store, through ``MlflowClient``'s public API only.

:func:`runs_frame` gives a tidy :class:`pandas.DataFrame` of an experiment's runs (one row per run); the
``report`` command and the UI links build on it. Importing this module imports neither MLflow nor pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from crdnd_ray.tracking.uris import normalize_tracking_uri, sqlite_path

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["check_experiment", "client_for", "default_metrics", "runs_frame"]

_PREFERRED = ("best_clean_acc", "best_fgsm_acc", "best_pgd20_acc", "best_cw_acc", "best_autoattack_acc",
              "verify_autoattack_acc")
_TAG_COLUMNS = ("variant", "stage", "seed", "verify")


def _to_numeric_if_possible(column: pd.Series) -> pd.Series:
    import pandas as pd

    if not (pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column)):
        return column
    present = column.dropna()
    if present.empty:
        return column
    converted = pd.to_numeric(present, errors="coerce")
    if converted.isna().any():
        return column
    result = pd.to_numeric(column, errors="coerce")
    if (result.dropna() % 1 == 0).all() and not present.astype(str).str.contains(r"[.eE]").any():
        return result.astype("Int64")
    return result


def default_metrics(available: Sequence[str]) -> list[str]:
    """The metrics a report shows when none are asked for: final ``best_*`` metrics, last-epoch accuracy."""
    names = list(available)
    chosen = [m for m in _PREFERRED if m in names]
    chosen += sorted(m for m in names if m.startswith("best_") and m not in chosen and m not in
                     ("best_epoch", "best_n_eval"))
    chosen += [m for m in ("best_epoch", "epoch_clean_acc", "epoch_pgd20_acc", "epoch") if m in names]
    return chosen or sorted(names)


def runs_frame(tracking_uri: str, experiment: str, parent_run_id: str | None = None,
               metrics: list[str] | None = None, *, top_level: bool = False,
               run_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """A tidy table of an experiment's runs from ``mlflow.search_runs``, oldest first.

    With ``parent_run_id`` only that parent's children; with ``top_level`` only runs without a parent; with
    ``run_ids`` only those runs. Columns: ``run_id``, ``run_name``, ``status`` (the ``status`` tag), the
    ``variant``/``stage``/``seed`` tags when present, the sampled parameters (marked ``sampled.*`` in MLflow, shown
    under their own name), the other parameters whose values differ between runs (both sorted by name), and
    ``metrics`` (default :func:`default_metrics`). ``frame.attrs`` holds the lists ``sampled``, ``params``
    and ``metrics``.
    Raises ValueError for an unknown experiment or metric.
    """
    import pandas as pd

    uri = normalize_tracking_uri(tracking_uri)
    experiment_id = check_experiment(uri, experiment)
    filter_string = f"tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else ""
    raw = _search_frame(client_for(uri), experiment_id, filter_string)
    if top_level and "tags.mlflow.parentRunId" in raw.columns:
        raw = raw[raw["tags.mlflow.parentRunId"].isna()]
    if run_ids is not None:
        raw = raw[raw["run_id"].isin(list(run_ids))]
    raw = raw.reset_index(drop=True)

    available = [c[len("metrics."):] for c in raw.columns if c.startswith("metrics.")]
    if metrics is None:
        chosen = default_metrics(available)
    else:
        unknown = [m for m in metrics if m not in available]
        if unknown and not raw.empty:
            raise ValueError(
                f"The metric(s) {', '.join(repr(m) for m in unknown)} were not recorded for these runs. "
                f"Recorded metrics are: {', '.join(sorted(available)) or 'none'}. Pass some of them with --metrics."
            )
        chosen = list(metrics)

    def column(name: str) -> pd.Series:
        return raw[name] if name in raw.columns else pd.Series([None] * len(raw), dtype=object)

    frame = pd.DataFrame({"run_id": column("run_id"), "run_name": column("tags.mlflow.runName")})
    status = column("tags.status")
    fallback = column("status").astype(object).map(lambda s: str(s).lower() if isinstance(s, str) else s)
    frame["status"] = status.where(status.notna(), fallback)
    for tag in _TAG_COLUMNS:
        if f"tags.{tag}" in raw.columns and raw[f"tags.{tag}"].notna().any():
            frame[tag] = _to_numeric_if_possible(raw[f"tags.{tag}"])
    sampled = sorted(c[len("params.sampled."):] for c in raw.columns if c.startswith("params.sampled."))
    for name in sampled:
        frame[name] = _to_numeric_if_possible(raw[f"params.sampled.{name}"])
    varying = []
    for name in sorted(raw.columns):
        if not name.startswith("params.") or name.startswith("params.sampled."):
            continue
        key = name[len("params."):]
        if key in sampled or key in frame.columns:
            continue
        if raw[name].astype(str).nunique(dropna=False) > 1:
            varying.append(key)
    for key in varying:
        frame[key] = _to_numeric_if_possible(raw[f"params.{key}"])
    for metric in chosen:
        target = metric if metric not in frame.columns else f"metric.{metric}"
        frame[target] = pd.to_numeric(column(f"metrics.{metric}"), errors="coerce")
    frame.attrs.update({"sampled": sampled, "params": sampled + varying, "metrics": chosen})
    return frame


def client_for(uri: str) -> Any:
    """An ``MlflowClient`` bound to ``uri``."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _search_frame(client: Any, experiment_id: str, filter_string: str) -> pd.DataFrame:
    """Every matching run as one row, oldest first, in the column layout of ``mlflow.search_runs``
    (``run_id``, ``status``, ``start_time``, ``metrics.*``, ``params.*``, ``tags.*``), read page by page."""
    import pandas as pd

    records, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        for run in page:
            record: dict[str, Any] = {"run_id": run.info.run_id, "status": run.info.status,
                                      "start_time": run.info.start_time}
            record.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            record.update({f"params.{k}": v for k, v in run.data.params.items()})
            record.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            records.append(record)
        token = page.token
        if not token:
            break
    return pd.DataFrame.from_records(records, columns=None if records else ["run_id", "status", "start_time"])


def check_experiment(uri: str, experiment: str) -> str:
    """The experiment's id; ValueError (listing the existing ones) when it does not exist."""
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise ValueError(
            f"There is no MLflow database at {db}. Run 'crdnd-ray train', 'sweep' or 'ablate' first, or point "
            "--tracking-uri at the store that holds your runs."
        )
    client = client_for(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        listed = f"Existing experiments: {', '.join(names)}." if names else "The store holds no experiments yet."
        raise ValueError(
            f"There is no experiment named '{experiment}' in the MLflow store {uri}. {listed} "
            "Pass one of them with --experiment."
        )
    return found.experiment_id
