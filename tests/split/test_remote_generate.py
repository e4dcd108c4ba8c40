"""KV-cached generation across the transport: the trunk's cache lives in the service's session.

The service runs in this process on loopback with the trunk of the conftest Llama; the client
keeps its own copy's head and tail (and its trunk, as the local reference).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import pytest
import torch

from fedtune.split import RemoteTrunk, cut_model, split_generate
from fedtune.split import protocol as wire
from fedtune.split.client import SentMessage, TrunkClient, TrunkError
from fedtune.split.server import TrunkOptim, TrunkService, serve
from split.conftest import tiny_lora_model
from split.test_generate import NEW_TOKENS, _reference_generate

N_HEAD, N_TAIL, HIDDEN = 2, 2, 64  # the conftest Llama: 6 layers, 64 wide -> a 2-block trunk
LONG, SHORT = torch.tensor([5, 17, 99, 42, 7, 64]), torch.tensor([11, 3, 80])
PADDED = torch.stack([LONG, torch.cat([SHORT, torch.zeros(3, dtype=torch.long)])])  # right-padded to 6
VALID = torch.tensor([6, 3])


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """A service on loopback running the trunk; it never trains (generation only)."""
    _, trunk, _ = cut_model(tiny_lora_model("llama"), N_HEAD, N_TAIL)
    service = TrunkService(trunk, TrunkOptim(step_every=0))
    server, port = serve(service)
    yield f"127.0.0.1:{port}"
    assert not service._lease.locked()  # every generation step gave the trunk back
    server.stop(0).wait()


@pytest.fixture(scope="module")
def parts() -> tuple[torch.nn.Module, ...]:
    """The client's own copy, cut: (head, trunk, tail); the trunk is the local reference only."""
    return tuple(cut_model(tiny_lora_model("llama"), N_HEAD, N_TAIL))


def _generate_remotely(address: str, parts: tuple[torch.nn.Module, ...]) -> tuple[list, list[SentMessage]]:
    head, _, tail = parts
    with TrunkClient(address, HIDDEN, keep_wire=True) as client:
        tokens = split_generate(head, RemoteTrunk(client), tail, PADDED, NEW_TOKENS, valid=VALID)
    return tokens, client.audit


def _patched(data: bytes, **changes: object) -> bytes:
    """``data`` with header fields changed, as a sender that bypasses ``encode`` could send it."""
    header, offset = wire.read_header(data, wire.Limits(HIDDEN))
    head = json.dumps({**header, **changes}).encode()
    return struct.pack(">I", len(head)) + head + data[offset:]


def _h1(t: int) -> torch.Tensor:
    return torch.randn(2, t, HIDDEN, generator=torch.Generator().manual_seed(t))


def test_remote_generation_equals_local_split_and_unsplit(address, parts):
    # Prepare
    reference = tiny_lora_model("llama")
    head, trunk, tail = parts
    # Execute
    remote, _ = _generate_remotely(address, parts)
    local = split_generate(head, trunk, tail, PADDED, NEW_TOKENS, valid=VALID)
    unsplit = [_reference_generate(reference, LONG, None), _reference_generate(reference, SHORT, None)]
    # Assert: token for token, each sample of the padded batch as if alone
    assert [len(tokens) for tokens in unsplit] == [NEW_TOKENS, NEW_TOKENS]
    assert remote == local == unsplit


def test_generation_audit_only_float_hidden_and_int64_counts(address, parts):
    # Execute
    tokens, audit = _generate_remotely(address, parts)
    # Assert: a prefill, then one decode step per further token (the last token needs no forward)
    assert [m.kind for m in audit] == ["FORWARD"] * NEW_TOKENS
    assert [m.header["cache"] for m in audit] == ["new"] + ["append"] * (NEW_TOKENS - 1)
    assert all(m.header["train"] is False for m in audit)
    assert all(set(m.header) <= {"v", "kind", "step", "tensors", "train", "cache"} for m in audit)
    for i, message in enumerate(audit):
        width = 6 if i == 0 else 1  # the padded prompt, then one token per sample
        assert [(t.name, t.dtype, t.shape) for t in message.tensors] == [
            ("hidden", "float32", (2, width, HIDDEN)),
            ("valid", "int64", (2,)),
        ]
    # the counts are the total lengths so far: prompts of 6 and 3, one more per step
    sent = [wire.decode(m.wire, wire.Limits(HIDDEN)) for m in audit if m.wire is not None]
    assert [m.tensors["valid"].tolist() for m in sent] == [[6 + i, 3 + i] for i in range(NEW_TOKENS)]
    # neither the prompts nor the generated tokens appear anywhere in the bytes, in any integer width
    for secret in (PADDED, torch.tensor(tokens)):
        for dtype in (torch.int64, torch.int32):
            for row in secret.to(dtype):
                assert all(row.numpy().tobytes() not in m.wire for m in audit if m.wire is not None)


def test_append_without_prefill_gets_error_and_the_session_keeps_serving(address, parts):
    head, trunk, tail = parts
    with TrunkClient(address, HIDDEN) as client:
        # Execute / Assert: a decode step with no cache behind it
        with pytest.raises(TrunkError, match=r"header\.cache: append without a prefill"):
            client.forward(_h1(1), torch.tensor([7, 4]), train=False, cache="append")
        # the same stream then generates as a fresh one would
        tokens = split_generate(head, RemoteTrunk(client), tail, PADDED, NEW_TOKENS, valid=VALID)
    assert tokens == split_generate(head, trunk, tail, PADDED, NEW_TOKENS, valid=VALID)


def test_an_error_drops_the_sessions_cache(address):
    with TrunkClient(address, HIDDEN) as client:
        client.forward(_h1(6), VALID, train=False, cache="new")
        # Execute: a decode step whose counts skip a token (the next lengths are 7 and 4) ...
        with pytest.raises(TrunkError, match=r"do not continue the cached prompt \(expected \[7, 4\]\)"):
            client.forward(_h1(1), torch.tensor([8, 5]), train=False, cache="append")
        # ... leaves no cache to continue, even with the right counts
        with pytest.raises(TrunkError, match="append without a prefill"):
            client.forward(_h1(1), torch.tensor([7, 4]), train=False, cache="append")
        # a new prefill starts over
        client.forward(_h1(6), VALID, train=False, cache="new")
        h2 = client.forward(_h1(1), torch.tensor([7, 4]), train=False, cache="append")
    assert h2.shape == (2, 1, HIDDEN)


@pytest.mark.parametrize(("changes", "field"), [
    ({"cache": "reset"}, "header.cache: must be one of ['new', 'append'], got 'reset'"),
    ({"train": True}, "allowed on FORWARD with train=false only, not on FORWARD with train=true"),
])  # fmt: skip
def test_bad_cache_field_on_the_wire_gets_error_and_the_stream_lives(address, changes, field):
    with TrunkClient(address, HIDDEN) as client:
        good = wire.encode(wire.forward(1, _h1(6), VALID, train=False, cache="new"), client.limits)
        # Execute
        reply = client.exchange(_patched(good, **changes))
        after = client.exchange(good)
    # Assert
    assert reply.kind is wire.Kind.ERROR and field in reply.error
    assert after.kind is wire.Kind.ACTIVATION and after.tensors["hidden"].shape == (2, 6, HIDDEN)


def test_client_refuses_a_cache_on_a_training_forward_before_sending(address):
    with TrunkClient(address, HIDDEN) as client, pytest.raises(ValueError, match="needs train=False"):
        client.forward(_h1(6), VALID, cache="new")
    assert client.audit == []


def test_remote_trunk_refuses_a_cache_replaced_by_a_newer_prefill(address):
    with TrunkClient(address, HIDDEN) as client:
        trunk = RemoteTrunk(client)
        first, second = trunk.new_cache(), trunk.new_cache()
        trunk(_h1(6), VALID, cache=first)
        trunk(_h1(6), VALID, cache=second)  # the session now holds this one's cache
        # Execute / Assert: decoding on the first would run on the second's prompt
        with pytest.raises(RuntimeError, match="session state is gone"):
            trunk(_h1(1), torch.tensor([7, 4]), cache=first)
        h2 = trunk(_h1(1), torch.tensor([7, 4]), cache=second)
    assert [m.header["cache"] for m in client.audit] == ["new", "new", "append"]
    assert h2.shape == (2, 1, HIDDEN)
