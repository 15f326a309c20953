"""The chat client against a real local HTTP server: replies, faults, retries, budget, cache and concurrency."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from chat_completions_server import ChatCompletionsServer, Fault, user_text
from llava_lit.openai_client import BudgetExhausted, ChatClient, ChatClientConfig, ChatRequestError

MESSAGES = [{"role": "user", "content": "say hello"}]


def _config(server: ChatCompletionsServer, **kw) -> ChatClientConfig:
    base = dict(
        base_url=server.url, model="teacher-test", api_key="sk-test", backoff_base_s=0.01, timeout_s=5.0
    )
    return ChatClientConfig(**{**base, **kw})


def _run(config: ChatClientConfig, calls: list[tuple[str | None, list]]) -> tuple[list, ChatClient]:
    async def main():
        async with ChatClient(config) as client:
            results = await asyncio.gather(*(client.complete(k, m) for k, m in calls), return_exceptions=True)
            return results, client

    return asyncio.run(main())


def _scripted(faults: list[Fault], reply: str = "hello there"):
    """Responder that plays `faults` in order on the first requests, then answers `reply`."""
    queue = list(faults)
    lock = threading.Lock()

    def respond(body):
        with lock:
            if queue:
                return queue.pop(0)
        return reply

    return respond


def test_reply_usage_cost_and_auth():
    with ChatCompletionsServer(lambda body: "hello there friend") as server:
        cfg = _config(server, price_input_per_million=1_000_000.0, price_output_per_million=2_000_000.0)
        (result,), client = _run(cfg, [("k1", MESSAGES)])
    assert result.text == "hello there friend" and not result.cached
    assert (result.prompt_tokens, result.completion_tokens) == (2, 3)
    assert client.usage.cost == pytest.approx(2 * 1.0 + 3 * 2.0)
    assert server.auth_headers == ["Bearer sk-test"]
    assert server.requests[0]["model"] == "teacher-test"
    assert server.requests[0]["temperature"] == 0.2 and server.requests[0]["max_tokens"] == 1024


@pytest.mark.parametrize(
    "fault,kind",
    [
        (Fault(429, retry_after="0"), "429"),
        (Fault(500), "500"),
        (Fault(503), "503"),
        (Fault(kind="not_json"), "malformed"),
        (Fault(kind="no_choices"), "malformed"),
        (Fault(kind="drop"), "connection"),
        (Fault(kind="stall", stall_s=1.0), "timeout"),
    ],
)
def test_retryable_faults_are_retried(fault, kind):
    with ChatCompletionsServer(_scripted([fault, fault])) as server:
        (result,), client = _run(_config(server, timeout_s=0.3), [(None, MESSAGES)])
    assert not isinstance(result, Exception), result
    assert result.text == "hello there"
    assert client.usage.requests_sent == 3 and client.usage.retries == 2
    assert client.usage.errors == {kind: 2}
    assert client.usage.successes == 1 and client.usage.failures == 0


def test_retries_exhausted_raise_with_last_error():
    with ChatCompletionsServer(lambda body: Fault(502)) as server:
        (result,), client = _run(_config(server, max_retries=2), [(None, MESSAGES)])
    assert isinstance(result, ChatRequestError) and "502" in str(result)
    assert len(server.requests) == 3 and client.usage.failures == 1


def test_client_errors_are_not_retried():
    with ChatCompletionsServer(lambda body: Fault(401)) as server:
        (result,), client = _run(_config(server), [(None, MESSAGES)])
    assert isinstance(result, ChatRequestError) and "401" in str(result)
    assert len(server.requests) == 1


def test_request_budget_stops_sending():
    with ChatCompletionsServer(_scripted([Fault(500)])) as server:
        cfg = _config(server, max_requests=3, concurrency=1)
        calls = [(f"k{i}", [{"role": "user", "content": f"q{i}"}]) for i in range(3)]
        results, client = _run(cfg, calls)
    # 3 requests: one 500 + its retry for the first call, one success for the second; the third is refused.
    assert len(server.requests) == 3
    assert [isinstance(r, BudgetExhausted) for r in results] == [False, False, True]


def test_cache_answers_a_rerun_without_requests(tmp_path):
    with ChatCompletionsServer(lambda body: "reply to " + user_text(body)) as server:
        cfg = _config(server, cache_path=str(tmp_path / "cache.sqlite"))
        calls = [("a", [{"role": "user", "content": "one"}]), ("b", [{"role": "user", "content": "two"}])]
        first, _ = _run(cfg, calls)
        second, client = _run(cfg, calls)
    assert len(server.requests) == 2
    assert [r.text for r in second] == [r.text for r in first] == ["reply to one", "reply to two"]
    assert all(r.cached for r in second) and client.usage.cache_hits == 2 and client.usage.requests_sent == 0


def test_concurrency_is_bounded():
    in_flight, peak, lock = [0], [0], threading.Lock()

    def respond(body):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        return "ok"

    with ChatCompletionsServer(respond) as server:
        results, _ = _run(_config(server, concurrency=2), [(None, MESSAGES)] * 6)
    assert [r.text for r in results] == ["ok"] * 6
    assert peak[0] == 2


def test_endpoint_and_key_from_environment(monkeypatch):
    with ChatCompletionsServer(lambda body: "from env") as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
        (result,), _ = _run(ChatClientConfig(model="m"), [(None, MESSAGES)])
    assert result.text == "from env" and server.auth_headers == ["Bearer sk-env"]


def test_official_openai_package_speaks_to_the_same_server():
    """The test server is a faithful chat-completions endpoint: the official client parses its replies."""
    openai = pytest.importorskip("openai")
    with ChatCompletionsServer(_scripted([Fault(429, retry_after="0")], reply="official ok")) as server:
        client = openai.OpenAI(base_url=server.url, api_key="sk-test", max_retries=2)
        out = client.chat.completions.create(model="m", messages=MESSAGES)
    assert out.choices[0].message.content == "official ok"
    assert out.usage.completion_tokens == 2
    assert len(server.requests) == 2  # the 429 was retried by the official client too
