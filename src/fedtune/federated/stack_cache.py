"""FLoRA merge mode without a growing download: each client keeps the stack it was sent.

In ``fed.stack_mode = "merge"`` the global update is the stack of every round's client
factors so far, and each round appends new rows to every ``A`` and columns to every ``B``
(earlier ones never change). A client keeps the stack it last received on its own disk
(:func:`fedtune.rundir.stack_file`, under the same state root as FF-LoRA's personal
adapters); the server remembers which rank each client holds and sends only the
rows / columns beyond it (``<key>-from`` = the rank it builds on). So the download per round
is the round's own stacked factors, as in FLoRA, where clients merge each round into a
local copy of the base weights. A client that lacks the stack the server assumes (a wiped
disk) fails that message with a clear error; the server then forgets what it held and sends
the whole stack next time.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedtune.errors import FedtuneError
from fedtune.io import atomic_file
from fedtune.rundir import stack_file


def uniform_rank(state: Mapping[str, np.ndarray | torch.Tensor]) -> int | None:
    """The rank every module of ``state`` has, or None when they differ."""
    ranks = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
    return ranks.pop() if len(ranks) == 1 else None


def tail(state: Mapping[str, np.ndarray], held: int) -> dict[str, np.ndarray]:
    """The rows of every ``A`` and the columns of every ``B`` beyond rank ``held``."""
    return {k: np.ascontiguousarray(v[held:] if ".lora_A." in k else v[:, held:]) for k, v in state.items()}


def extend(held: Mapping[str, torch.Tensor], more: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``held`` with ``more``'s rows (A) and columns (B) appended: the inverse of :func:`tail`."""
    if held.keys() != more.keys():
        raise FedtuneError("stack tail: its modules differ from the cached stack's")
    return {k: torch.cat([v, more[k]], dim=0 if ".lora_A." in k else 1) for k, v in held.items()}


def cache_file(root: Path, pid: int) -> Path:
    """Where partition ``pid`` keeps its stack under the state root ``root``."""
    return stack_file(root, pid)


def load(root: Path, pid: int) -> dict[str, torch.Tensor] | None:
    """Partition ``pid``'s cached stack, or None when it holds none."""
    path = cache_file(root, pid)
    return load_file(str(path)) if path.is_file() else None


def save(root: Path, pid: int, state: Mapping[str, torch.Tensor]) -> None:
    """Write atomically: a crash leaves the old stack or the new one, never half of one."""
    with atomic_file(cache_file(root, pid)) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))


def receive(
    sent: Mapping[str, torch.Tensor] | None, held_rank: int | None, root: Path, pid: int
) -> dict[str, torch.Tensor]:
    """The whole stack a message brings, saved as this client's cached copy.

    ``sent`` is the whole stack (``held_rank`` None), or the tail beyond ``held_rank`` (None:
    nothing new) that is appended to the cached copy.
    """
    if held_rank is None:
        if sent is None:
            raise FedtuneError("stack: the message carries neither a stack nor a tail")
        state = dict(sent)
    else:
        cached = load(root, pid)
        have = uniform_rank(cached) if cached is not None else None
        if have != held_rank:
            raise FedtuneError(
                f"{cache_file(root, pid)}: the server sent the stack beyond rank {held_rank}, "
                f"this client holds {'no stack' if have is None else f'rank {have}'}; "
                "it will send the whole stack next round"
            )
        assert cached is not None
        state = cached if sent is None else extend(cached, sent)
    save(root, pid, state)
    return state


__all__ = ["cache_file", "extend", "load", "receive", "save", "tail", "uniform_rank"]
