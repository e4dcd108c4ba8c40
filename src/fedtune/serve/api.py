"""The OpenAI request bodies fedtune serve reads, its limits, and OpenAI's error shape.

Fields a client may send that fedtune does not use (``user``, ``presence_penalty``, ...) are
ignored, as OpenAI-compatible servers do; ones that would change the answer and are not
supported (``n`` > 1, ``stop``) are refused with a 400 naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


@dataclass(frozen=True)
class Limits:
    """Request limits: the largest ``max_tokens``, the default when none is asked, the body size.

    ``max_prompt_tokens``: a prompt's tokens kept (cut from the left); None: each run's own
    ``data.max_source_length``, the length it was trained on.
    """

    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int | None = None


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    """A text part of a message's content (OpenAI's list form)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; the content is text or a list of text parts."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    n: Literal[1] = 1
    stop: None = None  # not supported: refused when given


class ChatRequest(_Common):
    """A ``/v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # vLLM's extension: the last message is the assistant's reply begun, continued as it stands
    continue_final_message: bool = False


class CompletionRequest(_Common):
    """A ``/v1/completions`` body (one prompt)."""

    prompt: str | list[str]


def parse(raw: bytes, schema: type[BaseModel]) -> Any:
    """The body as ``schema``; a 400 ApiError naming the first bad field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param) from None


def max_tokens(asked: int | None, limits: Limits) -> int:
    """The tokens to generate: ``asked`` (at most the server's cap) or the default."""
    if asked is None:
        return min(limits.default_max_tokens, limits.max_tokens)
    if asked > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens: {asked} is more than this server allows ({limits.max_tokens})",
            param="max_tokens",
            code="max_tokens_exceeded",
        )
    return asked
