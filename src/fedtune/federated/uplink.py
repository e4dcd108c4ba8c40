"""What a client sends back: its trained adapter, or under int8 / nf4 the update, delta-coded.

In ``float16`` / ``float32`` the reply is the trained adapter itself, as before. In a blockwise
format (:mod:`fedtune.federated.quantize`) the client sends ``Q(trained - start)``, where
``start`` is the adapter it decoded from the instruction (the keys it sends: FFA-LoRA's B
only), and the server adds the update to its own float32 copy of what it sent: a small update
is not rounded away against the adapter's magnitude, and the server's copy never carries the
downlink's rounding.

With ``fed.error_feedback`` the client keeps ``e = u - Q(u)`` of its last update ``u`` on its
own disk (one file per round under its state root, the last :data:`KEEP_ROUNDS` kept, so a
resumed round reads what the interrupted run had) and sends ``Q(u + e)`` next time; the sum of
what it sent then trails the sum of its true updates by the last residual only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedtune.errors import FedtuneError
from fedtune.federated.records import blockwise, from_record, to_record
from fedtune.federated.task import Task, reply_dtype
from fedtune.io import atomic_file
from fedtune.rundir import residual_file, residual_rounds

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
KEEP_ROUNDS = 2  # residual files kept per client; resume needs the last complete round's


def with_feedback(
    update: Arrays, residual: Arrays | None, fmt: str, block: int
) -> tuple[ArrayRecord, Arrays]:
    """``Q(update + residual)`` and the new residual ``update + residual - deq(Q(...))``.

    Pure: the caller keeps the residual. ``residual`` None (or of other keys and shapes) adds nothing.
    """
    if residual is not None and _fits(residual, update):
        update = {k: (v + residual[k]).astype(np.float32) for k, v in update.items()}
    record = to_record(update, fmt, block)
    sent = from_record(record)
    return record, {k: (v - sent[k]).astype(np.float32) for k, v in update.items()}


def _fits(residual: Arrays, update: Arrays) -> bool:
    return residual.keys() == update.keys() and all(residual[k].shape == v.shape for k, v in update.items())


def start_state(task: Task, keys: list[str]) -> Arrays:
    """The adapter the instruction sent, as this client decoded it, for ``keys`` (what it sends)."""
    if task.inst.adapter is None:
        raise FedtuneError("delta-coded reply: the instruction sent no adapter to take the update against")
    sent = from_record(task.inst.adapter)
    missing = [k for k in keys if k not in sent]
    if missing:
        raise FedtuneError(
            f"delta-coded reply: the instruction's adapter lacks {len(missing)} keys: {missing[:3]}"
        )
    return {k: sent[k] for k in keys}


def encode_reply(task: Task, trained: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The trained adapter as the reply carries it (:func:`~fedtune.federated.task.reply_dtype`).

    Blockwise formats send the update against :func:`start_state`, through the error feedback
    when ``fed.error_feedback`` is on; the reply then says so (``delta``, set by ``train_reply``).
    """
    fmt, fed = reply_dtype(task), task.cfg.fed
    if not blockwise(fmt):
        return to_record(trained, fmt)
    start = start_state(task, list(trained))
    update = {k: v.detach().cpu().float().numpy() - start[k] for k, v in trained.items()}
    if not fed.error_feedback:
        return to_record(update, fmt, fed.wire_block)
    residual = load_residual(task.state_dir, task.partition_id, task.inst.server_round)
    record, left = with_feedback(update, residual, fmt, fed.wire_block)
    save_residual(task.state_dir, task.partition_id, task.inst.server_round, left)
    return record


def load_residual(root: Path, pid: int, before_round: int) -> Arrays | None:
    """The newest residual saved after a round < ``before_round``, or None."""
    earlier = [r for r in residual_rounds(root, pid) if r < before_round]
    if not earlier:
        return None
    path = residual_file(root, pid, earlier[-1])
    try:
        return load_file(str(path))
    except (
        OSError,
        SafetensorError,
    ) as err:  # a damaged file: this round goes without feedback, as the first did
        log.warning("%s: unreadable residual (%s); this update goes without error feedback", path, err)
        return None


def save_residual(root: Path, pid: int, server_round: int, residual: Arrays) -> Path:
    """Write atomically after ``server_round``; keep only the last :data:`KEEP_ROUNDS`."""
    path = residual_file(root, pid, server_round)
    with atomic_file(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in residual.items()}, str(tmp))
    for old in residual_rounds(root, pid)[:-KEEP_ROUNDS]:
        residual_file(root, pid, old).unlink(missing_ok=True)
    return path


__all__ = ["KEEP_ROUNDS", "encode_reply", "load_residual", "save_residual", "start_state", "with_feedback"]
