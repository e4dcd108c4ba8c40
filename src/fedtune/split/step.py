"""One split training step, in process, crossing the cuts exactly as separate processes would.

Forward: client head -> server trunk -> client tail + loss. Backward in three explicit stages:
the tail yields dL/dh2, which goes to the trunk; the trunk yields dL/dh1, which goes to the
head. Every tensor that crosses a cut is a fresh leaf (``.detach().requires_grad_()``), so no
autograd graph spans two parts, and each crossing is recorded for inspection: the transport
will send exactly these tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedtune.split.partition_model import Head, Tail, Trunk, valid_counts


@dataclass(frozen=True)
class Crossing:
    """The tensors one message across a cut carries (``route`` as ``"head->trunk"``)."""

    route: str
    tensors: dict[str, Tensor]


@dataclass
class StepResult:
    """One split training step: its loss, the tokens it is over and what crossed the cuts."""

    loss: float
    num_tokens: int  # labelled (non -100) target tokens after the shift, for weighting
    crossings: list[Crossing] = field(default_factory=list)


def _to_wire(tensor: Tensor) -> Tensor:
    """What the receiving side gets: same values, no history, its own leaf for gradients."""
    return tensor.detach().clone().requires_grad_()


def split_step(head: Head, trunk: Trunk, tail: Tail, batch: Mapping[str, Tensor]) -> StepResult:
    """Forward and backward through the three parts; gradients accumulate in each part's params.

    Parameters
    ----------
    head, trunk, tail
        The parts from :func:`~fedtune.split.partition_model.cut_model`.
    batch
        ``input_ids`` (B, T), ``labels`` (B, T, -100 ignored) and either ``valid`` (B,) counts or a
        right-padded ``attention_mask`` (B, T).

    Returns
    -------
    StepResult
        The loss and every crossing, in order: head->trunk, trunk->tail, tail->trunk, trunk->head.
        Zeroing gradients and stepping the optimisers (one per side) is the caller's job.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    valid = batch["valid"] if "valid" in batch else valid_counts(batch["attention_mask"])
    crossings: list[Crossing] = []

    # client: head forward
    h1 = head(input_ids, valid)
    h1_in = _to_wire(h1)
    crossings.append(Crossing("head->trunk", {"hidden": h1_in, "valid": valid.clone()}))
    # server: trunk forward (keeps its graph until the gradient comes back)
    h2 = trunk(h1_in, valid)
    h2_in = _to_wire(h2)
    crossings.append(Crossing("trunk->tail", {"hidden": h2_in, "valid": valid.clone()}))
    # client: tail forward, loss, backward to the cut
    _, loss = tail(h2_in, valid, labels)
    assert loss is not None  # labels were given
    loss.backward()
    grad_h2 = _grad_of(h2_in)
    crossings.append(Crossing("tail->trunk", {"grad": grad_h2}))
    # server: backward through the trunk
    h2.backward(grad_h2)
    grad_h1 = _grad_of(h1_in)
    crossings.append(Crossing("trunk->head", {"grad": grad_h1}))
    # client: backward through the head (no graph there if the head holds nothing trainable)
    if h1.requires_grad:
        h1.backward(grad_h1)
    num_tokens = int((labels[:, 1:] != -100).sum())
    return StepResult(loss=float(loss.detach()), num_tokens=num_tokens, crossings=crossings)


def _grad_of(leaf: Tensor) -> Tensor:
    if leaf.grad is None:  # the loss does not depend on it (e.g. every label is -100)
        return torch.zeros_like(leaf)
    return leaf.grad.detach().clone()


__all__ = ["Crossing", "StepResult", "split_step"]
