"""The OpenAI-compatible server, running on a local port, driven by the official `openai` client."""

from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from inference_helpers import png_bytes
from llava_lit.inference import SamplingParams
from llava_lit.serve import ServeConfig, create_app


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    """The app served by uvicorn on a free localhost port, in a background thread."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(checkpoint="unused", port=port, max_batch_size=4, batch_wait_ms=200)
    app = create_app(tiny_bundle, cfg)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}/v1", app
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


def _image_message(text: str, seed: int) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_uri(png_bytes(seed))}},
                {"type": "text", "text": text},
            ],
        }
    ]


def test_default_bind_is_localhost():
    assert ServeConfig(checkpoint="x").host == "127.0.0.1"


def test_models_and_completion_match_local_generation(client, tiny_bundle):
    assert [m.id for m in client.models.list().data] == ["tiny/finetune"]
    reply = client.chat.completions.create(
        model="tiny/finetune", messages=_image_message("What is this?", 1), max_tokens=7, temperature=0
    )
    pixels = tiny_bundle.image_loader(png_bytes(1))
    prompt = tiny_bundle.prompt([{"role": "user", "content": "<image>\nWhat is this?"}], [pixels])
    local = tiny_bundle.generator().generate([prompt], SamplingParams(max_new_tokens=7))[0]
    assert reply.choices[0].message.content == local.text
    assert reply.choices[0].finish_reason == local.finish_reason
    assert reply.usage.prompt_tokens == len(prompt.input_ids)
    assert reply.usage.completion_tokens == local.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_gives_the_same_text_and_usage(client):
    messages = [{"role": "user", "content": "Write about a cat."}]
    whole = client.chat.completions.create(model="tiny/finetune", messages=messages, max_tokens=10)
    stream = client.chat.completions.create(
        model="tiny/finetune",
        messages=messages,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_requests_are_batched(client, server):
    batcher = server[1].state.batcher
    before = len(batcher.batch_sizes)

    def ask(i: int) -> str:
        reply = client.chat.completions.create(
            model="tiny/finetune", messages=_image_message(f"Q{i}?", i), max_tokens=4
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert len(answers) == 4
    assert max(batcher.batch_sizes[before:]) > 1


@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"model": "gpt-4"}, 404, "does not exist"),
        (
            {
                "messages": _image_message("x", 0)[:0]
                + [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}
                        ],
                    }
                ]
            },
            400,
            "malformed image",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
                    }
                ]
            },
            400,
            "base64",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}],
                    }
                ]
            },
            400,
            "local image paths",
        ),
        ({"max_tokens": 100000}, 400, "maximum length"),
        (
            {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]},
            400,
            "system",
        ),
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, 400, "last message"),
        ({"temperature": -1}, 400, "temperature"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "<image>\nWhat is in the image?"}]}, 400, "no image"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "<image>\nWhat is this?"}]}]},
            400,
            "no image",
        ),
    ],
)
def test_bad_requests_get_4xx_with_a_message(client, kwargs, status, needle):
    request = {
        "model": "tiny/finetune",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        **kwargs,
    }
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**request)
    assert info.value.status_code == status
    assert needle in info.value.response.json()["error"]["message"]


def test_malformed_json_body_is_a_400(server):
    response = httpx.post(server[0] + "/chat/completions", json={"model": "tiny/finetune"}, timeout=30)
    assert response.status_code == 400
    assert "messages" in response.json()["error"]["message"]


@pytest.mark.slow
def test_the_command_logs_under_outputs_not_the_working_directory(tiny_checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LLAVA_LIT_OUTPUTS": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "llava_lit.serve", f"checkpoint={tiny_checkpoint}", f"port={port}"]
    server = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError("the server did not start")
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert not (tmp_path / "serve.log").exists()
    (log,) = (tmp_path / "outputs" / "serve").glob("*/serve.log")
    assert "serving tiny/finetune" in log.read_text()
