"""Client-batch mode: one trunk pass over the activations of several clients at once.

A training FORWARD joins the batch being formed; the batch closes when every open session has
joined, or ``wait_s`` after its first member arrived. The closing session pads the members'
h1 to the longest sequence (right padding, masked by the valid counts, so each sample's
result is what it would be alone), runs the trunk once and hands every member its slice of h2.
Each member's BACKWARD brings its slice of dL/dh2; when all members have sent theirs (a member
that hung up counts as a zero gradient), the last one runs one backward through the whole
batch, slices dL/dh1 back out and steps the trunk optimiser once. A session only ever receives
its own slices: clients never see each other's activations.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import fedtune.split.protocol as wire
from fedtune.split.partition_model import Trunk
from fedtune.split.protocol import Message, ProtocolError
from fedtune.split.server import TrunkOptim, TrunkService, _Pending


@dataclass
class _Batch:
    deadline: float
    inputs: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (h1, valid) per member
    state: str = "forming"  # forming -> running -> forwarded -> done | failed
    outputs: list[Tensor] = field(default_factory=list)
    grads: dict[int, Tensor] = field(default_factory=dict)
    left: set[int] = field(default_factory=set)
    grad_h1: list[Tensor] = field(default_factory=list)
    error: str = ""
    h1: Tensor | None = None  # the padded, concatenated leaf
    h2: Tensor | None = None

    def settled(self) -> bool:
        return len(self.grads) + len(self.left) == len(self.inputs)


@dataclass
class _Member(_Pending):
    batch: _Batch | None = None
    index: int = 0


class BatchingTrunkService(TrunkService):
    """A :class:`~fedtune.split.server.TrunkService` that batches concurrent clients' steps."""

    def __init__(
        self,
        trunk: Trunk,
        optim: TrunkOptim | None = None,
        max_message_bytes: int | None = None,
        wait_s: float = 1.0,
    ) -> None:
        super().__init__(trunk, optim, max_message_bytes)
        self.wait_s = wait_s
        self._cv = threading.Condition()
        self._open = 0  # sessions whose stream is open
        self._forming: _Batch | None = None
        self.batch_sizes: list[int] = []  # members per trunk pass (for tests and benchmarks)

    def session(self, requests: Iterator[bytes], context: Any = None) -> Iterator[bytes]:
        with self._cv:
            self._open += 1
        try:
            yield from super().session(requests, context)
        finally:
            with self._cv:
                self._open -= 1
                self._cv.notify_all()

    # -- forward -------------------------------------------------------------------------------

    def _forward(self, message: Message) -> tuple[Message, _Pending | None]:
        if not message.train:
            return super()._forward(message)
        h1 = message.tensors["hidden"].to(self.device, self.dtype)
        valid = message.tensors["valid"].to(self.device)
        with self._cv:
            batch = self._forming
            if batch is None:
                batch = self._forming = _Batch(deadline=time.monotonic() + self.wait_s)
            index = len(batch.inputs)
            batch.inputs.append((h1, valid))
            self._cv.notify_all()
            while batch.state == "forming":
                if len(batch.inputs) >= self._open or time.monotonic() >= batch.deadline:
                    batch.state, self._forming = "running", None
                    break
                self._cv.wait(timeout=max(batch.deadline - time.monotonic(), 0.0))
            else:  # someone else closes and runs it
                self._cv.wait_for(lambda: batch.state in ("forwarded", "failed"))
                return self._joined(message, batch, index)
        self._run_forward(batch)
        return self._joined(message, batch, index)

    def _joined(self, message: Message, batch: _Batch, index: int) -> tuple[Message, _Pending]:
        if batch.state == "failed":
            raise RuntimeError(batch.error)
        out = wire.activation(message.step, batch.outputs[index])
        h1, _ = batch.inputs[index]
        member = _Member(message.step, h1, batch.outputs[index], batch=batch, index=index)
        return out, member

    def _run_forward(self, batch: _Batch) -> None:
        self._lease.acquire()  # held until the batch's backward: no optimiser step in between
        try:
            width = max(h.shape[1] for h, _ in batch.inputs)
            h1 = torch.cat([_pad(h, width) for h, _ in batch.inputs]).requires_grad_()
            valid = torch.cat([v for _, v in batch.inputs])
            self.trunk.train()
            h2 = self.trunk(h1, valid)
            outputs, row = [], 0
            for h, _ in batch.inputs:
                outputs.append(h2[row : row + h.shape[0], : h.shape[1]].detach())
                row += h.shape[0]
            batch.h1, batch.h2, batch.outputs, batch.state = h1, h2, outputs, "forwarded"
            self.batch_sizes.append(len(batch.inputs))
        except BaseException as err:
            batch.state, batch.error = "failed", f"trunk failed: {type(err).__name__}: {err}"
            self._lease.release()
            raise
        finally:
            with self._cv:
                self._cv.notify_all()

    # -- backward ------------------------------------------------------------------------------

    def _backward(self, message: Message, pending: _Pending) -> Message:
        if not isinstance(pending, _Member) or pending.batch is None:
            return super()._backward(message, pending)
        batch, index = pending.batch, pending.index
        grad = message.tensors["grad"]
        if grad.shape != pending.h2.shape:
            raise ProtocolError(
                f"grad: shape {tuple(grad.shape)} != the step's activation {tuple(pending.h2.shape)}"
            )
        with self._cv:
            batch.grads[index] = grad.to(self.device, self.dtype)
            pending.released = True  # the batch, not the member, gives the lease back
            run = batch.settled()
            if not run:
                self._cv.wait_for(lambda: batch.state in ("done", "failed"))
        if run:
            self._run_backward(batch)
        if batch.state == "failed":
            raise RuntimeError(batch.error)
        return wire.gradient(message.step, batch.grad_h1[index])

    def _run_backward(self, batch: _Batch) -> None:
        assert batch.h1 is not None and batch.h2 is not None
        try:
            parts = []
            for i, (h, _) in enumerate(batch.inputs):
                g = batch.grads.get(i, torch.zeros_like(h))  # a member that left adds nothing
                parts.append(_pad(g, batch.h2.shape[1]))
            batch.h2.backward(torch.cat(parts))
            grad = batch.h1.grad if batch.h1.grad is not None else torch.zeros_like(batch.h1)
            row = 0
            for h, _ in batch.inputs:
                batch.grad_h1.append(grad[row : row + h.shape[0], : h.shape[1]].detach().clone())
                row += h.shape[0]
            self._backwards += 1
            if self.optim.step_every and self._backwards % self.optim.step_every == 0:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.steps_taken += 1
            batch.state = "done"
        except BaseException as err:
            batch.state, batch.error = "failed", f"trunk failed: {type(err).__name__}: {err}"
            raise
        finally:
            batch.h1 = batch.h2 = None
            self._lease.release()
            with self._cv:
                self._cv.notify_all()

    def _release(self, pending: _Pending | None) -> None:
        if not isinstance(pending, _Member) or pending.batch is None:
            super()._release(pending)
            return
        if pending.released:
            return
        pending.released = True
        batch = pending.batch
        with self._cv:  # the member hung up or sent junk: the others go on without its gradient
            batch.left.add(pending.index)
            run = batch.state == "forwarded" and batch.settled()
        if run:
            self._run_backward(batch)


def _pad(t: Tensor, width: int) -> Tensor:
    """Right-pad (B, T, H) with zero columns to (B, width, H)."""
    if t.shape[1] == width:
        return t
    return torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1]))


__all__ = ["BatchingTrunkService"]
