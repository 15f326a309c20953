"""A small real HTTP server speaking the OpenAI chat-completions protocol, for tests of the teacher and judge.

It listens on 127.0.0.1 on a free port in a background thread and answers `POST /v1/chat/completions` with
whatever the test's `responder(body)` returns: a canned reply text, or a `Fault` (an HTTP error status with
optional `Retry-After`, a stall longer than the client's timeout, a 200 whose body is not JSON, a dropped
connection). Every request body is recorded so tests can count calls and prove a resumed run repeats none.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Fault:
    """How to misbehave on one request instead of answering."""

    status: int = 500
    """HTTP status to return (429, 500, 503, ...), used when `kind` is 'status'."""
    kind: str = "status"
    """'status' (error status), 'stall' (sleep `stall_s` then answer 500), 'not_json' (200 with junk body),
    'no_choices' (200 JSON without `choices`), 'drop' (close the connection without a response)."""
    retry_after: str | None = None
    """Value of the `Retry-After` header to send with a status fault."""
    stall_s: float = 2.0
    """How long a 'stall' sleeps before answering."""


Responder = Callable[[dict[str, Any]], "str | Fault"]


class ChatCompletionsServer:
    """Run `responder` behind a chat-completions endpoint; `url` is the base URL a client should use."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.auth_headers: list[str | None] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "no such route"}}')
                    return
                with server._lock:
                    server.requests.append(body)
                    server.auth_headers.append(self.headers.get("Authorization"))
                outcome = server.responder(body)
                if isinstance(outcome, Fault):
                    self._fault(outcome)
                else:
                    self._send(200, json.dumps(_completion(body, outcome)).encode())

            def _fault(self, fault: Fault) -> None:
                if fault.kind == "stall":
                    time.sleep(fault.stall_s)
                    self._send(500, b'{"error": {"message": "stalled"}}')
                elif fault.kind == "not_json":
                    self._send(200, b"<html>gateway hiccup</html>")
                elif fault.kind == "no_choices":
                    self._send(200, b'{"id": "x", "object": "chat.completion"}')
                elif fault.kind == "drop":
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.close()
                else:
                    headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                    self._send(fault.status, b'{"error": {"message": "injected fault"}}', headers)

            def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test); nothing to do

        ThreadingHTTPServer.request_queue_size = 128  # the default backlog of 5 stalls bursts of connects
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> ChatCompletionsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _completion(body: dict[str, Any], text: str) -> dict[str, Any]:
    """A chat.completion object as OpenAI returns it, with whitespace-token usage counts."""
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "test-model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(text.split()),
            "total_tokens": prompt_tokens + len(text.split()),
        },
    }


def user_text(body: dict[str, Any]) -> str:
    """The last user message of a request: what the responder usually keys its canned reply on."""
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
