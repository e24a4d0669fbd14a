"""Tests of ``crdnd_ray.progress``: durations people read, and a view that prints lines but never redraws a live
table where standard error is not a terminal (a log file, CI)."""

from __future__ import annotations

from io import StringIO

from rich.console import Console

from crdnd_ray.progress import ProgressView, duration


def test_durations_read_naturally():
    assert [duration(s) for s in (None, 4.4, 75, 3725, 3.6e8)] == ["?", "4 s", "1 min 15 s", "1 h 02 min", "100,000 h"]


def test_a_view_off_a_terminal_prints_lines_only():
    buffer = StringIO()
    with ProgressView(Console(file=buffer, force_terminal=False, width=200), "teacher ") as view:
        view("epoch 1/3: loss=1.2")
        view.update(object())
        assert view.live is None
    printed = buffer.getvalue().strip().splitlines()
    assert len(printed) == 1 and printed[0].endswith("teacher epoch 1/3: loss=1.2")
