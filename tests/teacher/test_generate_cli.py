"""`python -m llava_lit.generate` as a user runs it: Hydra overrides, a local endpoint from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from chat_completions_server import ChatCompletionsServer, user_text


def test_cli_generates_descriptions_from_jsonl(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(
        json.dumps(
            {
                "image": "a.png",
                "captions": ["A red circle on the left."],
                "boxes": [{"category": "red circle", "bbox": [0.1, 0.4, 0.3, 0.6]}],
            }
        )
        + "\n"
        + json.dumps({"image": "b.png", "captions": []})
        + "\n"
    )
    out = tmp_path / "out"
    with ChatCompletionsServer(
        lambda body: "There is " + user_text(body).splitlines()[0][2:].lower()
    ) as server:
        env = {**os.environ, "OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": "sk-local"}
        cmd = [
            sys.executable,
            "-m",
            "llava_lit.generate",
            f"input.jsonl={inputs}",
            f"output_dir={out}",
            "teacher.types=[detail_description]",
            "client.model=local-teacher",
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert server.requests[0]["model"] == "local-teacher" and server.auth_headers == ["Bearer sk-local"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["types"]["detail_description"]["generated"] == 1
    assert summary["skipped_inputs"] == {"invalid": 1}
    records = json.loads((out / "detail_description.json").read_text())
    assert records[0]["conversations"][1]["value"] == "There is red circle on the left."
    assert (out / "teacher_cache.sqlite").is_file()
