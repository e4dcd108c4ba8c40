"""Generation off the event loop: one worker thread per base model, concurrent requests batched.

Requests wait in a queue; the worker takes the oldest, waits ``batch_wait_s`` for company, and
generates for it together with every queued request of the same model id and sampling settings
(up to ``max_batch``), left-padded, in one ``model.generate``. Each new token is decoded and
handed to its request's callback as it comes (a streamer that takes the whole batch's step), so
streams start at once; a request stops at its own EOS or ``max_tokens`` (a per-row stopping
criterion) while the others go on. Requests that arrive during a batch form the next one.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from fedtune.models.generation import input_device, left_pad, pad_id, stop_ids
from fedtune.serve.models import Catalogue, Served, activate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """What a request hears: ``text`` (a piece of the answer), then ``done`` or ``error``."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS) or "length" (max_tokens), on "done"
    completion_tokens: int = 0
    status: int = 500  # on "error": the HTTP status and OpenAI error code it is answered with
    code: str | None = None


@dataclass
class GenRequest:
    """A prompt to continue for a served model id; ``emit`` is called from the worker thread."""

    served: Served
    ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def key(self) -> tuple[object, ...]:
        """Requests with the same key can share a batch."""
        sampling = (self.temperature, self.top_p) if self.temperature > 0 else ()
        return (self.served.id, *sampling)


class StreamRow:
    """One request's progress inside a batch: its tokens, the text already sent, whether it is done."""

    def __init__(self, request: GenRequest, tokenizer: PreTrainedTokenizerBase, eos: set[int]) -> None:
        self.request, self.tokenizer, self.eos = request, tokenizer, eos
        self.tokens: list[int] = []
        self.sent = ""
        self.done = False

    def take(self, token: int) -> None:
        if self.done:
            return
        if token in self.eos:
            return self.finish("stop")
        self.tokens.append(token)
        text = str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        if not text.endswith("\ufffd"):  # hold back half a multi-byte character
            if len(text) > len(self.sent):
                self.request.emit(Event("text", text[len(self.sent) :]))
            self.sent = text
        if len(self.tokens) >= self.request.max_tokens:
            self.finish("length")
        elif self.request.cancelled.is_set():
            self.finish("cancelled")

    def finish(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.request.emit(Event("done", finish_reason=reason, completion_tokens=len(self.tokens)))


class _BatchStreamer(BaseStreamer):
    """Hands each generation step's tokens (one per row) to the rows; the prompt is skipped."""

    def __init__(self, rows: list[StreamRow]) -> None:
        self.rows = rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(len(self.rows), -1)[:, -1].tolist(), strict=True):
            row.take(int(token))

    def end(self) -> None:
        for row in self.rows:
            row.finish("length")


class _RowsDone(StoppingCriteria):
    def __init__(self, rows: list[StreamRow]) -> None:
        self.rows = rows

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool)  # type: ignore[return-value]


class Engine:
    """The worker thread that owns the model; :meth:`submit` is safe from any thread."""

    def __init__(self, catalogue: Catalogue, *, max_batch: int = 16, batch_wait_s: float = 0.005) -> None:
        self.catalogue = catalogue
        self._tokenizer = copy.deepcopy(catalogue.tokenizer)  # the worker's own, for decoding
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self._queue: deque[GenRequest] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # how many requests each batch held: sizes -> batches
        self._thread = threading.Thread(target=self._work, name="fedtune-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenRequest) -> None:
        with self._cond:
            if self._closed:
                request.emit(Event("error", text="the server is shutting down"))
                return
            self._queue.append(request)
            self._cond.notify()

    def close(self) -> None:
        """Stop after the batch in progress; every request still queued hears an error event."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify()
        for req in left:
            req.emit(Event("error", text="the server is shutting down"))
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[GenRequest] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
        time.sleep(self.batch_wait_s)  # let requests sent together arrive together
        with self._cond:
            first = self._queue.popleft()
            batch, rest = [first], deque[GenRequest]()
            while self._queue:
                req = self._queue.popleft()
                fits = req.key() == first.key() and len(batch) < self.max_batch
                (batch if fits else rest).append(req)
            self._queue.extendleft(reversed(rest))
        return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [r for r in batch if not r.cancelled.is_set()]
            if not live:
                continue
            try:
                self._generate(live)
            except Exception as err:  # one failed batch must not stop the server
                log.exception("generation failed")
                for req in live:
                    req.emit(Event("error", text=f"generation failed: {err}"))

    @torch.no_grad()
    def _generate(self, batch: list[GenRequest]) -> None:
        tokenizer, model = self._tokenizer, self.catalogue.model
        stops = stop_ids(model, tokenizer)
        rows = [StreamRow(r, tokenizer, set(stops)) for r in batch]
        pad = pad_id(tokenizer, stops)
        input_ids, mask = (t.to(input_device(model)) for t in left_pad([r.ids for r in batch], pad))
        first = batch[0]
        sampling: dict[str, object] = (
            {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p}
            if first.temperature > 0
            else {"do_sample": False}
        )
        self.batch_sizes[len(batch)] += 1
        activate(model, first.served.adapters)
        model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max(r.max_tokens for r in batch),
            pad_token_id=pad,
            eos_token_id=stops,
            streamer=_BatchStreamer(rows),
            stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]),
            **sampling,
        )
        for row in rows:
            row.finish("length")
