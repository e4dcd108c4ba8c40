"""Split runs served split: head and tail in the server, the trunk on a trunk service.

A split run's model id is generated as ``fedtune chat`` does on a split run: this process runs
the head and the tail with the run's client-side adapter, and the trunk runs on a trunk service,
either one started here on loopback with the run's trunk adapter for the server's lifetime, or
the one at ``--trunk HOST:PORT`` (``fedtune serve-trunk``). Every part keeps its own KV cache.

Each request opens its own session with the service (a gRPC stream, whose trunk KV cache holds
that request alone) and closes it when done. The service keeps one cache per session and runs
each session's forward on its own, so requests in different sessions cannot share a trunk
forward: a split model's requests are served one at a time, in arrival order, by a thread of
its own, while the engine's thread goes on with the other ids. A service that does not answer
or goes away fails only the request it was serving (503, ``trunk_unavailable``); the next
request connects afresh.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fedtune.config import Config
from fedtune.errors import FedtuneError
from fedtune.models.generation import stop_ids
from fedtune.rundir import RunDir
from fedtune.serve.engine import Event, GenRequest, StreamRow
from fedtune.serve.models import Catalogue, SplitOpener
from fedtune.split.chat import SplitClient, open_split_client
from fedtune.split.client import RemoteTrunk, TrunkError
from fedtune.split.generate import greedy_pick, split_tokens

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # a service that takes no session within this is unavailable (503)


@dataclass(frozen=True)
class SplitServing:
    """How split runs are served.

    ``unsplit``: the whole model in the server's process, as ``fedtune chat --unsplit``.
    Otherwise each split run generates across the split, its trunk on the service at ``trunk``
    (``HOST:PORT``; only with one split run, since a service holds one run's trunk adapter)
    or, without it, on one started in the server's process on loopback for each split run.
    ``connect_timeout_s``: the longest wait for the service to take a request's session.
    """

    unsplit: bool = False
    trunk: str | None = None
    connect_timeout_s: float = CONNECT_TIMEOUT_S


def check_split_serving(run_dirs: list[str | Path], how: SplitServing) -> None:
    """Refuse a ``trunk`` that cannot apply: with ``unsplit``, or unless exactly one run is split."""
    if how.trunk is None:
        return
    if how.unsplit:
        raise FedtuneError("--trunk: with --unsplit the split runs use no trunk service")
    runs = [RunDir.open(d) for d in run_dirs]
    split = [run.path.name for run in runs if run.config().split.enabled]
    if len(split) != 1:
        raise FedtuneError(
            f"--trunk: a trunk service holds one run's trunk adapter, so give exactly one split run "
            f"with it (split runs given: {', '.join(split) or 'none'})"
        )


Pick = Callable[[torch.Tensor], torch.Tensor]  # the last logits (B, V) -> the next tokens (B,)


def sampler(temperature: float, top_p: float, top_k: int | None = None) -> Pick:
    """How a request picks its next token from the last logits (B, V): greedy when ``temperature`` is 0.

    Sampling applies what ``generate`` applies to the served model: temperature, the model's
    ``generation_config.top_k`` (``top_k``) and the request's ``top_p``, then draws.
    """
    if temperature <= 0:
        return greedy_pick
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    no_ids = torch.empty(0, dtype=torch.long)  # these warpers read only the scores

    def pick(logits: torch.Tensor) -> torch.Tensor:
        scores = warpers(no_ids, logits.float())  # type: ignore[arg-type]
        return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)

    return pick


class SplitModel:
    """One split run's generation: head + tail here, one trunk session per request, in turn.

    Parameters
    ----------
    name
        The model id (in errors and logs).
    split
        Head, tail and the trunk service's address (:func:`~fedtune.split.chat.open_split_client`);
        closed with this.
    tokenizer
        For decoding the answers (copied: this object's thread has its own).
    eos
        Token ids that end an answer.
    top_k
        The served model's ``generation_config.top_k`` (sampling only).
    connect_timeout_s
        Longest wait for the service to take a session.
    """

    def __init__(
        self,
        name: str,
        split: SplitClient,
        tokenizer: PreTrainedTokenizerBase,
        eos: set[int],
        *,
        top_k: int | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.name, self.split, self.eos, self.top_k = name, split, eos, top_k
        self.connect_timeout_s = connect_timeout_s
        self._tokenizer = copy.deepcopy(tokenizer)
        self._queue: queue.Queue[GenRequest | None] = queue.Queue()
        self._device = next(split.head.parameters()).device
        self._thread = threading.Thread(target=self._work, name=f"fedtune-serve-split-{name}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return self.split.address

    def submit(self, request: GenRequest) -> None:
        """Queue ``request``; its events come from this model's thread."""
        self._queue.put(request)

    def probe(self) -> bool:
        """Whether the trunk service takes a session now (logged when it does not)."""
        try:
            self.split.connect(self.connect_timeout_s).close()
        except ConnectionError as err:
            log.warning("%s: %s; its requests answer 503 until the service is up", self.name, err)
            return False
        return True

    def close(self) -> None:
        """Stop the thread (after the request it is serving) and a trunk service started here."""
        self._queue.put(None)
        self._thread.join(timeout=30)
        self.split.close()

    def _work(self) -> None:
        while (request := self._queue.get()) is not None:
            if request.cancelled.is_set():
                continue
            try:
                self._generate(request)
            except (ConnectionError, TimeoutError) as err:
                log.warning("%s: trunk service at %s: %s", self.name, self.address, err)
                text = f"{self.name}: the trunk service at {self.address} is unavailable: {err}"
                request.emit(Event("error", text=text, status=503, code="trunk_unavailable"))
            except TrunkError as err:
                log.warning("%s: %s", self.name, err)
                request.emit(Event("error", text=f"{self.name}: {err}", status=502, code="trunk_error"))
            except Exception as err:  # one failed request must not stop the others
                log.exception("%s: split generation failed", self.name)
                request.emit(Event("error", text=f"generation failed: {err}"))

    @torch.no_grad()
    def _generate(self, request: GenRequest) -> None:
        row = StreamRow(request, self._tokenizer, self.eos)
        ids = torch.tensor([request.ids], device=self._device)
        pick = sampler(request.temperature, request.top_p, self.top_k)
        with self.split.connect(self.connect_timeout_s) as client:  # this request's session
            tokens = split_tokens(self.split.head, RemoteTrunk(client), self.split.tail, ids, pick=pick)
            for token in tokens:
                row.take(int(token[0]))
                if row.done:
                    break
        row.finish("length")


def open_split_model(
    name: str, cfg: Config, adapter: Path, catalogue: Catalogue, how: SplitServing
) -> SplitModel:
    """The split run ``cfg`` with ``adapter``: its head and tail here, its trunk where ``how`` says.

    Without ``how.trunk`` a trunk service with the adapter's trunk weights starts here on
    loopback; with it, the service is probed once (a warning if it does not answer: the server
    starts anyway and the run's requests answer 503 until it does). The end tokens and
    sampling's ``top_k`` are those of the catalogue's model, as for the engine's ids.
    """
    split = open_split_client(cfg, adapter, how.trunk)
    eos = set(stop_ids(catalogue.model, catalogue.tokenizer))
    top_k = getattr(getattr(catalogue.model, "generation_config", None), "top_k", None)
    model = SplitModel(
        name, split, catalogue.tokenizer, eos, top_k=top_k, connect_timeout_s=how.connect_timeout_s
    )
    if how.trunk is None:
        log.info("%s: split, trunk service started on %s", name, split.address)
    elif model.probe():
        log.info("%s: split, trunk service at %s", name, split.address)
    return model


def split_opener(how: SplitServing) -> SplitOpener | None:
    """What :func:`~fedtune.serve.models.load_catalogue` opens split runs with; None: unsplit."""
    if how.unsplit:
        return None

    def open_split(name: str, cfg: Config, adapter: Path, catalogue: Catalogue) -> SplitModel:
        return open_split_model(name, cfg, adapter, catalogue, how)

    return open_split


__all__ = ["SplitModel", "SplitServing", "check_split_serving", "open_split_model", "sampler", "split_opener"]
