"""Generation across the split, with a KV cache in every part.

Prefill runs the whole (right-padded) prompt through head, trunk and tail once; after that each
step sends one token's hidden state per sample across each cut, plus the counts. Each part keeps
its own :class:`~fedtune.split.partition_model.PartCache`: generated tokens are appended after the
prompt's padding columns, which stay masked, and their positions continue from each sample's own
prompt length, so a padded batch generates what each sample would generate alone.

The trunk may be local or remote (:class:`~fedtune.split.client.RemoteTrunk`, whose cache lives
in the trunk service's session): all this module asks of it is :class:`CachedTrunk`.

:func:`split_tokens` yields the next tokens step by step (for streaming, and with any way of
picking a token from the logits); :func:`split_generate` is greedy decoding built on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from fedtune.split.partition_model import Head, PartCache, Tail


class CachedTrunk(Protocol):
    """A trunk that generates with a KV cache: a local ``Trunk`` or a ``RemoteTrunk``."""

    def new_cache(self) -> Any: ...

    def __call__(self, hidden: Tensor, valid: Tensor, cache: Any = None) -> Tensor: ...


def _forward(
    parts: tuple[Head, CachedTrunk, Tail],
    caches: tuple[PartCache, Any, PartCache],
    ids: Tensor,
    valid: Tensor,
) -> Tensor:
    head, trunk, tail = parts
    h1 = head(ids, valid, cache=caches[0])
    h2 = trunk(h1, valid, cache=caches[1])
    logits: Tensor
    logits, _ = tail(h2, valid, cache=caches[2])
    return logits


def greedy_pick(logits: Tensor) -> Tensor:
    """The most likely token of each row of ``logits`` (B, V)."""
    return logits.argmax(dim=-1)


@torch.no_grad()
def split_tokens(
    head: Head,
    trunk: CachedTrunk,
    tail: Tail,
    input_ids: Tensor,
    valid: Tensor | None = None,
    pick: Callable[[Tensor], Tensor] = greedy_pick,
) -> Iterator[Tensor]:
    """Yield each step's next token of every sample (B,), without end: the caller stops asking.

    The prompt is prefilled when the first token is asked for; each later token costs one
    decode step in every part, run only when it is asked for, so a caller that stops after
    ``n`` tokens has run the parts ``n`` times. Finished samples must keep being fed (their
    tokens ignored) so that the batch stays rectangular. ``pick`` maps the last logits (B, V)
    to tokens (B,): greedy by default.
    """
    batch, width = input_ids.shape
    if valid is None:
        valid = torch.full((batch,), width, dtype=torch.int64, device=input_ids.device)
    parts = (head, trunk, tail)
    caches = (head.new_cache(), trunk.new_cache(), tail.new_cache())
    rows = torch.arange(batch, device=input_ids.device)
    logits = _forward(parts, caches, input_ids, valid)
    last = logits[rows, valid - 1]  # each sample's last real token, not the padded last column
    while True:
        token = pick(last)
        yield token
        valid = valid + 1
        last = _forward(parts, caches, token.unsqueeze(1), valid)[:, -1]


@torch.no_grad()
def split_generate(
    head: Head,
    trunk: CachedTrunk,
    tail: Tail,
    input_ids: Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    valid: Tensor | None = None,
) -> list[list[int]]:
    """Greedy decoding through head -> trunk -> tail; returns each sample's new tokens.

    Parameters
    ----------
    head, trunk, tail
        The parts from :func:`~fedtune.split.partition_model.cut_model`, in eval mode; ``trunk``
        may be a :class:`~fedtune.split.client.RemoteTrunk` on the trunk service.
    input_ids
        Prompts (B, T), right-padded when of unequal length.
    max_new_tokens
        Most tokens generated per sample.
    eos_token_id
        Token id(s) that end a sample; the end token is included in its output, as in HF's ``generate``.
    valid
        Prompt lengths (B,); default: every prompt fills all T columns.

    Returns
    -------
    list[list[int]]
        The generated tokens of each sample (prompt excluded).
    """
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    batch = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    if max_new_tokens < 1:
        return out
    for step, token in enumerate(split_tokens(head, trunk, tail, input_ids, valid)):
        for i, tok in enumerate(token.tolist()):
            if not done[i]:
                out[i].append(tok)
                done[i] = tok in eos
        if all(done) or step == max_new_tokens - 1:
            break  # no decode step for a token nobody asks for
    return out


__all__ = ["CachedTrunk", "greedy_pick", "split_generate", "split_tokens"]
