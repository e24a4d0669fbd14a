"""Progress of long work on the terminal: timestamped lines, and a live table of the trials of a sweep or an
ablation while it runs.

A :class:`ProgressView` is the ``printer`` the engine is given: called with a line it prints it (above the
live table); given a snapshot of the trials (``update``) it redraws the table — one row per running trial
with its epoch and metric, the counts of finished, stopped and failed trials, the elapsed and the estimated
remaining time. When standard error is not a terminal (CI, a log file) only the lines are printed.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["ProgressView", "duration", "render_snapshot"]


def duration(seconds: float | None) -> str:
    """``75`` → ``1 min 15 s``, ``3725`` → ``1 h 02 min``, beyond 100 hours ``1,234 h``; ``None`` → ``?``."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 100 * 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds / 3600:,.0f} h"


def render_snapshot(snapshot: Any) -> Group:
    """The live view of a :class:`crdnd_ray.engine.callbacks.TrialsSnapshot`: a summary line and one row per
    running trial (its epoch of the run's epochs, its metric, its parameters)."""
    counts = snapshot.counts
    done = sum(n for status, n in counts.items() if status != "running")
    summary = Text(
        f"{snapshot.kind}: {done}/{snapshot.total} done (finished {counts.get('finished', 0)}, stopped "
        f"{counts.get('stopped_early', 0)}, failed {counts.get('failed', 0)}), running {counts.get('running', 0)}, "
        f"elapsed {duration(snapshot.elapsed_s)}, remaining ≈ {duration(snapshot.remaining_s)}"
        + (" (at most)" if snapshot.remaining_s is not None else ""))
    table = Table(box=None, pad_edge=False, show_edge=False)
    for name, justify in (("trial", "left"), ("epoch", "right"), (snapshot.metric, "right"), ("parameters", "left")):
        table.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis")
    for line in snapshot.trials:
        if line["status"] == "running":
            metric = f"{line['metric']:.2f}" if isinstance(line["metric"], (int, float)) else "-"
            table.add_row(line["trial"], f"{line['epoch']}/{snapshot.epochs}", metric, line["params"])
    return Group(summary, table)


class ProgressView:
    """The engine's ``printer``: ``view(line)`` prints a timestamped line; ``view.update(snapshot)`` redraws the
    live table (only on a terminal). Use it as a context manager so the live table is removed at the end."""

    def __init__(self, console: Console, prefix: str = "") -> None:
        self.console = console
        self.prefix = prefix
        self.started = time.perf_counter()
        self.live: Live | None = None

    def __call__(self, message: str) -> None:
        self.console.print(f"[dim]{time.perf_counter() - self.started:7.1f}s[/] {self.prefix}{message}", highlight=False)

    def update(self, snapshot: Any) -> None:
        """Redraw the live table of the trials (nothing when standard error is not a terminal)."""
        if not self.console.is_terminal:
            return
        if self.live is None:
            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.start()
        self.live.update(render_snapshot(snapshot))

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
