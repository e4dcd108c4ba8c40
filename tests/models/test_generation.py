"""Stop tokens and padding shared by chat, eval, serve and split generation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedtune.errors import FedtuneError
from fedtune.models.generation import check_can_stop, input_device, left_pad, pad_id, stop_ids


def _tok(pad: int | None, eos: int | None) -> SimpleNamespace:
    return SimpleNamespace(pad_token_id=pad, eos_token_id=eos)


def _model(eos: object) -> SimpleNamespace:
    return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))


def test_stop_ids_join_the_generation_config_and_the_tokenizer() -> None:
    assert stop_ids(_model([7, 2]), _tok(None, 2)) == [2, 7]  # type: ignore[arg-type]
    assert stop_ids(_model(9), _tok(0, 2)) == [2, 9]  # type: ignore[arg-type]
    assert stop_ids(None, _tok(0, 2)) == [2]  # type: ignore[arg-type]
    assert stop_ids(_model(None), _tok(0, None)) == []  # type: ignore[arg-type]


def test_pad_id_prefers_pad_then_eos_then_a_stop_id() -> None:
    assert pad_id(_tok(0, 2), [5]) == 0  # type: ignore[arg-type]
    assert pad_id(_tok(None, 2), [5]) == 2  # type: ignore[arg-type]
    assert pad_id(_tok(None, None), [5]) == 5  # type: ignore[arg-type]
    with pytest.raises(FedtuneError, match="neither a pad nor an EOS"):
        pad_id(_tok(None, None))  # type: ignore[arg-type]


def test_a_model_that_cannot_stop_is_refused_by_name() -> None:
    with pytest.raises(FedtuneError, match="fedtune serve runs/x: neither the tokenizer"):
        check_can_stop(_model(None), _tok(0, None), "fedtune serve runs/x")  # type: ignore[arg-type]
    check_can_stop(_model(3), _tok(0, None), "ok")  # type: ignore[arg-type]


def test_left_pad_right_aligns_rows() -> None:
    ids, mask = left_pad([[5, 6, 7], [8], []], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_input_device_is_where_the_embeddings_are() -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 2))
    assert input_device(model) == torch.device("cpu")
    model.to(torch.device("meta"))
    assert input_device(model) == torch.device("meta")
    assert input_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters
