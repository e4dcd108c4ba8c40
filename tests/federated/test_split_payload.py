"""Payload audit of a split client: everything that leaves it in a training round.

The split ClientApp's train handler runs in this process against a real trunk service on
loopback; every trunk message is read back from its wire bytes, and the Flower reply is
inspected record by record. Only float activations / gradients, int64 counts, the client-side
adapter (float) and numeric metrics may leave: no token ids, no labels, no text.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.config import load_config
from fedtune.data.pipeline import client_conversations, client_tokenized
from fedtune.federated import client_app, split_client
from fedtune.federated.protocol import Instruction, Job, TrainReply, instruction_message
from fedtune.federated.protocol.tensors import unpack
from fedtune.federated.records import to_record
from fedtune.models.adapters import initial_adapter_state
from fedtune.models.load import load_tokenizer
from fedtune.split.client import TrunkClient
from fedtune.split.rounds import SplitRounds

SPLIT = ["model.name='tiny-llama-4l'", "split.enabled=true", "split.n_head=1", "split.n_tail=1"]


class _Recording(TrunkClient):
    made: ClassVar[list[TrunkClient]] = []

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **{**kwargs, "keep_wire": True})
        _Recording.made.append(self)


@pytest.fixture
def round_output(monkeypatch):  # type: ignore[no-untyped-def]
    return _one_round(monkeypatch)


def _one_round(monkeypatch, *overrides: str):  # type: ignore[no-untyped-def]
    """One split training round of client 0: (config, Flower reply, trunk clients, client keys)."""
    cfg = load_config("configs/tiny.toml", [*SPLIT, *overrides])
    state = initial_adapter_state(cfg.model, seed=cfg.seed)
    hook = SplitRounds(cfg, state)
    monkeypatch.setattr(split_client, "TrunkClient", _Recording)
    for field in ("_run_id", "_node_id", "_task_id"):  # what Flower's runtime sets in its processes
        monkeypatch.setattr(TaskIdentity, field, 1)
    _Recording.made = []
    try:
        client_part = hook.client_state(state)
        inst = Instruction(
            job=Job.SPLIT,
            server_round=1,
            config=cfg,
            adapter=to_record(client_part, "float32"),
            **hook.instruction_fields(),
        )
        msg = instruction_message(inst, MessageType.TRAIN, 1)
        context = Context(1, 1, {"partition-id": 0, "num-partitions": 3}, RecordDict(), {})
        reply = client_app.train_handler(msg, context)
    finally:
        hook.stop()
    return cfg, reply, _Recording.made, set(client_part)


def test_trunk_messages_carry_only_float_activations_gradients_and_int64_counts(round_output) -> None:
    cfg, _, clients, _ = round_output
    (client,) = clients
    sent = client.audit
    assert [m.kind for m in sent] == ["FORWARD", "BACKWARD"] * cfg.train.max_steps  # type: ignore[operator]
    for message in sent:
        names = {t.name: t for t in message.tensors}
        if message.kind == "FORWARD":
            assert set(names) == {"hidden", "valid"}
            assert names["hidden"].dtype == "float32" and names["hidden"].shape[-1] == 64
            assert names["valid"].dtype == "int64" and len(names["valid"].shape) == 1
        else:
            assert set(names) == {"grad"} and names["grad"].dtype == "float32"
        assert set(message.header) <= {"v", "kind", "step", "tensors", "train"}

    # nothing of the client's data is in the bytes: token ids (as int64 or int32), labels, text
    wire = b"".join(m.wire or b"" for m in sent)
    tokenizer = load_tokenizer(cfg.model)
    train, _ = client_tokenized(cfg, tokenizer, 0)
    conversations, _ = client_conversations(cfg, 0)
    for example in train.select(range(len(train))):
        ids = [t for t in example["input_ids"] if t != tokenizer.pad_token_id][:6]
        for dtype in (np.int64, np.int32):
            assert np.asarray(ids, dtype=dtype).tobytes() not in wire
        labels = [t for t in example["labels"] if t != -100][:6]
        assert np.asarray(labels, dtype=np.int64).tobytes() not in wire
    for conversation in conversations:
        for turn in conversation["messages"]:
            text = turn["content"].encode()
            if len(text) >= 8:
                assert text[:16] not in wire


def test_flower_reply_carries_the_client_side_adapter_and_numeric_metrics_only(round_output) -> None:
    _, reply, _, client_keys = round_output
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    arrays: ArrayRecord = reply.content["arrays"]  # type: ignore[assignment]
    fmt, tensors = unpack(arrays)
    assert {t.key for t in tensors} == client_keys  # head + tail LoRA, never the trunk's
    assert fmt in ("float16", "float32")  # float values only
    metrics: MetricRecord = reply.content["metrics"]  # type: ignore[assignment]
    assert all(isinstance(v, int | float) for v in metrics.values())
    parsed = TrainReply.from_content(reply.content)
    assert (
        parsed.trunk_bytes_up
        and parsed.trunk_bytes_up > 0
        and torch.isfinite(torch.tensor(parsed.train_loss))
    )


def _first_h1(client: TrunkClient) -> torch.Tensor:
    from fedtune.split import protocol as wire

    first = client.audit[0]
    assert first.kind == "FORWARD" and first.wire is not None
    return wire.decode(first.wire, wire.Limits(64)).tensors["hidden"]


def test_split_protect_noises_what_leaves_the_client(monkeypatch) -> None:
    clean = _first_h1(_one_round(monkeypatch)[2][0])
    again = _first_h1(_one_round(monkeypatch)[2][0])
    noised = _first_h1(_one_round(monkeypatch, "split.protect.activation_sigma=1.0")[2][0])
    per_channel = _first_h1(
        _one_round(
            monkeypatch, "split.protect.activation_sigma=1.0", "split.protect.activation_scale='channel'"
        )[2][0]
    )
    assert not torch.allclose(per_channel, noised)  # the scale setting reaches the client
    torch.testing.assert_close(again, clean)  # the same round sends the same h1 without noise
    relative = float((noised - clean).norm() / clean.norm())
    assert 0.5 < relative < 1.5  # noise std = 1.0 x each sample's RMS


def test_int8_split_reply_is_the_head_and_tail_update(monkeypatch) -> None:
    # Prepare / Execute: a split round with int8 replies (the instruction's adapter in float32)
    _, reply, _, client_keys = _one_round(monkeypatch, "fed.wire_dtype='int8'")

    # Assert: head + tail only, one int8 array each, marked as the update (trained - sent)
    parsed = TrainReply.from_content(reply.content)
    fmt, tensors = unpack(parsed.adapter)
    assert {t.key for t in tensors} == client_keys and parsed.delta == 1
    assert fmt == "int8.b64"
