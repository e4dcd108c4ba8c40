"""The trunk service: a long-lived server process that runs the middle blocks for split clients.

Each client session is one gRPC bidirectional stream of :mod:`~fedtune.split.protocol` messages:
FORWARD (h1, counts) -> ACTIVATION (h2), then BACKWARD (dL/dh2) -> GRADIENT (dL/dh1). The service
keeps the trunk's autograd graph between a step's FORWARD and BACKWARD and steps its own AdamW
over the trunk's LoRA weights after each BACKWARD (or every ``step_every``-th).

Sessions take turns (the issue's *sequential* mode): a training FORWARD takes the trunk's lease and
its BACKWARD gives it back, because an optimiser step in between would modify weights that another
session's pending graph still needs. A bad message is answered with ERROR and drops only that
session's pending step: the stream and every other session stay up. Forward-only requests
(``train=False``) take the trunk just for their forward.

Generation keeps a KV cache per session: a FORWARD with ``cache="new"`` prefills a fresh
:class:`~fedtune.split.partition_model.PartCache` (replacing the session's previous one) and each
``cache="append"`` decodes on it. Each decode step takes the trunk only for itself, so another
session's optimiser step may land between two of them. An ERROR drops the session's cache too.

gRPC is used without generated code: one generic stream-stream method on raw bytes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import Tensor

import fedtune.split.protocol as wire
from fedtune.split.partition_model import PartCache, Trunk
from fedtune.split.protocol import Kind, Limits, Message, ProtocolError

log = logging.getLogger(__name__)

SERVICE = "fedtune.split.Trunk"
METHOD = f"/{SERVICE}/Session"
GRPC_SLACK_BYTES = 64 * 1024  # gRPC's own cap sits just above ours, so an oversized message gets ERROR


def grpc_options(limits: Limits) -> list[tuple[str, int]]:
    """The channel and server options for gRPC: message size caps just above ``limits.max_message_bytes``."""
    cap = limits.max_message_bytes + GRPC_SLACK_BYTES
    return [("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", cap)]


@dataclass(frozen=True)
class TrunkOptim:
    """The trunk's own optimiser: AdamW over its LoRA weights."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    step_every: int = 1  # BACKWARDs per optimiser step; 0: never step (the caller does)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.step_every < 0:
            raise ValueError(f"trunk optimiser: lr > 0, weight_decay >= 0, step_every >= 0; got {self}")


@dataclass
class _Pending:
    """A training step between its FORWARD and BACKWARD: the trunk's graph, kept alive."""

    step: int
    h1: Tensor  # leaf that receives dL/dh1
    h2: Tensor  # trunk output, root of the graph that dL/dh2 flows back through
    released: bool = False  # whether this step has given the trunk's lease back


@dataclass
class _Generation:
    """A session's generation state: the trunk's KV cache from a prefill through its decode steps."""

    cache: PartCache | None = None


class TrunkService:
    """Runs a :class:`~fedtune.split.partition_model.Trunk` for many client sessions.

    Parameters
    ----------
    trunk
        The trunk cut from a peft-wrapped model; its LoRA weights are the only ones trained.
    optim
        The trunk optimiser's settings.
    max_message_bytes
        Largest message accepted or sent.
    """

    def __init__(self, trunk: Trunk, optim: TrunkOptim | None = None, max_message_bytes: int | None = None):
        self.trunk = trunk
        self.optim = optim or TrunkOptim()
        self.limits = Limits(trunk.hidden_size, *([max_message_bytes] if max_message_bytes else []))
        params = [p for n, p in trunk.named_parameters() if "lora_" in n and p.requires_grad]
        if not params:
            raise ValueError("TrunkService: the trunk has no trainable LoRA weights (wrap with peft first)")
        self.optimizer = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        self.device = next(trunk.parameters()).device
        self.dtype = next(trunk.parameters()).dtype
        self._lease = threading.Lock()  # held from a training FORWARD to its BACKWARD
        self._backwards = 0
        self.steps_taken = 0

    # -- one session -------------------------------------------------------------------------------

    def session(self, requests: Iterator[bytes], context: Any = None) -> Iterator[bytes]:
        """Serve one client stream: a reply for every request, ERROR for bad ones."""
        pending: _Pending | None = None
        generation = _Generation()
        try:
            for data in requests:
                step = 0
                try:
                    message = wire.decode(data, self.limits)
                    step = message.step
                    reply, pending = self._handle(message, pending, generation)
                    out = wire.encode(reply, self.limits)  # e.g. a NaN h2 is refused here too
                except (ProtocolError, ValueError) as err:
                    self._release(pending)
                    pending, generation.cache = None, None
                    log.warning("trunk session: rejected a message: %s", err)
                    out = wire.encode(wire.error(step, str(err)), self.limits)
                except Exception as err:  # keep serving: one session's failure is not the service's
                    self._release(pending)
                    pending, generation.cache = None, None
                    log.exception("trunk session: step %s failed", step)
                    out = wire.encode(
                        wire.error(step, f"trunk failed: {type(err).__name__}: {err}"), self.limits
                    )
                yield out
        finally:  # the client hung up (or the stream was cancelled) mid-step
            self._release(pending)

    def _handle(
        self, message: Message, pending: _Pending | None, generation: _Generation
    ) -> tuple[Message, _Pending | None]:
        if message.kind is Kind.FORWARD:
            if pending is not None:
                raise ProtocolError(
                    f"header.step: FORWARD of step {message.step} while step {pending.step} "
                    "awaits its BACKWARD"
                )
            if message.cache is not None:
                return self._generate(message, generation), None
            return self._forward(message)
        if message.kind is Kind.BACKWARD:
            if pending is None or pending.step != message.step:
                awaited = "none" if pending is None else pending.step
                raise ProtocolError(f"header.step: BACKWARD of step {message.step}, awaiting {awaited}")
            return self._backward(message, pending), None
        raise ProtocolError(f"header.kind: a client may send FORWARD or BACKWARD, not {message.kind.value}")

    def _forward(self, message: Message) -> tuple[Message, _Pending | None]:
        h1 = message.tensors["hidden"].to(self.device, self.dtype)
        valid = message.tensors["valid"].to(self.device)
        if not message.train:
            with self._lease, torch.no_grad():
                self.trunk.eval()
                h2 = self.trunk(h1, valid)
            return wire.activation(message.step, h2), None
        self._lease.acquire()
        try:
            self.trunk.train()
            h1.requires_grad_()
            h2 = self.trunk(h1, valid)
        except BaseException:
            self._lease.release()
            raise
        return wire.activation(message.step, h2.detach()), _Pending(message.step, h1, h2)

    def _generate(self, message: Message, generation: _Generation) -> Message:
        """A KV-cached forward (``cache`` "new": prefill, "append": decode step); keeps no graph."""
        if message.cache == "new":
            generation.cache = self.trunk.new_cache()
        elif generation.cache is None:
            raise ProtocolError("header.cache: append without a prefill")
        h1 = message.tensors["hidden"].to(self.device, self.dtype)
        valid = message.tensors["valid"].to(self.device)
        with self._lease, torch.no_grad():
            self.trunk.eval()
            h2 = self.trunk(h1, valid, cache=generation.cache)  # checks the counts against the cache
        return wire.activation(message.step, h2)

    def _backward(self, message: Message, pending: _Pending) -> Message:
        grad = message.tensors["grad"]
        if grad.shape != pending.h2.shape:
            raise ProtocolError(
                f"grad: shape {tuple(grad.shape)} != the step's activation {tuple(pending.h2.shape)}"
            )
        try:
            pending.h2.backward(grad.to(self.device, pending.h2.dtype))
            grad_h1 = pending.h1.grad if pending.h1.grad is not None else torch.zeros_like(pending.h1)
            self._backwards += 1
            if self.optim.step_every and self._backwards % self.optim.step_every == 0:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.steps_taken += 1
        finally:
            self._release(pending)
        return wire.gradient(message.step, grad_h1.detach())

    def _release(self, pending: _Pending | None) -> None:
        """End a step's hold on the trunk (once); its graph goes with it."""
        if pending is not None and not pending.released:
            pending.released = True
            self._lease.release()

    # -- state ---------------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The trunk adapter (peft names), taken between steps."""
        with self._lease:
            return self.trunk.adapter_state_dict()

    def save_adapter(self, path: str | Path) -> Path:
        """Write the trunk adapter as a safetensors file."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_state_dict(), str(path))
        return path


def serve(
    service: TrunkService,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: tuple[bytes, bytes] | None = None,
    max_workers: int = 16,
) -> tuple[grpc.Server, int]:
    """Start serving ``service`` on ``host:port`` (0: any free port); returns the server and its port.

    Parameters
    ----------
    tls
        ``(certificate_chain_pem, private_key_pem)`` to serve over TLS; None serves plaintext
        (loopback and tests only).
    max_workers
        Threads, hence most concurrent sessions (a waiting session holds one).
    """
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {"Session": grpc.stream_stream_rpc_method_handler(service.session)},  # raw bytes both ways
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="trunk"),
        handlers=[handler],
        options=grpc_options(service.limits),
    )
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    if bound == 0:
        raise OSError(f"trunk service: could not bind {address}")
    server.start()
    log.info("trunk service on %s:%s (%s)", host, bound, "TLS" if tls else "plaintext")
    return server, bound


__all__ = ["METHOD", "TrunkOptim", "TrunkService", "grpc_options", "serve"]
