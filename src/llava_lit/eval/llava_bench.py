"""LLaVA-Bench (in-the-wild and COCO): a language-model judge compares the candidate's answer with a reference.

The judge reads a text context of the image (captions, boxes), the question, the reference answer as
Assistant 1 and the candidate answer as Assistant 2, then a rule asking for two 1-10 scores on the first
line; this is the official layout (`[Context]`, `[Question]`, `[Assistant 1]`, `[Assistant 2]`, `[System]`),
with our own wording of the system message and rules. The official `rule.json` can be passed instead.
The relative score is 100 × mean(candidate) / mean(reference), per category and overall (a ratio of means,
as the official summary computes it).

Unlike the official script, a review whose first line does not hold exactly two scores is asked again and,
if it stays unreadable, excluded and counted instead of being averaged in as -1. Requests go through
`llava_lit.openai_client`, so concurrency, retries, a request budget and a cache (a re-run re-judges nothing
already judged) come with it.

    reviews = judge_reviews(questions, answers, references, contexts, rules=None, client_config=cfg)
    metrics = summarize(reviews)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llava_lit.openai_client import BudgetExhausted, ChatClient, ChatClientConfig, ChatRequestError

log = logging.getLogger(__name__)

JUDGE_SYSTEM_MESSAGE = "You are a careful and exact assistant who checks the quality of answers."

_RULE_COMMON = (
    "The user asked the question above while looking at an image; the image is described to you by the "
    "context above. Rate the {aspects} of each answer. Give each assistant one overall score from 1 to 10, "
    "where a higher score means better overall performance.\n"
    "On the first line, write only the two scores, for Assistant 1 and Assistant 2 in that order, separated "
    "by a space. From the second line on, explain your judgement thoroughly, without bias, and make sure the "
    "order in which the answers were shown does not affect it."
)
DEFAULT_RULES: dict[str, dict[str, str]] = {
    "conv": {
        "role": "Assistant",
        "prompt": "We would like your feedback on two AI assistants' answers to the user question shown above. "
        + _RULE_COMMON.format(aspects="helpfulness, relevance, accuracy and level of detail"),
    },
    "detail": {
        "role": "Assistant",
        "prompt": "We would like your feedback on two AI assistants' detailed accounts of the image for the "
        "user request shown above. "
        + _RULE_COMMON.format(aspects="helpfulness, relevance, accuracy and level of detail"),
    },
    "complex": {
        "role": "Assistant",
        "prompt": "We would like your feedback on two AI assistants' answers to the reasoning question shown "
        "above. "
        + _RULE_COMMON.format(
            aspects="helpfulness, relevance, accuracy, depth of reasoning and level of detail"
        ),
    },
}
"""Rules by question category, our wording of the official rule set (`rule.json` keys `conv/detail/complex`)."""

CATEGORY_NAMES = {"conv": "conversation", "detail": "detail", "complex": "complex"}
"""Question-file categories and the names they are reported under."""


@dataclass
class Review:
    """The judge's verdict on one question."""

    question_id: str
    category: str
    """The question's category as in the question file (`conv`, `detail`, `complex`)."""
    status: str
    """'ok', 'unparsable' (no readable scores after every attempt), 'failed' (request failed or budget spent)
    or 'missing_answer' (the candidate gave no answer for this question)."""
    reference_score: float | None = None
    """Score of Assistant 1, the reference answer."""
    model_score: float | None = None
    """Score of Assistant 2, the candidate model's answer."""
    review: str = ""
    """The judge's last review text (or the error for a failed request)."""
    attempts: int = 0
    """Reviews asked for this question."""
    content: str = ""
    """The user message sent to the judge."""


def parse_scores(review: str) -> tuple[float, float] | None:
    """Two scores from the review's first line ("8 7", "8, 7", "8.5 6"), or None if it holds anything else."""
    first = review.strip().split("\n", 1)[0].replace(",", " ").split()
    if len(first) != 2:
        return None
    try:
        scores = (float(first[0]), float(first[1]))
    except ValueError:
        return None
    # The rule asks for 1-10; a value outside 0-10 is a misread line, not a score.
    return scores if all(0.0 <= s <= 10.0 for s in scores) else None


def review_content(context: str, question: str, reference: str, answer: str, rule: Mapping[str, str]) -> str:
    """The judge's user message in the official layout: reference answer first, candidate second."""
    role = rule.get("role", "Assistant")
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
        f"[System]\n{rule['prompt']}\n\n"
    )


def load_rules(path: str | Path) -> dict[str, dict[str, str]]:
    """A rule file in the official `rule.json` format: `{key: {"role": ..., "prompt": ...}}`."""
    rules = json.loads(Path(path).read_text(encoding="utf-8"))
    for key, rule in rules.items():
        if not isinstance(rule, dict) or "prompt" not in rule:
            raise ValueError(f"{path}: rule {key!r} needs a 'prompt' (and optionally a 'role')")
    return rules


def read_contexts(path: str | Path) -> dict[str, str]:
    """Image → context text from an official context JSONL.

    In-the-wild lines carry `caption`; COCO lines carry `captions` (list) and optionally `instances`
    (`[{category, bbox}]`, normalised boxes), rendered as captions then `category: [x1, y1, x2, y2]` lines.
    """
    out = {}
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "image" not in row:
                raise ValueError(f"{path}:{lineno}: context line needs an 'image'")
            if isinstance(row.get("caption"), str):
                text = row["caption"]
            elif isinstance(row.get("captions"), list):
                lines = [str(c).strip() for c in row["captions"]]
                boxes = [
                    f"{b['category']}: [{', '.join(f'{float(v):.3f}' for v in b['bbox'])}]"
                    for b in row.get("instances") or []
                ]
                text = "\n".join(lines + ([""] + boxes if boxes else []))
            else:
                raise ValueError(f"{path}:{lineno}: context line needs 'caption' or 'captions'")
            out[row["image"]] = text
    return out


def _field(question: Any, name: str) -> Any:
    return question[name] if isinstance(question, Mapping) else getattr(question, name)


def _rule_for(rules: Mapping[str, Mapping[str, str]], category: str, rule_prefix: str) -> Mapping[str, str]:
    for key in (f"{rule_prefix}{category}", category):
        if key in rules:
            return rules[key]
    raise ValueError(
        f"no rule for category {category!r} (looked for {rule_prefix}{category!r} and {category!r})"
    )


async def judge_reviews_async(
    questions: Iterable[Any],
    answers: Mapping[str, str],
    references: Mapping[str, str],
    contexts: Mapping[str, str],
    rules: Mapping[str, Mapping[str, str]] | None,
    client_config: ChatClientConfig,
    *,
    max_review_attempts: int = 3,
    rule_prefix: str = "llava_bench_",
    system_message: str = JUDGE_SYSTEM_MESSAGE,
) -> list[Review]:
    """Async `judge_reviews`."""
    rules = DEFAULT_RULES if rules is None else rules
    questions = list(questions)
    missing_refs = [
        str(_field(q, "question_id")) for q in questions if str(_field(q, "question_id")) not in references
    ]
    missing_ctx = sorted({str(_field(q, "image")) for q in questions if _field(q, "image") not in contexts})
    if missing_refs or missing_ctx:
        raise ValueError(
            f"reference answers missing for question ids {missing_refs[:10]}"
            f"{'...' if len(missing_refs) > 10 else ''}; contexts missing for images {missing_ctx[:10]}"
        )

    async def judge_one(client: ChatClient, q: Any) -> Review:
        qid, category = str(_field(q, "question_id")), str(_field(q, "category"))
        if qid not in answers:
            return Review(qid, category, "missing_answer")
        content = review_content(
            contexts[_field(q, "image")],
            _field(q, "text"),
            references[qid],
            answers[qid],
            _rule_for(rules, category, rule_prefix),
        )
        messages = [{"role": "system", "content": system_message}, {"role": "user", "content": content}]
        digest = hashlib.sha256(f"{system_message}\0{content}".encode()).hexdigest()[:16]
        review = Review(qid, category, "unparsable", content=content)
        for attempt in range(max(1, max_review_attempts)):
            review.attempts = attempt + 1
            try:
                reply = await client.complete(f"judge|{client.config.model}|{digest}|try{attempt}", messages)
            except (BudgetExhausted, ChatRequestError) as err:
                review.status, review.review = "failed", str(err)
                return review
            review.review = reply.text
            scores = parse_scores(reply.text)
            if scores is not None:
                review.status = "ok"
                review.reference_score, review.model_score = scores
                return review
            log.info("question %s: unreadable review (attempt %d): %r", qid, attempt + 1, reply.text[:80])
        return review

    async with ChatClient(client_config) as client:
        reviews = await asyncio.gather(*(judge_one(client, q) for q in questions))
        usage = client.usage.summary()
    counts = {
        s: sum(r.status == s for r in reviews) for s in ("ok", "unparsable", "failed", "missing_answer")
    }
    log.info("LLaVA-Bench judge: %s; usage %s", counts, usage)
    if counts["unparsable"] or counts["failed"] or counts["missing_answer"]:
        log.warning("LLaVA-Bench judge excluded reviews: %s", {k: v for k, v in counts.items() if k != "ok"})
    return list(reviews)


def judge_reviews(
    questions: Iterable[Any],
    answers: Mapping[str, str],
    references: Mapping[str, str],
    contexts: Mapping[str, str],
    rules: Mapping[str, Mapping[str, str]] | None,
    client_config: ChatClientConfig,
    *,
    max_review_attempts: int = 3,
    rule_prefix: str = "llava_bench_",
    system_message: str = JUDGE_SYSTEM_MESSAGE,
) -> list[Review]:
    """Judge every question: one `Review` each, in question order.

    `questions`: `llava_lit.qa_files.Question`s or dicts with `question_id`, `image`, `text`, `category`.
    `answers` / `references`: `{question_id: text}` for the candidate and the reference (as
    `jsonl.read_answers` returns). `contexts`: `{image: text}` (see `read_contexts`). `rules`: official
    `rule.json` content, or None for `DEFAULT_RULES`; the rule for a category is `rule_prefix + category`,
    else `category`. Raises `ValueError` if a reference or context is missing (a broken benchmark folder);
    a missing candidate answer is counted as `missing_answer` instead.
    """
    return asyncio.run(
        judge_reviews_async(
            questions,
            answers,
            references,
            contexts,
            rules,
            client_config,
            max_review_attempts=max_review_attempts,
            rule_prefix=rule_prefix,
            system_message=system_message,
        )
    )


def summarize(reviews: Iterable[Review]) -> dict[str, dict[str, float | int | None]]:
    """Relative scores per category (reported names: conversation, detail, complex) and `all`.

    Each entry: `relative_score` = 100 × mean(model) / mean(reference) over the reviews with scores,
    `reference_score` and `model_score` (the means, 1-10 scale), `judged`, and the excluded counts
    `unparsable`, `failed`, `missing_answer`. `relative_score` is None when nothing was judged.
    """
    reviews = list(reviews)
    groups: dict[str, list[Review]] = {}
    for r in reviews:
        groups.setdefault(CATEGORY_NAMES.get(r.category, r.category), []).append(r)
    groups = dict(sorted(groups.items()))
    groups["all"] = reviews
    out = {}
    for name, group in groups.items():
        ok = [r for r in group if r.status == "ok"]
        ref = sum(r.reference_score for r in ok) / len(ok) if ok else None
        model = sum(r.model_score for r in ok) / len(ok) if ok else None
        out[name] = {
            "relative_score": round(100.0 * model / ref, 2) if ok and ref else None,
            "reference_score": None if ref is None else round(ref, 4),
            "model_score": None if model is None else round(model, 4),
            "judged": len(ok),
            "unparsable": sum(r.status == "unparsable" for r in group),
            "failed": sum(r.status == "failed" for r in group),
            "missing_answer": sum(r.status == "missing_answer" for r in group),
        }
    return out


def write_reviews(path: str | Path, reviews: Iterable[Review]) -> None:
    """One JSON line per review (with `tuple` = [reference, model] scores, like the official review files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in reviews:
            row = asdict(r)
            row["tuple"] = [r.reference_score, r.model_score] if r.status == "ok" else None
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
