"""Heterogeneous ranks through the strategies: exact stacking, both continuations, zero-padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federated.fakes import NODE, send, train_reply
from fedtune.config import LoraConfig, ModelConfig, load_config
from fedtune.errors import FedtuneError
from fedtune.federated.aggregation.ranks import aggregate_delta, fuse
from fedtune.federated.protocol import Job
from fedtune.federated.records import from_record
from fedtune.federated.strategies import build_strategy, check_strategy
from fedtune.federated.strategies.ranks import state_rank
from fedtune.models.adapters import activate, attach_lora, ensure_adapter, load_adapter_state
from fedtune.models.load import load_model

OUT, IN = 6, 10  # a non-square module


def _adapter(rng: np.random.Generator, rank: int) -> dict[str, np.ndarray]:
    return {
        "m.lora_A.weight": rng.normal(size=(rank, IN)).astype(np.float32),
        "m.lora_B.weight": rng.normal(size=(OUT, rank)).astype(np.float32),
    }


def _strategy(name: str, ranks: list[int], *extra: str):
    cfg = load_config(
        "configs/tiny.toml",
        [f"partition.num_partitions={len(ranks)}", f"model.lora.ranks={ranks}", "model.lora.alpha=16",
         f"fed.strategy='{name}'", "fed.wire_dtype='float32'", *extra],
    )  # fmt: skip
    return build_strategy(cfg, {NODE + i: i for i in range(len(ranks))})


def _round(strategy, server_round: int, global_state, updates, sizes):
    """One train phase; returns (aggregate, {pid: (start state, instruction)})."""
    sent = send(strategy, server_round, global_state)
    starts = {pid: (from_record(inst.adapter), inst) for pid, (inst, _) in sent.items()}
    replies = [train_reply(msg, pid, updates[pid], sizes[pid]) for pid, (_, msg) in sent.items()]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return from_record(arrays), starts


def _exact(updates, sizes, ranks, alpha=16.0):
    p = np.asarray(sizes, dtype=np.float64) / sum(sizes)
    return sum(p[k] * (alpha / ranks[k]) * updates[k]["m.lora_B.weight"].astype(np.float64)
               @ updates[k]["m.lora_A.weight"] for k in range(len(ranks)))  # fmt: skip


def _zero_start() -> dict[str, np.ndarray]:
    """A fresh rank-4 adapter as the run starts: A set, B zero (no update yet)."""
    return {
        "m.lora_A.weight": np.ones((4, IN), np.float32),
        "m.lora_B.weight": np.zeros((OUT, 4), np.float32),
    }


def _dw(state):
    return state["m.lora_B.weight"].astype(np.float64) @ state["m.lora_A.weight"]


def test_stack_merge_is_exact_and_accumulates() -> None:
    rng = np.random.default_rng(0)
    ranks, sizes = [8, 4, 2], [30, 20, 10]
    strategy = _strategy("stack", ranks)
    zero = _zero_start()
    ups1 = [_adapter(rng, r) for r in ranks]
    g1, starts = _round(strategy, 1, zero, ups1, sizes)
    np.testing.assert_allclose(_dw(g1), _exact(ups1, sizes, ranks), atol=1e-5)
    assert state_rank(g1) == sum(ranks)
    assert all(inst.frozen is None for _, inst in starts.values())  # nothing to merge yet
    ups2 = [_adapter(rng, r) for r in ranks]
    g2, starts = _round(strategy, 2, g1, ups2, sizes)
    np.testing.assert_allclose(_dw(g2), _exact(ups1, sizes, ranks) + _exact(ups2, sizes, ranks), atol=1e-4)
    # round 2: fresh rank-r_k adapters (B = 0) on top of the frozen global update
    for pid, (start, inst) in starts.items():
        assert inst.job is Job.RANKED and inst.rank == ranks[pid]
        assert start["m.lora_A.weight"].shape == (ranks[pid], IN) and not start["m.lora_B.weight"].any()
        # merge mode sends the stack as a whole the first time (the client caches it)
        assert inst.frozen_from == 0 and inst.frozen_rank == state_rank(g1)
        np.testing.assert_allclose(_dw(from_record(inst.frozen)), _dw(g1), atol=1e-5)


def test_stack_svd_warm_start_projects_to_each_rank() -> None:
    rng = np.random.default_rng(1)
    ranks, sizes = [4, 2, 1], [1, 1, 1]
    strategy = _strategy("stack", ranks, "fed.stack_mode='svd'")
    zero = _zero_start()
    ups = [_adapter(rng, r) for r in ranks]
    g1, _ = _round(strategy, 1, zero, ups, sizes)
    delta = _exact(ups, sizes, ranks)
    np.testing.assert_allclose(_dw(g1), delta, atol=1e-5)
    _, starts = _round(strategy, 2, g1, ups, sizes)
    u, s, vt = np.linalg.svd(delta)
    for pid, (start, inst) in starts.items():
        r = ranks[pid]
        best = (u[:, :r] * s[:r]) @ vt[:r]
        np.testing.assert_allclose((16.0 / r) * _dw(start), best, atol=1e-4)
        assert inst.frozen is None and inst.frozen_rank is None


def test_zero_pad_is_the_inexact_baseline() -> None:
    rng = np.random.default_rng(2)
    ranks, sizes = [4, 2], [1, 1]
    strategy = _strategy("zero-pad", ranks)
    zero = _zero_start()
    ups = [_adapter(rng, r) for r in ranks]
    g1, _ = _round(strategy, 1, zero, ups, sizes)
    assert state_rank(g1) == 4
    evaluate = send(strategy, 1, g1, train=False)
    assert {(inst.job, inst.rank) for inst, _ in evaluate.values()} == {(Job.GLOBAL, 4)}
    # (B_pad mean)(A_pad mean) != mean of the products: the cross terms stay
    assert not np.allclose(_dw(g1), _exact(ups, sizes, ranks), atol=1e-3)
    a = np.zeros((4, IN))
    b = np.zeros((OUT, 4))
    for k, r in enumerate(ranks):
        a[:r] += 0.5 * (16.0 / r) * ups[k]["m.lora_A.weight"]
        b[:, :r] += 0.5 * ups[k]["m.lora_B.weight"]
    np.testing.assert_allclose(_dw(g1), b @ a, atol=1e-4)


def test_ranks_need_a_heterogeneous_strategy_and_one_rank_per_client() -> None:
    with pytest.raises(FedtuneError, match=r"model\.lora\.ranks: per-client ranks need"):
        _strategy("fedavg", [4, 2])
    cfg = load_config("configs/tiny.toml", ["model.lora.ranks=[4, 2]", "fed.strategy='stack'"])  # 3 clients
    with pytest.raises(FedtuneError, match=r"model\.lora\.ranks: 2 ranks for 3 clients"):
        check_strategy(cfg)


def test_peft_applies_the_fused_adapter_as_the_sum_of_two() -> None:
    """Client side: a stacked adapter at scaling 1 in peft == two adapters active together."""
    tiny = ModelConfig(
        name="tiny-llama", lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    )
    model = attach_lora(load_model(tiny), tiny.lora, seed=0)
    ensure_adapter(model, "two", tiny.lora.model_copy(update={"r": 2, "alpha": 8}))
    g = {k: torch.randn_like(v) * 0.1 for k, v in from_torch(model, "default").items()}
    p = {k: torch.randn_like(v) * 0.1 for k, v in from_torch(model, "two").items()}
    load_adapter_state(model, g, "default")
    load_adapter_state(model, p, "two")
    ids = torch.tensor([[1, 5, 9, 3]])
    activate(model, ["default", "two"], trainable=None)
    with torch.no_grad():
        both = model(ids).logits
    fused = fuse({k: v.numpy() for k, v in g.items()}, 8 / 4, {k: v.numpy() for k, v in p.items()}, 8 / 2)
    ensure_adapter(model, "fused", tiny.lora.model_copy(update={"r": 6, "alpha": 6}))
    load_adapter_state(model, {k: torch.from_numpy(v) for k, v in fused.items()}, "fused")
    activate(model, ["fused"], trainable=None)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, both, atol=1e-5, rtol=1e-4)
    assert aggregate_delta([fused], [1.0], [1.0]).keys()


def from_torch(model, name):
    from fedtune.models.adapters import adapter_state

    return adapter_state(model, name)
