"""`python -m llava_lit.serve`: an OpenAI-compatible HTTP endpoint for a trained model (FastAPI + uvicorn).

    python -m llava_lit.serve checkpoint=outputs/world/finetune/checkpoints/last.ckpt port=8000

`GET /v1/models` and `POST /v1/chat/completions` (streamed as server-sent events or not), so the official
`openai` client and anything built on it work unchanged. Images come as `image_url` parts holding data URIs;
local paths (`file://...`) only with `allow_local_images=true`; nothing is fetched from the network. Requests
that arrive together with the same sampling settings are answered in one batch. Bad requests get a 4xx with an
OpenAI-style error body (a `max_tokens` below 1, or text that writes `<image>` without sending one, among them).
The server binds 127.0.0.1 unless told otherwise and logs to `outputs/serve/<date_time>/serve.log`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field

from llava_lit.constants import IMAGE_TOKEN
from llava_lit.hydra_app import hydra_app
from llava_lit.images import ImageDecodeError
from llava_lit.inference import (
    Completion,
    InferenceBundle,
    Prompt,
    PromptError,
    SamplingParams,
    load_for_inference,
)
from llava_lit.load_settings import LoadSettings

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ServeConfig(LoadSettings):
    """Settings of the server (the keys of `conf/serve.yaml`; the load settings from `LoadSettings`)."""

    checkpoint: str
    """What `checkpoint_reader.read_checkpoint` reads: a `.ckpt` file, an FSDP2 checkpoint directory, an
    exported, llava-hf or official LLaVA folder, or a hub id."""
    host: str = "127.0.0.1"
    """Interface to bind; the default keeps the server local. `0.0.0.0` exposes it to the network."""
    port: int = 8000
    """TCP port."""
    model_id: str | None = None
    """The model name clients must send; default `run_name/stage` from the checkpoint's config."""
    allow_local_images: bool = False
    """Accept `file://` image URLs and plain paths (reads files the server can see: only for trusted clients)."""
    max_batch_size: int = 8
    """Most non-streamed requests answered in one generation batch."""
    batch_wait_ms: float = 10.0
    """How long the first waiting request waits for others to join its batch."""
    default_max_tokens: int = 256
    """Answer length limit when a request gives none."""
    device: str = "auto"
    """`cpu`, `cuda`, or `auto` (CUDA when available)."""


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class ChatMessage(BaseModel):
    """One message of a chat request."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`."""

    include_usage: bool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat-completion request this server honours (unknown fields are ignored)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = 0.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    seed: int | None = None


def read_image_url(url: str, *, allow_local: bool) -> bytes:
    """Image bytes from a data URI, or from a local file when allowed; anything else raises `ApiError`."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise ApiError(
                400, "image data URIs must be base64: data:image/<type>;base64,<data>", code="invalid_image"
            )
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ApiError(400, f"image data URI is not valid base64: {err}", code="invalid_image") from err
    if url.startswith(("http://", "https://")):
        raise ApiError(
            400,
            "remote image URLs are not fetched; send the image as a base64 data URI",
            code="invalid_image",
        )
    if not allow_local:
        raise ApiError(
            400,
            "local image paths are disabled on this server (start it with allow_local_images=true)",
            code="invalid_image",
        )
    path = Path(url.removeprefix("file://"))
    try:
        return path.read_bytes()
    except OSError as err:
        raise ApiError(400, f"cannot read image file {path}: {err.strerror}", code="invalid_image") from err


def request_prompt(request: ChatRequest, bundle: InferenceBundle, *, allow_local_images: bool) -> Prompt:
    """The `Prompt` for a chat request: messages -> template turns, `image_url` parts -> images in order."""
    turns: list[dict[str, str]] = []
    images: list[torch.Tensor] = []
    for i, message in enumerate(request.messages):
        if message.role == "system":
            raise ApiError(
                400,
                "system messages are not supported: the model answers with the system prompt of the chat "
                f"template it was trained with ({bundle.template.name})",
                code="unsupported_message",
                param=f"messages.{i}",
            )
        content = message.content
        if content is None:
            raise ApiError(
                400, f"message {i} has no content", code="invalid_message", param=f"messages.{i}.content"
            )
        if isinstance(content, str):
            _check_no_image_marker(content, message.role, f"messages.{i}.content")
            turns.append({"role": message.role, "content": content})
            continue
        texts = []
        has_image = any(isinstance(p, dict) and p.get("type") == "image_url" for p in content)
        for j, part in enumerate(content):
            kind = part.get("type")
            param = f"messages.{i}.content.{j}"
            if kind == "text" and isinstance(part.get("text"), str):
                if not has_image:
                    _check_no_image_marker(part["text"], message.role, param)
                texts.append(part["text"].replace(IMAGE_TOKEN, ""))  # image_url parts place the images
            elif kind == "image_url" and message.role == "user":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str):
                    raise ApiError(
                        400, "image_url part needs image_url.url", code="invalid_image", param=param
                    )
                data = read_image_url(url, allow_local=allow_local_images)
                try:
                    images.append(bundle.image_loader(data))
                except ImageDecodeError as err:
                    raise ApiError(400, f"malformed image: {err}", code="invalid_image", param=param) from err
                texts.append(IMAGE_TOKEN)
            else:
                raise ApiError(
                    400,
                    f"unsupported content part {kind!r} in a {message.role} message",
                    code="invalid_message",
                    param=param,
                )
        turns.append({"role": message.role, "content": "\n".join(texts)})
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(
            400, "the last message must be from the user", code="invalid_message", param="messages"
        )
    try:
        return bundle.prompt(turns, images)
    except PromptError as err:
        raise ApiError(400, str(err), code="invalid_message", param="messages") from err


def _check_no_image_marker(text: str, role: str, param: str) -> None:
    """Refuse a message that writes `<image>` but carries no image: the question is about an image the model
    would never see, and it would answer anyway."""
    if IMAGE_TOKEN in text:
        raise ApiError(
            400,
            f"a {role} message contains {IMAGE_TOKEN} but no image: send the image as an image_url part "
            "(a base64 data URI); its position in the message places it",
            code="invalid_message",
            param=param,
        )


@dataclass
class _Job:
    prompt: Prompt
    params: SamplingParams
    future: asyncio.Future


class Batcher:
    """Collects non-streamed requests for up to `wait_s` and answers those with equal settings in one batch."""

    def __init__(
        self, bundle: InferenceBundle, lock: threading.Lock, *, max_batch_size: int, wait_s: float
    ) -> None:
        self.generator = bundle.generator()
        self.lock = lock
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.batch_sizes: list[int] = []  # sizes of the batches run so far (observability and tests)

    async def submit(self, prompt: Prompt, params: SamplingParams) -> Completion:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(prompt, params, future))
        return await future

    async def run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(jobs) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            groups: dict[str, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(repr(job.params), []).append(job)
            for group in groups.values():
                self.batch_sizes.append(len(group))
                try:
                    results = await asyncio.to_thread(self._generate, group)
                except Exception as err:  # a failed batch fails its requests, not the server
                    log.exception("generation failed")
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(err)
                    continue
                for job, result in zip(group, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(result)

    def _generate(self, jobs: list[_Job]) -> list[Completion]:
        with self.lock:
            return self.generator.generate([j.prompt for j in jobs], jobs[0].params)


def create_app(bundle: InferenceBundle, cfg: ServeConfig) -> FastAPI:
    """The FastAPI application serving `bundle` under its `model_id`."""
    lock = threading.Lock()  # one generation on the model at a time (batches and streams alike)
    batcher = Batcher(bundle, lock, max_batch_size=cfg.max_batch_size, wait_s=cfg.batch_wait_ms / 1000)
    generator = bundle.generator()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="llava_lit", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return ApiError(
            400,
            f"invalid request: {where}: {first.get('msg', 'malformed')}",
            code="invalid_request",
            param=where or None,
        ).response()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": bundle.model_id, "object": "model", "created": created, "owned_by": "llava_lit"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest) -> Any:
        if request.model != bundle.model_id:
            raise ApiError(
                404,
                f"the model {request.model!r} does not exist; this server serves {bundle.model_id!r}",
                code="model_not_found",
                param="model",
            )
        if request.n != 1:
            raise ApiError(400, "only n=1 is supported", code="invalid_request", param="n")
        given = (request.max_completion_tokens, request.max_tokens)
        max_tokens = next((n for n in given if n is not None), cfg.default_max_tokens)
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        try:
            params = SamplingParams(
                max_new_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=stop,
                seed=request.seed,
            )
        except ValueError as err:
            raise ApiError(400, str(err), code="invalid_request") from err
        prompt = await asyncio.to_thread(
            request_prompt, request, bundle, allow_local_images=cfg.allow_local_images
        )
        try:
            generator.check_length(prompt, max_tokens)
        except ValueError as err:
            raise ApiError(400, str(err), code="context_length_exceeded", param="messages") from err
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(
                _sse(bundle, generator, lock, prompt, params, completion_id, include_usage),
                media_type="text/event-stream",
            )
        completion = await batcher.submit(prompt, params)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": bundle.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": _usage(completion),
        }

    return app


def _usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


async def _sse(bundle, generator, lock, prompt, params, completion_id, include_usage) -> AsyncIterator[str]:
    """Server-sent events of `chat.completion.chunk` objects, fed from the decoding thread as tokens arrive."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def work() -> None:
        try:
            with lock:
                for delta in generator.stream(prompt, params):
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
        except Exception as err:  # reported to the client as the stream's last event
            loop.call_soon_threadsafe(queue.put_nowait, err)
        loop.call_soon_threadsafe(queue.put_nowait, done)

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": bundle.model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    threading.Thread(target=work, daemon=True).start()
    yield chunk({"role": "assistant", "content": ""})
    while (item := await queue.get()) is not done:
        if isinstance(item, Exception):
            log.error("generation failed: %s", item)
            yield f"data: {json.dumps({'error': {'message': str(item), 'type': 'server_error'}})}\n\n"
            continue
        if item.text:
            yield chunk({"content": item.text})
        if item.completion is not None:
            yield chunk({}, finish=item.completion.finish_reason)
            if include_usage:
                body = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": bundle.model_id,
                    "choices": [],
                    "usage": _usage(item.completion),
                }
                yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def run(cfg: ServeConfig) -> None:
    """Load the model and serve it until interrupted."""
    bundle = load_for_inference(cfg.checkpoint, cfg.load_settings(), device=cfg.device, model_id=cfg.model_id)
    log.info("serving %s on http://%s:%d/v1", bundle.model_id, cfg.host, cfg.port)
    uvicorn.run(create_app(bundle, cfg), host=cfg.host, port=cfg.port, log_level="info")


@hydra_app("serve", schemas={"": ServeConfig})
def main(cfg: DictConfig) -> None:
    run(ServeConfig(**OmegaConf.to_container(cfg, resolve=True)))


if __name__ == "__main__":
    main()
