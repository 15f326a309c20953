"""One asynchronous client for any OpenAI-compatible chat-completions endpoint.

Both paid uses of a language model in the project go through here: the teacher that writes instruction data
(`llava_lit.teacher`) and the LLaVA-Bench judge (`llava_lit.eval.llava_bench`). They need the same things:
bounded concurrency, retries with exponential backoff and jitter on rate limits, server errors, timeouts and
dropped connections (honouring `Retry-After`), a hard request budget, token and cost accounting, and a
persistent cache keyed by a caller-given key so that a re-run never repeats a call that was already paid for.

The endpoint may be OpenAI, vLLM, llama.cpp's server or anything else that speaks `POST {base_url}/chat/
completions`. It is built on `httpx` directly so the retry and budget rules are ours, not a hidden default.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 522, 524})
"""Rate limits, server errors and gateway timeouts: the request may succeed when tried again."""


@dataclass
class ChatClientConfig:
    """Where to send chat requests and how hard to try."""

    base_url: str | None = None
    """Endpoint root ending in `/v1`; None reads `OPENAI_BASE_URL`, then falls back to OpenAI's."""
    model: str = "gpt-4o-mini"
    """Model name sent with every request (for vLLM: the served model name)."""
    api_key: str | None = None
    """Bearer key; None reads `OPENAI_API_KEY` (local servers usually accept any value or none)."""
    temperature: float = 0.2
    """Sampling temperature sent with every request unless the caller overrides it."""
    max_tokens: int = 1024
    """Upper bound on tokens generated per reply."""
    concurrency: int = 8
    """Requests in flight at once."""
    max_retries: int = 6
    """Extra attempts after the first one for retryable failures (429, 5xx, timeouts, connection errors)."""
    backoff_base_s: float = 1.0
    """First backoff delay; doubles per attempt, with full jitter."""
    backoff_max_s: float = 60.0
    """Cap on a single backoff delay (a server's `Retry-After` is honoured up to this cap too)."""
    timeout_s: float = 120.0
    """Per-request timeout (connect + read)."""
    max_requests: int | None = None
    """Hard cap on HTTP requests sent by this client (retries included); None = unlimited. Cache hits are free."""
    price_input_per_million: float = 0.0
    """Price in your currency per million prompt tokens, for the cost estimate."""
    price_output_per_million: float = 0.0
    """Price per million completion tokens, for the cost estimate."""
    cache_path: str | None = None
    """SQLite file holding every successful reply by key; None disables caching."""

    def resolved_base_url(self) -> str:
        return (self.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")

    def resolved_api_key(self) -> str | None:
        return self.api_key if self.api_key is not None else os.environ.get("OPENAI_API_KEY")


@dataclass
class ChatResult:
    """One reply: its text, its token counts, and whether it came from the cache (and so cost nothing now)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    finish_reason: str | None = None


@dataclass
class UsageTotals:
    """What a client has spent so far; `summary()` is what runs print and save."""

    requests_sent: int = 0
    """HTTP requests sent, retries included."""
    successes: int = 0
    """Requests that returned a usable reply."""
    retries: int = 0
    """Requests sent again after a retryable failure."""
    failures: int = 0
    """Calls given up on (retries exhausted or a non-retryable error)."""
    cache_hits: int = 0
    """Calls answered from the cache without a request."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    """Estimated cost from the configured prices, for requests sent by this run only."""
    errors: dict[str, int] = field(default_factory=dict)
    """Count of each failure kind seen ('429', '500', 'timeout', 'connection', 'malformed', ...)."""

    def summary(self) -> dict[str, Any]:
        return {
            "requests_sent": self.requests_sent,
            "successes": self.successes,
            "retries": self.retries,
            "failures": self.failures,
            "cache_hits": self.cache_hits,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": round(self.cost, 6),
            "errors": dict(sorted(self.errors.items())),
        }


class ChatRequestError(RuntimeError):
    """A call that failed for good: retries exhausted, or an error that retrying cannot fix (400, 401, 404)."""


class BudgetExhausted(ChatRequestError):
    """The configured `max_requests` is spent; nothing more will be sent by this client."""


class _Retryable(Exception):
    """Internal: one attempt failed in a way worth retrying, after `delay_hint` seconds if the server said so."""

    def __init__(self, kind: str, message: str, delay_hint: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.delay_hint = delay_hint


class ResponseCache:
    """Successful replies on disk, keyed by the caller's key, so a stopped run resumes without paying twice.

    SQLite rather than JSONL because writes from many concurrent calls must be atomic and a crash mid-write
    must not corrupt earlier entries; every `put` is committed at once.
    """

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT, text TEXT, "
            "prompt_tokens INTEGER, completion_tokens INTEGER, finish_reason TEXT, created REAL)"
        )
        self._db.commit()

    def get(self, key: str) -> ChatResult | None:
        row = self._db.execute(
            "SELECT text, prompt_tokens, completion_tokens, finish_reason FROM replies WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        return ChatResult(
            text=row[0], prompt_tokens=row[1], completion_tokens=row[2], cached=True, finish_reason=row[3]
        )

    def put(self, key: str, model: str, result: ChatResult) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                model,
                result.text,
                result.prompt_tokens,
                result.completion_tokens,
                result.finish_reason,
                time.time(),
            ),
        )
        self._db.commit()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, `Retry-After` in seconds, or an HTTP date."""
    if "retry-after-ms" in headers:
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        log.warning("ignoring unreadable Retry-After header %r", value)
        return None


class ChatClient:
    """Async chat-completions client with concurrency limit, retries, request budget, accounting and cache.

    Use it as an async context manager:

        async with ChatClient(config) as client:
            result = await client.complete("my-key", [{"role": "user", "content": "hi"}])
    """

    def __init__(self, config: ChatClientConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.usage = UsageTotals()
        self.cache = ResponseCache(config.cache_path) if config.cache_path else None
        self._semaphore = asyncio.Semaphore(max(1, config.concurrency))
        self._budget_lock = asyncio.Lock()
        headers = {"Content-Type": "application/json"}
        key = config.resolved_api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.AsyncClient(
            base_url=config.resolved_base_url(),
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s),
            transport=transport,
        )

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        if self.cache is not None:
            self.cache.close()

    async def complete(self, key: str | None, messages: list[dict[str, str]], **overrides: Any) -> ChatResult:
        """The reply to `messages`: from the cache under `key` if present, else from the endpoint (then cached).

        `overrides` replace request fields (`temperature`, `max_tokens`, ...). Raises `BudgetExhausted` once
        `max_requests` is spent and `ChatRequestError` when retries run out or the error is not retryable.
        """
        if key is not None and self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.usage.cache_hits += 1
                return hit
        body = {
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
            **overrides,
        }
        async with self._semaphore:
            result = await self._send_with_retries(body)
        if key is not None and self.cache is not None:
            self.cache.put(key, self.config.model, result)
        return result

    async def _send_with_retries(self, body: dict[str, Any]) -> ChatResult:
        last: _Retryable | None = None
        for attempt in range(self.config.max_retries + 1):
            await self._spend_one_request()
            if attempt > 0:
                self.usage.retries += 1
            try:
                return self._account(await self._send_once(body))
            except _Retryable as err:
                last = err
                self.usage.errors[err.kind] = self.usage.errors.get(err.kind, 0) + 1
                if attempt == self.config.max_retries:
                    break
                delay = self._backoff(attempt, err.delay_hint)
                log.warning(
                    "chat request failed (%s: %s); retry %d in %.2fs", err.kind, err, attempt + 1, delay
                )
                await asyncio.sleep(delay)
            except ChatRequestError:
                self.usage.failures += 1
                raise
        self.usage.failures += 1
        raise ChatRequestError(
            f"gave up after {self.config.max_retries + 1} attempts; last error {last.kind}: {last}"
        )

    async def _spend_one_request(self) -> None:
        async with self._budget_lock:
            cap = self.config.max_requests
            if cap is not None and self.usage.requests_sent >= cap:
                raise BudgetExhausted(f"request budget of {cap} spent")
            self.usage.requests_sent += 1

    def _backoff(self, attempt: int, hint: float | None) -> float:
        if hint is not None:
            return min(hint, self.config.backoff_max_s)
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * (2**attempt))
        # Full jitter: many clients rate-limited together must not come back in lock-step.
        return random.uniform(0.5 * ceiling, ceiling)

    async def _send_once(self, body: dict[str, Any]) -> ChatResult:
        try:
            response = await self._http.post("/chat/completions", json=body)
        except httpx.TimeoutException as err:
            raise _Retryable("timeout", repr(err)) from err
        except httpx.TransportError as err:
            raise _Retryable("connection", repr(err)) from err
        if response.status_code in RETRYABLE_STATUS:
            raise _Retryable(
                str(response.status_code), response.text[:200], parse_retry_after(response.headers)
            )
        if response.status_code != 200:
            raise ChatRequestError(f"HTTP {response.status_code} from {response.url}: {response.text[:500]}")
        try:
            payload = response.json()
            choice = payload["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"message content is {type(text).__name__}, not str")
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
            # A 200 with a body that is not a chat completion is a broken proxy or server hiccup: retry it.
            raise _Retryable(
                "malformed", f"{type(err).__name__}: {err}; body {response.text[:200]!r}"
            ) from err
        usage = payload.get("usage") or {}
        return ChatResult(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached=False,
            finish_reason=choice.get("finish_reason"),
        )

    def _account(self, result: ChatResult) -> ChatResult:
        u = self.usage
        u.successes += 1
        u.prompt_tokens += result.prompt_tokens
        u.completion_tokens += result.completion_tokens
        u.cost += (
            result.prompt_tokens * self.config.price_input_per_million
            + result.completion_tokens * self.config.price_output_per_million
        ) / 1e6
        return result
