"""A client for any OpenAI-compatible ``/v1/chat/completions`` endpoint, made for judging.

Concurrent requests (a thread pool over one ``httpx.Client``), retries with exponential
backoff on 429, 5xx, timeouts and connection errors (a ``Retry-After`` header in seconds is
honoured when longer), and an on-disk cache keyed by (endpoint URL or its ``cache_scope``, model, messages,
temperature, max tokens), so a re-run asks only what it has not asked before. A request that still fails
comes back as a :class:`Reply` with its error, never as an exception: the caller counts it.

A *continuation* (``ask(..., continuation=True)``) asks the endpoint to go on writing the last
message, the assistant's reply begun by the caller: vLLM's and fedtune serve's
``continue_final_message`` (with ``add_generation_prompt: false``). The judge uses it to ask a
judge that forgot the verdict's format for just the verdict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fedtune.io import write_text_atomic

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Endpoint:
    """Where and how to ask: ``base_url`` ends before ``/chat/completions`` (e.g. ``http://host:8000/v1``)."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0  # seconds per request
    retries: int = 4  # after the first try: 429 / 5xx / timeout / connection error
    backoff: float = 1.0  # seconds before the first retry, doubled for each next one
    temperature: float = 0.0
    max_tokens: int = 1024
    # What names this judge in the cache key instead of its URL: for a judge served on a port
    # that changes from run to run (a loopback ``fedtune serve``), say the model and its settings.
    cache_scope: str | None = None

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


@dataclass(frozen=True)
class Reply:
    """The judge's text (``content``) or why there is none (``error``)."""

    content: str | None
    error: str | None = None
    cached: bool = False
    attempts: int = 0


class ReplyCache:
    """Answers on disk, one JSON file per key (written atomically, so threads may share it)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()

    @staticmethod
    def key(endpoint: Endpoint, messages: Messages, max_tokens: int | None = None) -> str:
        """The cache key; ``max_tokens``: a request's own limit instead of the endpoint's."""
        blob = json.dumps(
            [
                endpoint.cache_scope or endpoint.url,
                endpoint.model,
                messages,
                endpoint.temperature,
                max_tokens or endpoint.max_tokens,
            ],
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> str | None:
        path = self.folder / f"{key}.json"
        try:
            content = json.loads(path.read_text(encoding="utf-8"))["content"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None
        return content if isinstance(content, str) else None

    def put(self, key: str, content: str) -> None:
        write_text_atomic(self.folder / f"{key}.json", json.dumps({"content": content}, ensure_ascii=False))


def _content(body: Any) -> str | None:
    """``choices[0].message.content`` of a chat completion, or None when the body has no such text."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "0")))
    except ValueError:  # an HTTP date: fall back to the backoff
        return 0.0


class JudgeClient:
    """Ask an endpoint many prompts at once; see the module docstring for the rules."""

    def __init__(
        self,
        endpoint: Endpoint,
        cache: ReplyCache | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.endpoint = endpoint
        self.cache = cache
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        self._http = httpx.Client(timeout=endpoint.timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, body: dict[str, Any]) -> tuple[str | None, str | None, bool, float]:
        """One try: (content, error, retryable, server's Retry-After)."""
        ep = self.endpoint
        try:
            r = self._http.post(ep.url, json=body)
        except httpx.TimeoutException:
            return None, f"timed out after {ep.timeout:g} s", True, 0.0
        except httpx.TransportError as err:
            return None, f"cannot reach {ep.url}: {err}", True, 0.0
        if r.status_code == 200:
            try:
                content = _content(r.json())
            except ValueError:
                content = None
            if content is None:
                return None, f"HTTP 200 without choices[0].message.content: {r.text[:200]}", False, 0.0
            return content, None, False, 0.0
        error = f"HTTP {r.status_code}: {r.text[:200]}"
        return None, error, r.status_code == 429 or r.status_code >= 500, _retry_after(r)

    def _body(self, messages: Messages, max_tokens: int | None, continuation: bool) -> dict[str, Any]:
        ep = self.endpoint
        body: dict[str, Any] = {
            "model": ep.model,
            "messages": messages,
            "temperature": ep.temperature,
            "max_tokens": max_tokens or ep.max_tokens,
        }
        if continuation:
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        return body

    def ask(self, messages: Messages, *, max_tokens: int | None = None, continuation: bool = False) -> Reply:
        """One prompt: from the cache, or asked with retries; the error of the last try if all fail.

        ``max_tokens``: this request's limit (default: the endpoint's); ``continuation``: the
        last message is the assistant's reply begun, to be continued (module docstring).
        """
        if continuation and messages[-1]["role"] != "assistant":
            raise ValueError("a continuation needs the assistant's begun reply as the last message")
        key = ReplyCache.key(self.endpoint, messages, max_tokens) if self.cache is not None else ""
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return Reply(hit, cached=True)
        body, error = self._body(messages, max_tokens, continuation), None
        for attempt in range(self.endpoint.retries + 1):
            content, error, retryable, wait = self._post(body)
            if content is not None:
                if self.cache is not None:
                    self.cache.put(key, content)
                return Reply(content, attempts=attempt + 1)
            if not retryable or attempt == self.endpoint.retries:
                return Reply(None, error, attempts=attempt + 1)
            delay = max(self.endpoint.backoff * 2**attempt, wait)
            log.debug("judge: %s; retrying in %.2f s", error, delay)
            self._sleep(delay)
        return Reply(None, error, attempts=self.endpoint.retries + 1)

    def ask_many(
        self,
        prompts: Sequence[Messages],
        concurrency: int = 4,
        *,
        max_tokens: int | None = None,
        continuation: bool = False,
    ) -> list[Reply]:
        """Every prompt's reply, in order, ``concurrency`` requests in flight at most."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")

        def one(messages: Messages) -> Reply:
            return self.ask(messages, max_tokens=max_tokens, continuation=continuation)

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, prompts))
