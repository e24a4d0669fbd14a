"""Result tables as files: CSV, Parquet (pyarrow) and GitHub-flavoured Markdown.

Sweeps and ablations write their tables through here, and so does ``crdnd-ray report --output``.
Importing this module imports neither pandas nor pyarrow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["cell_text", "is_numeric_column", "markdown_table", "write_table"]


def cell_text(value: Any, empty: str = "") -> str:
    if value is None:
        return empty
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return empty
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, float):
        if math.isnan(value):
            return empty
        return f"{value:.4g}"
    if hasattr(value, "item") and not isinstance(value, str):
        try:
            return cell_text(value.item(), empty)
        except (ValueError, AttributeError):
            pass
    return str(value)


def is_numeric_column(frame: pd.DataFrame, name: Any) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(frame[name]) and not pd.api.types.is_bool_dtype(frame[name]))


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers to 4 significant digits, right-aligned)."""
    columns = [str(c) for c in frame.columns]

    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(escape(c) for c in columns) + " |",
             "|" + "|".join("---:" if is_numeric_column(frame, c) else ":---" for c in frame.columns) + "|"]
    for row in frame.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(escape(cell_text(v)) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _arrow_table(frame: pd.DataFrame) -> Any:
    import pyarrow as pa

    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        fixed = frame.copy()
        for name in fixed.columns:
            if fixed[name].dtype == object:
                try:
                    pa.array(fixed[name], from_pandas=True)
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
                    fixed[name] = fixed[name].map(lambda v: None if v is None else str(v))
        return pa.Table.from_pandas(fixed, preserve_index=False)


def write_table(frame: pd.DataFrame, path: Path | str) -> Path:
    """Write the table by suffix: ``.csv``, ``.parquet`` (pyarrow) or ``.md``; returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".md"):
        raise ValueError(
            f"Cannot tell the table format of '{path}' from its suffix. Use a .csv, .parquet or .md file name."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(_arrow_table(frame), path)
    else:
        path.write_text(markdown_table(frame))
    return path


