"""``fedtune serve`` as a real server on loopback, spoken to by the official ``openai`` client."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from fedtune.serve.process import served
from helpers import finished_tiny_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(base URL, the run's model id) of a ``fedtune serve`` process, stopped by its own handle."""
    run, _ = finished_tiny_run(tmp_path_factory.mktemp("runs"))
    args = ("--max-tokens", "32")
    with served([run.path], *args, wait_s=120) as url:
        yield url, run.path.name


@pytest.fixture(scope="module")
def api(server: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


def test_models_and_chat(api: openai.OpenAI, server: tuple[str, str]) -> None:
    model = server[1]
    assert {m.id for m in api.models.list()} == {"base", model}
    answer = api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and 1 <= answer.usage.completion_tokens <= 5
    assert isinstance(answer.choices[0].message.content, str)


def test_streaming_chat_says_what_the_whole_answer_says(api: openai.OpenAI, server: tuple[str, str]) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    whole = api.chat.completions.create(model=server[1], messages=messages, max_tokens=8)  # type: ignore[arg-type]
    stream = api.chat.completions.create(model=server[1], messages=messages, max_tokens=8, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_completions_streamed_and_not(api: openai.OpenAI) -> None:
    whole = api.completions.create(model="base", prompt="Once upon", max_tokens=6)
    parts = api.completions.create(model="base", prompt="Once upon", max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text


def test_errors_reach_the_client_as_openai_errors(api: openai.OpenAI, server: tuple[str, str]) -> None:
    with pytest.raises(openai.NotFoundError, match="not served here"):
        api.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(
            model=server[1], messages=[{"role": "user", "content": "hi"}], max_tokens=33
        )
    assert caught.value.code == "max_tokens_exceeded"
    assert api.chat.completions.create(
        model=server[1], messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
