"""The FastAPI app: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/health``.

Handlers only parse, check and wait: the prompt goes to the :class:`Engine`'s worker thread, and
its tokens come back through an asyncio queue, so the event loop keeps serving while a model
generates. ``stream: true`` answers as OpenAI does, server-sent events of ``chunk`` objects
ending ``data: [DONE]``; a stream starts once its first token is there, so that a request that
fails before it (e.g. a split run's trunk service down) gets an HTTP error status, streamed or
not. Every error is OpenAI's JSON error shape with a 4xx status (5xx only for a failure inside
generation: 500, or 503 / 502 when a split run's trunk service is unreachable / fails), and the
server goes on serving. A split run's requests go to its own :class:`~fedtune.serve.split.SplitModel`
instead of the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedtune.data.tokenize import build_generation_input, encode
from fedtune.data.types import Conversation, message
from fedtune.errors import FedtuneError
from fedtune.serve.api import ApiError, ChatRequest, CompletionRequest, Limits, max_tokens, parse
from fedtune.serve.engine import Engine, Event, GenRequest
from fedtune.serve.models import Served


def create_app(engine: Engine, limits: Limits | None = None) -> FastAPI:
    """The server over ``engine`` (its catalogue names the models); closing the app closes it."""
    limits = limits or Limits()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()
        engine.catalogue.close()  # split runs' threads and the trunk services started for them

    app = FastAPI(title="fedtune serve", lifespan=lifespan)
    app.state.engine, app.state.limits = engine, limits

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return JSONResponse(ApiError(err.status_code, str(err.detail), code=code).body(), err.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(engine.catalogue.served)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "fedtune"} for m in engine.catalogue.served
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        body: ChatRequest = parse(await _body(request, limits), ChatRequest)
        served = _served(engine, body.model)
        history: Conversation = [message(m.role, m.text()) for m in body.messages]
        if body.continue_final_message and history[-1]["role"] != "assistant":
            raise ApiError(
                400,
                "continue_final_message: the last message must be the assistant's reply to continue",
                param="continue_final_message",
            )
        ids = await asyncio.to_thread(_chat_ids, engine, served, history, _prompt_limit(served, limits))
        gen = _request(served, ids, body.max_completion_tokens or body.max_tokens, body, limits)
        return await _answer(engine, gen, body.stream, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body: CompletionRequest = parse(await _body(request, limits), CompletionRequest)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: give one prompt per request", param="prompt")
        served = _served(engine, body.model)
        limit = _prompt_limit(served, limits)
        ids = await asyncio.to_thread(_completion_ids, engine, served, prompts[0], limit)
        gen = _request(served, ids, body.max_tokens, body, limits)
        return await _answer(engine, gen, body.stream, chat=False)

    return app


async def _body(request: Request, limits: Limits) -> bytes:
    """The raw body, refused with a 413 past ``limits.max_body_bytes`` (declared or streamed)."""
    too_big = ApiError(413, f"the request body is over {limits.max_body_bytes} bytes", code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _prompt_limit(served: Served, limits: Limits) -> int:
    """The prompt tokens kept: the server's ``--max-prompt-tokens``, else the run's own limit."""
    return limits.max_prompt_tokens or served.max_source_length


def _chat_ids(engine: Engine, served: Served, history: Conversation, limit: int) -> list[int]:
    """The prompt ids of a chat (with a RAG run's evidence), off the event loop, one at a time.

    A history ending with an assistant message (``continue_final_message``) is the prompt of
    the turns before it followed by that message's text, which the model goes on writing.
    """
    catalogue = engine.catalogue
    begun = history[-1]["content"] if history[-1]["role"] == "assistant" else None
    turns = history[:-1] if begun is not None else history
    with catalogue.prompt_lock:  # the tokenizer and the retrievers are not shared between threads
        if served.retrieval is not None and turns and turns[-1]["role"] == "user":
            turns = served.retrieval.augment(turns)[0]
        try:
            ids = build_generation_input(turns, catalogue.tokenizer, served.template, limit)
        except FedtuneError as err:
            raise ApiError(400, str(err), param="messages") from None
        if begun is not None:
            ids = (ids + encode(catalogue.tokenizer, begun))[-limit:]
    return ids


def _completion_ids(engine: Engine, served: Served, prompt: str, limit: int) -> list[int]:
    """A raw prompt's ids, cut from the left to ``limit``."""
    with engine.catalogue.prompt_lock:
        ids = encode(engine.catalogue.tokenizer, prompt)
    return ids[-limit:]


def _served(engine: Engine, model_id: str) -> Served:
    served = engine.catalogue.get(model_id)
    if served is None:
        known = ", ".join(sorted(engine.catalogue.served))
        raise ApiError(
            404,
            f"model {model_id!r} is not served here (served: {known})",
            param="model",
            code="model_not_found",
        )
    return served


def _request(served: Served, ids: list[int], asked: int | None, body: Any, limits: Limits) -> GenRequest:
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    temperature = body.temperature or 0.0
    top_p = body.top_p if body.top_p is not None else 1.0
    return GenRequest(served, ids, max_tokens(asked, limits), lambda _: None, temperature, top_p)


async def _events(engine: Engine, gen: GenRequest) -> AsyncGenerator[Event]:
    """Submit ``gen`` and yield its events as the worker thread produces them."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    gen.emit = emit
    (gen.served.split or engine).submit(gen)
    try:
        while True:
            event = await queue.get()
            yield event
            if event.kind != "text":
                return
    finally:
        gen.cancelled.set()  # a client that went away stops its row at the next step


def _shape(chat: bool, text: str, finish: str | None, *, delta: bool, first: bool = False) -> dict[str, Any]:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    message = {"role": "assistant", "content": text} if first or not delta else {"content": text}
    if delta and finish is not None:
        message = {}
    return {"index": 0, ("delta" if delta else "message"): message, "finish_reason": finish}


def _error(event: Event) -> ApiError:
    return ApiError(event.status, event.text, type_="server_error", code=event.code)


async def _answer(
    engine: Engine, gen: GenRequest, stream: bool, *, chat: bool
) -> JSONResponse | StreamingResponse:
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": gen.served.id,
    }
    events = _events(engine, gen)
    if stream:
        first = await anext(events)  # a failure before the first token answers with its status
        if first.kind == "error":
            await events.aclose()
            raise _error(first)
        return StreamingResponse(_sse(_resumed(first, events), head, chat), media_type="text/event-stream")
    parts, done = [], Event("done")
    async with contextlib.aclosing(events):
        async for event in events:
            if event.kind == "error":
                raise _error(event)
            parts.append(event.text) if event.kind == "text" else None
            done = event
    usage = {
        "prompt_tokens": len(gen.ids),
        "completion_tokens": done.completion_tokens,
        "total_tokens": len(gen.ids) + done.completion_tokens,
    }
    choice = _shape(chat, "".join(parts), done.finish_reason, delta=False)
    kind = "chat.completion" if chat else "text_completion"
    return JSONResponse({**head, "object": kind, "choices": [choice], "usage": usage})


async def _resumed(first: Event, rest: AsyncGenerator[Event]) -> AsyncGenerator[Event]:
    """``first`` (already taken from ``rest``), then the rest; closing this closes ``rest``."""
    try:
        yield first
        if first.kind == "text":
            async for event in rest:
                yield event
    finally:
        await rest.aclose()  # a stream that ends early (client gone) stops its request now


async def _sse(events: AsyncGenerator[Event], head: dict[str, Any], chat: bool) -> AsyncGenerator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    first = True
    # aclosing: a client that hangs up closes this generator, and with it at once ``events``,
    # whose ``finally`` cancels the request (not whenever the garbage collector gets to it)
    async with contextlib.aclosing(events):
        async for event in events:
            if event.kind == "error":
                yield f"data: {json.dumps(_error(event).body())}\n\n"
                break
            finish = event.finish_reason if event.kind == "done" else None
            choice = _shape(chat, event.text, finish, delta=True, first=first)
            first = False
            yield f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"
    yield "data: [DONE]\n\n"
