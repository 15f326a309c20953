"""Metrics tables: one shape for every benchmark, printed to the terminal, written as JSON, flattened for loggers.

Every scorer returns rows of named numbers (`{"overall": {"acc": 71.2, "n": 4241}, "NAT": {...}}`), so one
printer, one JSON writer and one flattener serve them all. Percentages are already in percent; None marks a
metric with no data (an empty category), printed as "-" and logged as nothing.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

Metrics = dict[str, dict[str, float | int | None]]
"""Row name -> metric name -> value, as every scorer returns."""


def format_table(title: str, metrics: Metrics) -> str:
    """The metrics as a plain-text table: one line per row, one column per metric name (first-seen order)."""
    columns: list[str] = []
    for values in metrics.values():
        columns += [k for k in values if k not in columns]
    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold")
    for col in columns:
        table.add_column(col, justify="right")
    for row, values in metrics.items():
        table.add_row(row, *(_cell(values.get(col)) for col in columns))
    buffer = io.StringIO()
    Console(file=buffer, width=max(80, 12 * (len(columns) + 1)), color_system=None).print(table)
    return buffer.getvalue()


def print_table(title: str, metrics: Metrics) -> None:
    """Print `format_table` to stdout."""
    print(format_table(title, metrics), end="", flush=True)


def _cell(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def write_metrics(path: str | Path, benchmark: str, metrics: Metrics, **info: object) -> Path:
    """Write `{"benchmark": ..., "metrics": ..., **info}` as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": benchmark, "metrics": metrics, **info}, indent=2) + "\n")
    return path


def flatten(metrics: Metrics, prefix: str) -> dict[str, float]:
    """`{"<prefix>/<row>/<metric>": value}` for every numeric value, ready for `LightningModule.log_dict`."""
    return {
        f"{prefix}/{row}/{name}": float(value)
        for row, values in metrics.items()
        for name, value in values.items()
        if value is not None
    }
