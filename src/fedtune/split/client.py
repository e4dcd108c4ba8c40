"""The split client's end of the trunk transport, and one training step across it.

:class:`TrunkClient` holds one bidirectional gRPC stream to the trunk service for a session:
requests go in through a queue that feeds the stream, replies come back in order. Every message
that leaves the client is recorded in :attr:`TrunkClient.audit` as read back from its own wire
bytes, so a test can check what actually crossed, not what the code meant to send.

:func:`remote_split_step` is :func:`~fedtune.split.step.split_step` with the trunk replaced by the
service: head forward -> FORWARD/ACTIVATION -> tail forward + loss -> BACKWARD/GRADIENT -> head
backward. Token ids, labels and the mask stay here; only h1, the counts and dL/dh2 go out.

:class:`RemoteTrunk` stands in for a local trunk in
:func:`~fedtune.split.generate.split_generate`: the trunk's KV cache lives in the service's session.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import Tensor

import fedtune.split.protocol as wire
from fedtune.split.partition_model import Head, Tail, valid_counts
from fedtune.split.protocol import Kind, Limits, Message
from fedtune.split.server import METHOD, grpc_options
from fedtune.split.step import Crossing, StepResult

_CLOSE = object()  # ends the request stream


class TrunkError(RuntimeError):
    """The trunk service answered ERROR; the message is the service's."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a sent message as its header lists it: name, dtype, shape and size in bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class SentMessage:
    """One outgoing message as its wire bytes describe it (``header`` is the full JSON header)."""

    kind: str
    step: int
    tensors: tuple[TensorInfo, ...]
    nbytes: int
    header: dict[str, Any]
    wire: bytes | None = None  # kept only with ``keep_wire=True``


class TrunkClient:
    """One session with the trunk service over a single bidirectional stream.

    Parameters
    ----------
    address
        ``host:port`` of the service.
    hidden_size
        The model's hidden size (replies are checked against it).
    tls_root_cert
        PEM root certificate (bytes or a path) to connect over TLS; None: plaintext.
    max_message_bytes
        Largest message sent or accepted; match the service's.
    timeout_s
        Longest wait for one reply (the service may be serving another client's step).
    connect_timeout_s
        Longest wait for the connection; default ``timeout_s``.
    keep_wire
        Keep each outgoing message's bytes in :attr:`audit` (tests).
    """

    def __init__(
        self,
        address: str,
        hidden_size: int,
        tls_root_cert: bytes | str | Path | None = None,
        max_message_bytes: int | None = None,
        timeout_s: float = 300.0,
        keep_wire: bool = False,
        connect_timeout_s: float | None = None,
    ) -> None:
        self.limits = Limits(hidden_size, *([max_message_bytes] if max_message_bytes else []))
        self.timeout_s = timeout_s
        self.keep_wire = keep_wire
        self.audit: list[SentMessage] = []
        self.bytes_up = 0
        self.bytes_down = 0
        self._step = 0
        self._pending: tuple[int, torch.Size] | None = None  # (step, h1 shape) between forward and backward
        options = grpc_options(self.limits)
        if tls_root_cert is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            root = tls_root_cert if isinstance(tls_root_cert, bytes) else Path(tls_root_cert).read_bytes()
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root), options=options)
        connect_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_s)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise ConnectionError(
                f"trunk service at {address}: no connection within {connect_s} s "
                f"({'TLS' if tls_root_cert is not None else 'plaintext'})"
            ) from None
        stream = self._channel.stream_stream(
            METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        self._requests: queue.Queue[object] = queue.Queue()
        self._replies: queue.Queue[bytes | BaseException] = queue.Queue()
        responses: Iterator[bytes] = stream(self._request_iter())
        # A reader thread, so that a silent service costs a timeout rather than a hung client.
        self._reader = threading.Thread(target=self._read, args=(responses,), daemon=True)
        self._reader.start()

    def _request_iter(self) -> Iterator[bytes]:
        while (item := self._requests.get()) is not _CLOSE:
            assert isinstance(item, bytes)
            yield item

    def _read(self, responses: Iterator[bytes]) -> None:
        try:
            for data in responses:
                self._replies.put(data)
            self._replies.put(ConnectionError("trunk service closed the stream"))
        except grpc.RpcError as err:
            code, details = err.code(), err.details()
            self._replies.put(ConnectionError(f"trunk service: {code.name}: {details}"))

    # -- messages ----------------------------------------------------------------------------------

    def exchange(self, data: bytes) -> Message:
        """Send one raw message and wait for the reply (low level: :meth:`forward` and :meth:`backward`)."""
        self._record(data)
        self.bytes_up += len(data)
        self._requests.put(data)
        try:
            reply = self._replies.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close()
            raise TimeoutError(f"trunk service: no reply within {self.timeout_s} s") from None
        if isinstance(reply, BaseException):
            self._replies.put(reply)  # the stream is gone: every later call fails the same way
            raise reply
        self.bytes_down += len(reply)
        return wire.decode(reply, self.limits)

    def forward(self, h1: Tensor, valid: Tensor, *, train: bool = True, cache: str | None = None) -> Tensor:
        """Send h1 (B, T, H) and the valid counts; return the trunk's h2 (on the CPU).

        With ``train=False`` the service keeps no graph and no :meth:`backward` may follow.
        ``cache`` (generation, ``train=False`` only): "new" prefills the session's trunk KV cache
        with this prompt, "append" runs a decode step on it, ``valid`` then being each sample's
        total length so far.
        """
        if self._pending is not None:
            raise RuntimeError(f"step {self._pending[0]} awaits its backward")
        if cache is not None and train:
            raise ValueError(f"forward: cache={cache!r} needs train=False (generation keeps no graph)")
        self._step += 1
        request = wire.forward(self._step, h1, valid.to(torch.int64), train=train, cache=cache)
        reply = self._expect(self.exchange(wire.encode(request, self.limits)), Kind.ACTIVATION, h1.shape)
        if train:
            self._pending = (self._step, h1.shape)
        return reply.tensors["hidden"]

    def backward(self, grad_h2: Tensor) -> Tensor:
        """Send dL/dh2 for the pending step; return dL/dh1 (on the CPU)."""
        if self._pending is None:
            raise RuntimeError("backward without a training forward")
        step, shape = self._pending
        self._pending = None
        request = wire.backward(step, grad_h2)
        reply = self._expect(self.exchange(wire.encode(request, self.limits)), Kind.GRADIENT, shape)
        return reply.tensors["grad"]

    def _expect(self, reply: Message, kind: Kind, shape: torch.Size) -> Message:
        if reply.kind is Kind.ERROR:
            self._pending = None  # the service dropped the step too
            raise TrunkError(f"trunk service, step {reply.step}: {reply.error}")
        if reply.kind is not kind or reply.step != self._step:
            raise wire.ProtocolError(
                f"header: expected {kind.value} for step {self._step}, got {reply.kind.value} {reply.step}"
            )
        tensor = next(iter(reply.tensors.values()))
        if tensor.shape != shape:
            raise wire.ProtocolError(f"{kind.value}: shape {tuple(tensor.shape)} != sent {tuple(shape)}")
        return reply

    def _record(self, data: bytes) -> None:
        try:
            header, _ = wire.read_header(data, Limits(self.limits.hidden_size, 2**62))
        except wire.ProtocolError as err:
            header = {"kind": "UNPARSABLE", "step": -1, "tensors": [], "error": str(err)}
        infos = tuple(
            TensorInfo(s["name"], s["dtype"], tuple(s["shape"]), s["nbytes"]) for s in header["tensors"]
        )
        keep = data if self.keep_wire else None
        self.audit.append(SentMessage(header["kind"], header["step"], infos, len(data), header, keep))

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        """End the stream (the service drops any pending step) and the channel."""
        self._requests.put(_CLOSE)
        self._channel.close()

    def __enter__(self) -> TrunkClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _identity(data: bytes) -> bytes:
    return data


@dataclass(eq=False)
class _AcrossTheCut(torch.autograd.Function):
    """h2 = trunk(h1) on the service, as one autograd node: its backward is the service's."""

    @staticmethod
    def forward(ctx: Any, h1: Tensor, valid: Tensor, client: TrunkClient) -> Tensor:
        ctx.client = client
        h2 = client.forward(h1.detach(), valid.detach().cpu().to(torch.int64), train=True)
        return h2.to(h1.device, h1.dtype)

    @staticmethod
    def backward(ctx: Any, grad_h2: Tensor) -> tuple[Tensor, None, None]:
        grad_h1 = ctx.client.backward(grad_h2.detach().contiguous())
        return grad_h1.to(grad_h2.device, grad_h2.dtype), None, None


class RemoteCache:
    """A handle on the trunk's KV cache, which lives in the service's session (see :class:`RemoteTrunk`)."""

    prefilled: bool = False


class RemoteTrunk:
    """The service's trunk, callable like a local :class:`~fedtune.split.partition_model.Trunk`.

    Without a cache and with gradients enabled, a call is a training step's forward and autograd
    goes through it: the backward of the returned h2 sends dL/dh2 to the service (which steps the
    trunk) and hands the service's dL/dh1 to the head, so an ordinary ``loss.backward()`` trains
    all three parts (see :class:`~fedtune.split.lm.SplitLM`). Under ``torch.no_grad()`` it is a
    plain forward (evaluation).

    ``split_generate(head, RemoteTrunk(client), tail, ...)`` generates with the trunk on the
    service: a call with a fresh :meth:`new_cache` sends FORWARD with cache "new" (prefill), later
    calls with the same cache send "append" (decode steps). The service keeps one cache per
    session, so use one ``RemoteTrunk`` per client; a newer prefill (or an ERROR) ends the older
    cache, and calling with it then raises here instead of decoding on the wrong prompt.
    """

    def __init__(self, client: TrunkClient) -> None:
        self.client = client
        self._live: RemoteCache | None = None  # the cache the session holds now

    def new_cache(self) -> RemoteCache:
        """A handle for a new generation; its first call prefills the session's cache."""
        return RemoteCache()

    def __call__(self, hidden: Tensor, valid: Tensor, cache: RemoteCache | None = None) -> Tensor:
        """h1 (B, T, H) -> h2, on ``hidden``'s device and dtype."""
        if cache is None and torch.is_grad_enabled():
            if not hidden.requires_grad:  # a head without trainable weights: the trunk still trains
                hidden = hidden.detach().requires_grad_()
            h2: Tensor = _AcrossTheCut.apply(hidden, valid, self.client)
            return h2
        mode: str | None = None
        if cache is not None:
            if cache.prefilled and cache is not self._live:
                raise RuntimeError(
                    "RemoteTrunk: this cache's session state is gone (a newer prefill or an error ended it)"
                )
            mode = "append" if cache.prefilled else "new"
        try:
            h2 = self.client.forward(hidden.detach(), valid, train=False, cache=mode)
        except TrunkError:
            self._live = None  # the service dropped the session's cache with its ERROR
            raise
        if cache is not None:
            cache.prefilled, self._live = True, cache
        return h2.to(hidden.device, hidden.dtype)


def remote_split_step(head: Head, tail: Tail, client: TrunkClient, batch: Mapping[str, Tensor]) -> StepResult:
    """One training step with the trunk on the service; gradients accumulate in head and tail.

    Mirrors :func:`~fedtune.split.step.split_step` (same batch keys, same result), with the
    crossings being what the transport sent and received. The service steps its own optimiser;
    zeroing and stepping the client's is the caller's job.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    valid = batch["valid"] if "valid" in batch else valid_counts(batch["attention_mask"])
    valid = valid.to(torch.int64)
    device = input_ids.device
    h1 = head(input_ids, valid)
    h2 = client.forward(h1.detach(), valid.cpu())
    h2_in = h2.to(device, h1.dtype).requires_grad_()
    _, loss = tail(h2_in, valid, labels)
    assert loss is not None  # labels were given
    loss.backward()
    grad_h2 = h2_in.grad if h2_in.grad is not None else torch.zeros_like(h2_in)
    grad_h1 = client.backward(grad_h2.detach())
    if h1.requires_grad:
        h1.backward(grad_h1.to(device, h1.dtype))
    crossings = [
        Crossing("head->trunk", {"hidden": h1.detach(), "valid": valid}),
        Crossing("trunk->tail", {"hidden": h2}),
        Crossing("tail->trunk", {"grad": grad_h2.detach()}),
        Crossing("trunk->head", {"grad": grad_h1}),
    ]
    num_tokens = int((labels[:, 1:] != -100).sum())
    return StepResult(loss=float(loss.detach()), num_tokens=num_tokens, crossings=crossings)


__all__ = [
    "RemoteCache",
    "RemoteTrunk",
    "SentMessage",
    "TensorInfo",
    "TrunkClient",
    "TrunkError",
    "remote_split_step",
]
