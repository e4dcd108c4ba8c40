"""The engine's queue on shutdown: nothing queued is left waiting for ever."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from fedtune.serve.engine import Engine, Event, GenRequest


class _BlockingModel:
    """``generate`` says it started, then waits until the test releases it."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.generation_config = SimpleNamespace(eos_token_id=1)

    def generate(self, **kw: Any) -> None:
        self.started.set()
        self.release.wait(timeout=30)


def _request(events: list[Event]) -> GenRequest:
    return GenRequest(SimpleNamespace(id="m", adapters=(), split=None), [5, 6], 4, events.append)  # type: ignore[arg-type]


def test_close_answers_every_queued_request_with_an_error() -> None:
    model = _BlockingModel()
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    engine = Engine(SimpleNamespace(model=model, tokenizer=tokenizer), batch_wait_s=0)  # type: ignore[arg-type]
    running, queued = [], [[], []]
    engine.submit(_request(running))
    assert model.started.wait(timeout=10)
    for events in queued:
        engine.submit(_request(events))
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(timeout=2)  # close waits for the batch in progress ...
    assert closer.is_alive()
    assert [[e.kind for e in q] for q in queued] == [["error"], ["error"]]  # ... the queue does not
    model.release.set()
    closer.join(timeout=10)
    assert not closer.is_alive()
    assert [e.kind for e in running] == ["done"]
    late: list[Event] = []
    engine.submit(_request(late))
    assert [(e.kind, e.text) for e in late] == [("error", "the server is shutting down")]


def test_a_stream_closed_early_cancels_its_row_at_once() -> None:
    import asyncio

    from fedtune.serve.app import _events, _resumed, _sse

    class _OneWordEngine:
        def submit(self, gen: GenRequest) -> None:
            gen.emit(Event("text", "hello"))  # and then nothing: the row is still generating

    async def hang_up_after_one_chunk() -> None:
        gen = _request([])
        events = _events(_OneWordEngine(), gen)  # type: ignore[arg-type]
        first = await anext(events)
        stream = _sse(_resumed(first, events), {"id": "x"}, True)
        assert "hello" in await anext(stream)
        await stream.aclose()  # what Starlette does when the client goes away
        assert gen.cancelled.is_set()

    asyncio.run(hang_up_after_one_chunk())
