"""The LLaVA-Bench judge against a real local chat server: layout, score parsing, retries, exclusions, cache."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from chat_completions_server import ChatCompletionsServer, Fault, user_text
from llava_lit.eval.llava_bench import (
    judge_reviews,
    parse_scores,
    read_contexts,
    review_content,
    summarize,
    write_reviews,
)
from llava_lit.openai_client import ChatClientConfig
from llava_lit.qa_files import read_answers, read_questions


@pytest.mark.parametrize(
    "text,expected",
    [
        ("8 7\nAssistant 1 is more detailed.", (8.0, 7.0)),
        ("8, 7", (8.0, 7.0)),
        ("  9.5 6\n", (9.5, 6.0)),
        ("Assistant 1: 8\nAssistant 2: 7", None),
        ("8\n7", None),
        ("8 7 6", None),
        ("eight seven", None),
        ("", None),
        ("80 70", None),
    ],
)
def test_parse_scores(text, expected):
    assert parse_scores(text) == expected


def test_review_layout_puts_the_reference_first():
    content = review_content(
        "a cat", "What is it?", "REFERENCE", "CANDIDATE", {"role": "Assistant", "prompt": "RULE"}
    )
    assert content == (
        "[Context]\na cat\n\n[Question]\nWhat is it?\n\n"
        "[Assistant 1]\nREFERENCE\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nCANDIDATE\n\n[End of Assistant 2]\n\n[System]\nRULE\n\n"
    )


def test_read_contexts_wild_and_coco(tmp_path):
    path = tmp_path / "ctx.jsonl"
    rows = [
        {"id": "a", "image": "001.jpg", "caption": "A red circle on the left."},
        {
            "image": "002.jpg",
            "captions": ["Two dogs.", "Dogs play."],
            "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]}],
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_contexts(path) == {
        "001.jpg": "A red circle on the left.",
        "002.jpg": "Two dogs.\nDogs play.\n\ndog: [0.100, 0.200, 0.300, 0.400]",
    }


# question_id -> (category, candidate answer); the server's judge scores by the candidate's text.
BENCH = {
    "0": ("conv", "good answer"),
    "1": ("conv", "weak answer"),
    "2": ("detail", "good answer"),
    "3": ("detail", "good answer"),  # first review unreadable, second fine
    "4": ("complex", "weak answer"),  # first request gets a 500
    "5": ("complex", "good answer"),  # every review unreadable -> excluded
    "6": ("complex", None),  # no candidate answer -> excluded
}


@pytest.fixture
def bench_files(tmp_path):
    """A LLaVA-Bench folder in the official file formats."""
    q, a, r, c = (
        tmp_path / n for n in ("questions.jsonl", "answers.jsonl", "answers_gpt4.jsonl", "context.jsonl")
    )
    q.write_text(
        "".join(
            json.dumps(
                {"question_id": int(k), "image": f"{k}.jpg", "text": f"Question {k}?", "category": cat}
            )
            + "\n"
            for k, (cat, _) in BENCH.items()
        )
    )
    a.write_text(
        "".join(
            json.dumps(
                {
                    "question_id": int(k),
                    "prompt": f"Question {k}?",
                    "text": ans,
                    "answer_id": k,
                    "model_id": "m",
                }
            )
            + "\n"
            for k, (_, ans) in BENCH.items()
            if ans is not None
        )
    )
    r.write_text("".join(json.dumps({"question_id": int(k), "text": f"reference {k}"}) + "\n" for k in BENCH))
    c.write_text(
        "".join(json.dumps({"id": k, "image": f"{k}.jpg", "caption": f"scene {k}"}) + "\n" for k in BENCH)
    )
    return read_questions(q), read_answers(a), read_answers(r), read_contexts(c)


class JudgeResponder:
    def __init__(self) -> None:
        self.seen: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, body):
        content = user_text(body)
        qid = content.split("[Question]\nQuestion ")[1].split("?")[0]
        with self.lock:
            self.seen[qid] += 1
            n = self.seen[qid]
        assert content.index("reference") < content.index("answer\n\n[End of Assistant 2]")
        if qid == "4" and n == 1:
            return Fault(500)
        if qid == "5" or (qid == "3" and n == 1):
            return "Both assistants did well. Assistant 1 gets 8 and Assistant 2 gets 7."
        return (
            "8 6\nThe second answer is good."
            if "good answer" in content
            else "8 2\nThe second answer is weak."
        )


def _client(server, tmp_path, **kw):
    return ChatClientConfig(
        base_url=server.url,
        model="judge",
        api_key="k",
        backoff_base_s=0.01,
        cache_path=str(tmp_path / "judge_cache.sqlite"),
        **kw,
    )


def test_judge_end_to_end_with_retries_exclusions_and_cache(bench_files, tmp_path):
    questions, answers, references, contexts = bench_files
    with ChatCompletionsServer(JudgeResponder()) as server:
        reviews = judge_reviews(questions, answers, references, contexts, None, _client(server, tmp_path))
        sent = len(server.requests)
        again = judge_reviews(questions, answers, references, contexts, None, _client(server, tmp_path))
        assert len(server.requests) == sent  # the re-run re-judged nothing
    # 0,1,2: 1 each; 3: 2 (unreadable, then fine); 4: 2 (500, then fine); 5: 3 unreadable; 6: none
    assert sent == 10
    assert [r.status for r in reviews] == ["ok", "ok", "ok", "ok", "ok", "unparsable", "missing_answer"]
    assert reviews[3].attempts == 2 and reviews[5].attempts == 3
    assert server.requests[0]["messages"][0]["role"] == "system"
    metrics = summarize(reviews)
    assert metrics == summarize(again)
    # conversation: ref (8, 8), model (6, 2) -> 100 * 4 / 8; detail: (8, 8) vs (6, 6); complex: (8) vs (2)
    assert metrics["conversation"]["relative_score"] == 50.0
    assert metrics["detail"]["relative_score"] == 75.0
    assert metrics["complex"] == {
        "relative_score": 25.0,
        "reference_score": 8.0,
        "model_score": 2.0,
        "judged": 1,
        "unparsable": 1,
        "failed": 0,
        "missing_answer": 1,
    }
    # overall is a ratio of means over the 5 judged reviews: (6 + 2 + 6 + 6 + 2) / 5 over 8
    assert metrics["all"]["relative_score"] == 55.0 and metrics["all"]["judged"] == 5
    out = tmp_path / "reviews.jsonl"
    write_reviews(out, reviews)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["tuple"] == [8.0, 6.0] and rows[5]["tuple"] is None


def test_official_rule_keys_and_failed_requests(bench_files, tmp_path):
    questions, answers, references, contexts = bench_files
    rules = {
        f"llava_bench_{c}": {"role": "Reviewer", "prompt": f"RULE-{c}"} for c in ("conv", "detail", "complex")
    }
    with ChatCompletionsServer(lambda body: Fault(503)) as server:
        reviews = judge_reviews(
            questions[:2], answers, references, contexts, rules, _client(server, tmp_path, max_retries=1)
        )
    assert [r.status for r in reviews] == ["failed", "failed"]
    assert "[Reviewer 1]" in user_text(server.requests[0]) and "RULE-conv" in user_text(server.requests[0])
    assert summarize(reviews)["all"]["relative_score"] is None and summarize(reviews)["all"]["failed"] == 2


def test_missing_reference_is_a_clear_error(bench_files, tmp_path):
    questions, answers, references, contexts = bench_files
    del references["2"]
    with pytest.raises(ValueError, match=r"reference answers missing for question ids \['2'\]"):
        judge_reviews(
            questions, answers, references, contexts, None, ChatClientConfig(base_url="http://127.0.0.1:9/v1")
        )
