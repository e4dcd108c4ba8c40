"""What every generator in fedtune agrees on: which tokens stop an answer, what pads a batch.

``fedtune chat``, ``fedtune eval --generate``, ``fedtune serve`` and split generation all stop at
the same tokens (:func:`stop_ids`: the model's generation config and the tokenizer's EOS, so an
instruct model whose turn ends with a token other than the tokenizer's EOS stops there too),
and left-pad batches the same way (:func:`left_pad`, :func:`pad_id`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.errors import FedtuneError


def stop_ids(model: torch.nn.Module | None, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Sorted token ids that end an answer: the generation config's EOS ids and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(int(i) for i in ids)


def pad_id(tokenizer: PreTrainedTokenizerBase, stops: Sequence[int] = ()) -> int:
    """The tokenizer's pad id, else the first stop id (masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    if stops:
        return int(stops[0])
    raise FedtuneError("the tokenizer has neither a pad nor an EOS token: generation could never stop")


def check_can_stop(model: torch.nn.Module | None, tokenizer: PreTrainedTokenizerBase, what: str) -> None:
    """Refuse a model that has no stop token (its answers would always run to max_tokens)."""
    if not stop_ids(model, tokenizer):
        raise FedtuneError(
            f"{what}: neither the tokenizer nor the model's generation_config names an EOS token, "
            "so generation could never stop; set tokenizer.eos_token (tokenizer_config.json)"
        )


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a prompt goes: the device of the input embeddings (the first part under a device_map)."""
    embed = getattr(model, "get_input_embeddings", None)
    module = embed() if callable(embed) else None
    for part in (module, model):
        if isinstance(part, torch.nn.Module):
            for p in part.parameters():
                return p.device
    return torch.device("cpu")


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every row right-aligned; pads on the left.

    >>> left_pad([[5, 6, 7], [8]], 0)[0].tolist()
    [[5, 6, 7], [0, 0, 8]]
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask
