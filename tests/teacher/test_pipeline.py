"""The whole teacher pipeline over real HTTP: world scenes in, LLaVA JSON out, faults, rejections and resume.

The local server answers like a teacher would (replies derived from the captions it is shown), injects a 429,
a timeout and a malformed reply, and always leaks coordinates for one job. The resume test stops a run with
the request budget, finishes it with a second run, and checks the two together sent exactly the requests of
one uninterrupted run, so nothing already paid for was asked again.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

import numpy as np
import pytest

from chat_completions_server import ChatCompletionsServer, Fault, user_text
from llava_lit.generate import GenerateConfig, InputConfig, run
from llava_lit.openai_client import ChatClientConfig
from llava_lit.records import parse_record
from llava_lit.teacher.pipeline import MIXED_FILE, TeacherConfig
from llava_lit.world.config import WorldConfig
from llava_lit.world.scenes import render_scene, sample_scene
from llava_lit.world.teacher_input import write_world_inputs

TYPES = ("conversation", "detail_description", "complex_reasoning")


def _data_type(body) -> str:
    system = body["messages"][0]["content"]
    if "Write a conversation" in system:
        return "conversation"
    if "describe the image in detail" in system:
        return "detail_description"
    return "complex_reasoning"


class TeacherResponder:
    """Canned teacher: answers from the captions; faults keyed by (scene caption, type) and request count."""

    def __init__(self, scenes_first_captions: list[str]) -> None:
        self.first = scenes_first_captions
        self.seen: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, body):
        data_type = _data_type(body)
        captions = user_text(body).split("\n\n")[0].splitlines()
        scene = self.first.index(captions[0])
        with self.lock:
            self.seen[(scene, data_type)] += 1
            n = self.seen[(scene, data_type)]
        if (scene, data_type) == (0, "conversation") and n == 1:
            return Fault(429, retry_after="0")
        if (scene, data_type) == (1, "detail_description") and n == 1:
            return Fault(kind="stall", stall_s=1.0)
        if (scene, data_type) == (2, "conversation") and n == 1:
            return "Sure! Here is a conversation about the picture: it shows shapes."  # not the format
        if (scene, data_type) == (3, "complex_reasoning"):
            return "Question:\nWhere is the top shape?\n===\nAnswer:\nIts box starts at [0.45, 0.12]."
        if data_type == "conversation":
            return (
                f"Question:\nWhat is in the image?\n===\nAnswer:\n{captions[0]}\n===\n"
                f"Question:\nWhat is behind the shapes?\n===\nAnswer:\n{captions[1]}\n==="
            )
        if data_type == "detail_description":
            return " ".join(captions)
        return f"Question:\nWhich shape would you notice first, and why?\n===\nAnswer:\n{captions[2]} It stands out."


@pytest.fixture(scope="module")
def world_inputs(tmp_path_factory):
    """Four rendered world scenes and their teacher JSONL input."""
    root = tmp_path_factory.mktemp("world_teacher")
    cfg = WorldConfig.ci()
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng, cfg, f"train-{i:06d}") for i in range(4)]
    (root / "images").mkdir()
    for s in scenes:
        render_scene(s, cfg).save(root / "images" / f"{s.scene_id}.png")
    write_world_inputs(scenes, cfg, root / "inputs.jsonl")
    first = [json.loads(line)["captions"][0] for line in (root / "inputs.jsonl").read_text().splitlines()]
    return root, first


def _config(inputs, out_dir, url, **client) -> GenerateConfig:
    return GenerateConfig(
        input=InputConfig(jsonl=str(inputs)),
        teacher=TeacherConfig(),
        client=ChatClientConfig(
            base_url=url,
            model="teacher",
            api_key="k",
            backoff_base_s=0.01,
            timeout_s=0.5,
            cache_path=str(out_dir / "cache.sqlite"),
            **client,
        ),
        output_dir=str(out_dir),
    )


def test_full_run_faults_rejections_and_records(world_inputs, tmp_path):
    root, first = world_inputs
    with ChatCompletionsServer(TeacherResponder(first)) as server:
        summary = run(_config(root / "inputs.jsonl", tmp_path, server.url))
    assert (
        summary["types"]["conversation"]["generated"] == 4
    )  # incl. the 429, and the malformed reply retried
    assert summary["types"]["detail_description"]["generated"] == 4  # incl. the timeout
    assert summary["types"]["complex_reasoning"]["generated"] == 3
    assert summary["types"]["complex_reasoning"]["rejected"] == {"mentions_coordinates": 1}
    assert summary["complete"] and summary["generated"] == 11
    errors = summary["usage"]["errors"]
    assert errors["429"] == 1 and errors["timeout"] >= 1 and set(errors) == {"429", "timeout"}
    # 12 jobs + 1 reply retry (malformed) + 1 extra reply attempt of the always-bad job + transport retries
    assert len(server.requests) == summary["usage"]["requests_sent"] == 14 + sum(errors.values())

    mixed = json.loads((tmp_path / MIXED_FILE).read_text())
    assert len(mixed) == 11 and len({r["id"] for r in mixed}) == 11
    for rec in mixed:
        parsed = parse_record(rec)
        assert parsed.images == (rec["image"],) and (root / "images" / rec["image"]).is_file()
        turns = rec["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    conv = json.loads((tmp_path / "conversation.json").read_text())
    assert conv[0]["id"] == "train-000000_conversation" and len(conv[0]["conversations"]) == 4
    assert conv[0]["conversations"][1]["value"] == first[0]
    detail = json.loads((tmp_path / "detail_description.json").read_text())
    assert all(not d["conversations"][0]["value"].endswith("<image>\n") for d in detail)


def test_interrupted_run_resumes_without_repeating_a_call(world_inputs, tmp_path):
    root, first = world_inputs
    inputs = root / "inputs.jsonl"
    with ChatCompletionsServer(TeacherResponder(first)) as reference:
        expected = run(_config(inputs, tmp_path / "reference", reference.url))
    with ChatCompletionsServer(TeacherResponder(first)) as server:
        stopped = run(_config(inputs, tmp_path / "run", server.url, max_requests=7, concurrency=1))
        sent_first = len(server.requests)
        resumed = run(_config(inputs, tmp_path / "run", server.url))
        sent_both = len(server.requests)
        again = run(_config(inputs, tmp_path / "run", server.url))
    assert not stopped["complete"] and sent_first == 7
    assert sum(t["failed"].get("budget_exhausted", 0) for t in stopped["types"].values()) > 0
    assert resumed["complete"] and sent_both == len(reference.requests)
    assert len(server.requests) == sent_both and again["usage"]["cache_hits"] > 0
    for name in ("conversation.json", "detail_description.json", "complex_reasoning.json", MIXED_FILE):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "reference" / name).read_text()
    assert resumed["types"] == expected["types"]


@pytest.mark.slow  # the converter verifies and re-encodes every image: ~10 s on 2 busy cores
def test_teacher_output_converts_to_shards(world_inputs, tmp_path):
    from llava_lit.convert import convert

    root, first = world_inputs
    with ChatCompletionsServer(TeacherResponder(first)) as server:
        run(_config(root / "inputs.jsonl", tmp_path / "gen", server.url))
    manifest = convert(tmp_path / "gen" / MIXED_FILE, root / "images", tmp_path / "shards", progress=False)
    assert manifest.num_samples == manifest.num_image_samples == 11 and manifest.skipped == {}
