"""Scoring of answers to the world's held-out questions, per question type.

An answer is correct when the set of keys it names (colors, shapes, numbers, yes/no, positions) is exactly
the gold key: naming the right color *and* another one is wrong, so hedging is never rewarded. Answers use the
official LLaVA answer format (`question_id`, `text`); gold answers are the rows of `eval/answers_gt.jsonl`.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from llava_lit.world.dialogues import NUMBER_WORDS, QUESTION_TYPES

SYNONYMS = {"middle": "center", "centre": "center", "grey": "gray"}
"""Words an answer may use for a key, rewritten before matching."""


def load_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _rows(source: list[dict] | str | Path) -> list[dict]:
    # The functions below take either rows already read or the JSON-lines file holding them.
    return load_jsonl(source) if isinstance(source, (str, Path)) else source


def _report_order(types: set[str]) -> list[str]:
    # The world's question types in their report order, then any others alphabetically.
    return [t for t in QUESTION_TYPES if t in types] + sorted(types - set(QUESTION_TYPES))


def _normalize(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return " " + " ".join(SYNONYMS.get(w, w) for w in words) + " "


def _named(text: str, phrases: list[str]) -> set[str]:
    # Whole-word match, allowing a plural "s" ("circles"); phrases may span several words.
    return {p for p in phrases if re.search(rf" {re.escape(p)}s? ", text)}


def _numbers(text: str) -> set[str]:
    found = set(re.findall(r" (\d+) ", text.replace(" ", "  ")))
    found |= {str(i) for i, w in enumerate(NUMBER_WORDS) if f" {w} " in text}
    return {str(int(n)) for n in found}


def keys_named(gold: dict, answer: str) -> set[str]:
    """The keys of `gold`'s question type that `answer` names (compared with `gold["key"]`)."""
    text = _normalize(answer)
    category, candidates = gold["category"], gold["candidates"]
    if category in ("count", "remove"):
        return _numbers(text)
    if category == "closest":
        # Key "red circle": the answer must name exactly one color and one shape, and they must be these.
        colors = {c.split(" ")[0] for c in candidates} | {gold["key"].split(" ")[0]}
        shapes = {c.split(" ")[1] for c in candidates} | {gold["key"].split(" ")[1]}
        named_colors, named_shapes = _named(text, sorted(colors)), _named(text, sorted(shapes))
        return {f"{c} {s}" for c in named_colors for s in named_shapes} | (
            {"<several>"} if len(named_colors) > 1 or len(named_shapes) > 1 else set()
        )
    return _named(text, list(candidates))


def is_correct(gold: dict, answer: str) -> bool:
    """True when the answer names the gold key and nothing else of its type."""
    return keys_named(gold, answer) == {gold["key"]}


def score_answers(answers: list[dict], ground_truth: list[dict] | str | Path) -> dict:
    """Accuracy per question type and overall.

    `answers`: official answer rows (`question_id`, `text`); a gold question without an answer counts as wrong
    and is reported under `missing`. `ground_truth`: the rows of `answers_gt.jsonl`, or its path.
    Returns `{"overall": {...}, "per_type": {type: {...}}, "missing": int, "unknown_ids": int}` where each
    `{...}` holds `correct`, `total`, `accuracy` and `chance` (accuracy of a uniform guess among the candidates).
    """
    gold_rows = _rows(ground_truth)
    by_id = {str(a["question_id"]): a["text"] for a in answers}
    gold_ids = {str(g["question_id"]) for g in gold_rows}
    stats: dict[str, dict[str, float]] = defaultdict(lambda: {"correct": 0, "total": 0, "chance_sum": 0.0})
    missing = 0
    for g in gold_rows:
        answer = by_id.get(str(g["question_id"]))
        missing += answer is None
        ok = answer is not None and is_correct(g, answer)
        for bucket in (g["category"], "overall"):
            stats[bucket]["correct"] += ok
            stats[bucket]["total"] += 1
            stats[bucket]["chance_sum"] += 1.0 / len(g["candidates"])

    def summary(s: dict[str, float]) -> dict:
        n = s["total"]
        return {
            "correct": int(s["correct"]),
            "total": int(n),
            "accuracy": s["correct"] / n if n else 0.0,
            "chance": s["chance_sum"] / n if n else 0.0,
        }

    order = _report_order(set(stats) - {"overall"})
    return {
        "overall": summary(stats["overall"]),
        "per_type": {t: summary(stats[t]) for t in order},
        "missing": missing,
        "unknown_ids": len(set(by_id) - gold_ids),
    }


def accuracy_by_object_count(
    answers: list[dict], ground_truth: list[dict] | str | Path, scenes: list[dict] | str | Path
) -> dict[str, dict[int, dict]]:
    """Accuracy per question type, split by how many objects the question's scene holds.

    Tells a model that looks objects up from one that reads the image as a whole: on a one-object scene "Where
    is the red circle?" needs no look-up (any object is the one), so a model that has not learned the look-up
    is right there and near 1/n on n-object scenes. `scenes`: the rows of `scenes/eval.jsonl`, or its path.
    Returns `{type: {n_objects: {"correct", "total", "accuracy"}}}`; unanswered questions count as wrong.
    """
    gold_rows = _rows(ground_truth)
    n_objects = {s["scene_id"]: len(s["objects"]) for s in _rows(scenes)}
    by_id = {str(a["question_id"]): a["text"] for a in answers}
    stats: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for g in gold_rows:
        if g["scene_id"] not in n_objects:
            raise ValueError(f"question {g['question_id']}: scene {g['scene_id']!r} is not in the scene file")
        answer = by_id.get(str(g["question_id"]))
        cell = stats[g["category"]][n_objects[g["scene_id"]]]
        cell[0] += answer is not None and is_correct(g, answer)
        cell[1] += 1
    return {
        t: {
            n: {"correct": c, "total": total, "accuracy": c / total}
            for n, (c, total) in sorted(stats[t].items())
        }
        for t in _report_order(set(stats))
    }


def format_table(runs: dict[str, dict]) -> str:
    """Markdown table of accuracy per question type for several scored runs (column per run) plus chance."""
    names = list(runs)
    first = runs[names[0]]
    rows = ["| type | n | " + " | ".join(names) + " | chance |", "|---|---|" + "---|" * (len(names) + 1)]
    for t in [*first["per_type"], "overall"]:
        cells = [runs[n]["per_type"].get(t) if t != "overall" else runs[n]["overall"] for n in names]
        ref = first["overall"] if t == "overall" else first["per_type"][t]
        accs = " | ".join(f"{c['accuracy'] * 100:.1f}%" if c else "-" for c in cells)
        rows.append(f"| {t} | {ref['total']} | {accs} | {ref['chance'] * 100:.1f}% |")
    return "\n".join(rows)
