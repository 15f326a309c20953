"""Metrics tables: text layout, JSON round trip, flattening for loggers."""

from __future__ import annotations

import json
from pathlib import Path

from llava_lit.eval.report import flatten, format_table, write_metrics

METRICS = {"overall": {"acc": 50.0, "n": 6}, "IMG": {"acc": None, "n": 0}, "mean": {"f1": 61.111}}


def test_format_table_rows_columns_and_empty_cells() -> None:
    text = format_table("demo", METRICS)
    lines = text.splitlines()
    assert lines[0].strip() == "demo"
    header = next(line for line in lines if "acc" in line)
    assert header.index("acc") < header.index("n") < header.index("f1")
    overall = next(line for line in lines if "overall" in line)
    assert "50.00" in overall and " 6 " in overall
    img = next(line for line in lines if "IMG" in line)
    assert "-" in img and "61.11" in next(line for line in lines if "mean" in line)


def test_write_metrics_and_flatten(tmp_path: Path) -> None:
    path = write_metrics(tmp_path / "sub" / "metrics.json", "demo", METRICS, answers_file="a.jsonl")
    saved = json.loads(path.read_text())
    assert saved == {"benchmark": "demo", "metrics": METRICS, "answers_file": "a.jsonl"}
    assert flatten(METRICS, "val") == {
        "val/overall/acc": 50.0,
        "val/overall/n": 6.0,
        "val/IMG/n": 0.0,
        "val/mean/f1": 61.111,
    }
