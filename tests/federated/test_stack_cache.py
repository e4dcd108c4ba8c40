"""FLoRA merge mode: clients keep the stack; the server sends only what was stacked since."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federated.fakes import eval_round
from federated.strategies.test_ranked import _adapter, _round, _strategy, _zero_start
from fedtune.errors import FedtuneError
from fedtune.federated import stack_cache
from fedtune.federated.records import from_record, to_torch


def test_tail_and_extend_are_inverse_by_hand() -> None:
    state = {
        "m.lora_A.weight": np.arange(10.0).reshape(5, 2),
        "m.lora_B.weight": np.arange(15.0).reshape(3, 5),
    }
    tail = stack_cache.tail(state, 3)
    np.testing.assert_array_equal(tail["m.lora_A.weight"], [[6.0, 7.0], [8.0, 9.0]])
    np.testing.assert_array_equal(tail["m.lora_B.weight"], [[3.0, 4.0], [8.0, 9.0], [13.0, 14.0]])
    head = {"m.lora_A.weight": torch.tensor(state["m.lora_A.weight"][:3]),
            "m.lora_B.weight": torch.tensor(state["m.lora_B.weight"][:, :3])}  # fmt: skip
    whole = stack_cache.extend(head, to_torch(tail))
    assert all(np.array_equal(whole[k].numpy(), v) for k, v in state.items())
    assert stack_cache.uniform_rank(state) == 5


def test_receive_builds_on_the_cached_stack_and_refuses_a_missing_one(tmp_path) -> None:
    first = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2)}
    more = {"m.lora_A.weight": torch.full((1, 3), 2.0), "m.lora_B.weight": torch.full((4, 1), 2.0)}
    with pytest.raises(FedtuneError, match="holds no stack"):
        stack_cache.receive(more, 2, tmp_path, 0)
    assert stack_cache.receive(first, None, tmp_path, 0)["m.lora_A.weight"].shape == (2, 3)
    got = stack_cache.receive(more, 2, tmp_path, 0)
    assert got["m.lora_A.weight"].tolist() == [[1.0] * 3, [1.0] * 3, [2.0] * 3]
    assert stack_cache.load(tmp_path, 0)["m.lora_B.weight"].shape == (4, 3)  # cached for next time
    assert stack_cache.receive(None, 3, tmp_path, 0)["m.lora_B.weight"].shape == (4, 3)  # nothing new
    with pytest.raises(FedtuneError, match="holds rank 3"):
        stack_cache.receive(more, 2, tmp_path, 0)


@pytest.fixture
def _task_identity():
    from federated.fakes import task_identity

    yield from task_identity()


@pytest.mark.usefixtures("_task_identity")
def test_merge_mode_sends_each_client_only_what_it_lacks() -> None:
    rng = np.random.default_rng(0)
    ranks, sizes = [4, 2], [1, 1]
    strategy = _strategy("stack", ranks)
    zero = _zero_start()
    start = eval_round(strategy, 0, zero)  # the zero start is not part of the stack to come
    assert all(inst.adapter_from is None for inst in start.values())
    g1, _ = _round(strategy, 1, zero, [_adapter(rng, r) for r in ranks], sizes)
    first = eval_round(strategy, 1, g1, fail={1})  # client 1's reply is lost
    assert all(inst.adapter_from == 0 for inst in first.values())  # whole: nobody held any
    # round 2: client 0 holds the rank-6 stack (nothing new to send), client 1 gets it whole
    g2, starts = _round(strategy, 2, g1, [_adapter(rng, r) for r in ranks], sizes)
    (_, c0), (_, c1) = starts[0], starts[1]
    assert c0.frozen_from == 6 and c0.frozen is None
    assert c1.frozen_from == 0 and from_record(c1.frozen).keys() == g1.keys()
    # evaluation after round 2: both hold rank 6 now and get only the 6 new ranks
    second = eval_round(strategy, 2, g2)
    for inst in second.values():
        assert inst.adapter_from == 6
        tail = from_record(inst.adapter)
        assert tail["m.lora_A.weight"].shape == (6, 10) and tail["m.lora_B.weight"].shape == (6, 6)
        held = {k: torch.tensor(v) for k, v in g1.items()}
        whole = stack_cache.extend(held, to_torch(tail))
        assert all(np.array_equal(whole[k].numpy(), v) for k, v in g2.items())  # exact, prefix unchanged
