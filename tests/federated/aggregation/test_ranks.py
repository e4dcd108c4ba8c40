import numpy as np
import pytest

from fedtune.errors import FedtuneError
from fedtune.federated.aggregation.fedavg import fedavg
from fedtune.federated.aggregation.ranks import (
    aggregate_delta,
    delta_w,
    fuse,
    lora_modules,
    module_ranks,
    project,
    rank_rule,
    stack,
    stacked_rank,
    zero_pad,
)

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"


def adapter(prefix: str, a: list[list[float]], b: list[list[float]]) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.lora_A.weight": np.array(a, dtype=np.float32),
        f"{prefix}.lora_B.weight": np.array(b, dtype=np.float32),
    }


def product(state: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    return state[f"{prefix}.lora_B.weight"].astype(np.float64) @ state[f"{prefix}.lora_A.weight"]


# Two clients on one 3 -> 2 module: client 0 rank 1, client 1 rank 2.
#   B0 A0 = [[1, 0, 0], [0, 0, 0]]      B1 A1 = [[0, 0, 0], [0, 1, 1]]
C0 = adapter(Q, a=[[1, 0, 0]], b=[[1], [0]])
C1 = adapter(Q, a=[[0, 1, 0], [0, 0, 1]], b=[[0, 0], [1, 1]])


def test_lora_modules_groups_factors_and_checks_them() -> None:
    modules = lora_modules(C1)
    assert list(modules) == [Q]
    np.testing.assert_array_equal(modules[Q][0], [[0, 1, 0], [0, 0, 1]])
    assert module_ranks(C1) == {Q: 2}
    with pytest.raises(FedtuneError, match=r"no matching .*lora_B"):
        lora_modules({f"{Q}.lora_A.weight": np.zeros((2, 3))})
    with pytest.raises(FedtuneError, match=r"rank 2 .* rank 1"):
        lora_modules({f"{Q}.lora_A.weight": np.zeros((2, 3)), f"{Q}.lora_B.weight": np.zeros((2, 1))})
    with pytest.raises(FedtuneError, match="not a LoRA factor"):
        lora_modules({f"{Q}.weight": np.zeros((2, 3))})


def test_delta_w_hand_worked() -> None:
    # 0.5 * [[1], [2]] @ [[1, 0, 3]] = [[0.5, 0, 1.5], [1, 0, 3]]
    out = delta_w(np.array([[1.0, 0.0, 3.0]]), np.array([[1.0], [2.0]]), 0.5)
    np.testing.assert_allclose(out, [[0.5, 0.0, 1.5], [1.0, 0.0, 3.0]])


def test_stack_hand_worked() -> None:
    # Weights 1:3 -> p = (0.25, 0.75); scalings 2 and 0.5 -> p s = (0.5, 0.375).
    out = stack([C0, C1], weights=[1, 3], scalings=[2.0, 0.5])
    np.testing.assert_allclose(
        out[f"{Q}.lora_A.weight"], [[0.5, 0, 0], [0, 0.375, 0], [0, 0, 0.375]], rtol=1e-7
    )
    np.testing.assert_array_equal(out[f"{Q}.lora_B.weight"], [[1, 0, 0], [0, 1, 1]])
    # 0.5 * B0 A0 + 0.375 * B1 A1
    np.testing.assert_allclose(product(out, Q), [[0.5, 0, 0], [0, 0.375, 0.375]], rtol=1e-7)
    assert out[f"{Q}.lora_A.weight"].dtype == np.float32
    assert stacked_rank([C0, C1]) == 3


def test_zero_pad_hand_worked_is_not_exact() -> None:
    out = zero_pad([C0, C1], weights=[1, 1], scalings=[1.0, 1.0])
    # A = 0.5 ([[1, 0, 0], [0, 0, 0]] + A1), B = 0.5 ([[1, 0], [0, 0]] + B1)
    np.testing.assert_allclose(out[f"{Q}.lora_A.weight"], [[0.5, 0.5, 0], [0, 0, 0.5]])
    np.testing.assert_allclose(out[f"{Q}.lora_B.weight"], [[0.5, 0], [0.5, 0.5]])
    # B @ A = [[0.25, 0.25, 0], [0.25, 0.25, 0.25]] (cross terms), but the exact
    # average 0.5 (B0 A0 + B1 A1) is [[0.5, 0, 0], [0, 0.5, 0.5]].
    np.testing.assert_allclose(product(out, Q), [[0.25, 0.25, 0], [0.25, 0.25, 0.25]])
    np.testing.assert_allclose(aggregate_delta([C0, C1], [1, 1], [1.0, 1.0])[Q], [[0.5, 0, 0], [0, 0.5, 0.5]])


def test_zero_pad_with_equal_ranks_is_fedavg_of_folded_factors() -> None:
    rng = np.random.default_rng(1)
    states = [
        {
            f"{Q}.lora_A.weight": rng.normal(size=(2, 3)).astype(np.float32),
            f"{Q}.lora_B.weight": rng.normal(size=(4, 2)).astype(np.float32),
        }
        for _ in range(3)
    ]
    scalings = [2.0, 0.5, 1.0]
    folded = [
        {f"{Q}.lora_A.weight": s * st[f"{Q}.lora_A.weight"], f"{Q}.lora_B.weight": st[f"{Q}.lora_B.weight"]}
        for st, s in zip(states, scalings, strict=True)
    ]
    out = zero_pad(states, [3, 1, 2], scalings)
    expected = fedavg(folded, [3, 1, 2])
    for key in expected:
        np.testing.assert_allclose(out[key], expected[key], rtol=1e-6, atol=1e-7)


def test_fuse_hand_worked() -> None:
    # 2 * B0 A0 + 0.5 * B1 A1 = [[2, 0, 0], [0, 0.5, 0.5]]
    out = fuse(C0, 2.0, C1, 0.5)
    assert out[f"{Q}.lora_A.weight"].shape == (3, 3)
    np.testing.assert_allclose(product(out, Q), [[2.0, 0.0, 0.0], [0.0, 0.5, 0.5]])


def test_project_hand_worked() -> None:
    # diag(3, 1, 0) padded to 2 x 3: the best rank-1 approximation keeps the 3.
    out = project({Q: np.array([[3.0, 0, 0], [0, 1, 0]])}, rank=1, scaling=0.5)
    np.testing.assert_allclose(0.5 * product(out, Q), [[3, 0, 0], [0, 0, 0]], atol=1e-6)
    # Rank above min(out, in): zero-padded, exact.
    out = project({Q: np.array([[3.0, 0, 0], [0, 1, 0]])}, rank=4, scaling=1.0)
    assert out[f"{Q}.lora_A.weight"].shape == (4, 3)
    np.testing.assert_allclose(product(out, Q), [[3, 0, 0], [0, 1, 0]], atol=1e-6)


def test_mismatched_clients_are_rejected() -> None:
    other = adapter(V, a=[[1, 0, 0]], b=[[1], [0]])
    with pytest.raises(FedtuneError, match="client 1: LoRA modules differ"):
        stack([C0, other], [1, 1], [1.0, 1.0])
    wider = adapter(Q, a=[[1, 0, 0, 0]], b=[[1], [0]])
    with pytest.raises(FedtuneError, match=r"client 1: .* maps 4 -> 2"):
        stack([C0, wider], [1, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        stack([C0, C1], [1], [1.0, 1.0])
    with pytest.raises(ValueError, match="nothing to aggregate"):
        stack([], [], [])


# The key property: 4 clients, ranks (8, 4, 2, 1), alpha/r differing, non-square modules.
SHAPES = {Q: (6, 10), V: (10, 4)}  # module -> (out, in)
RANKS = (8, 4, 2, 1)


def random_adapter(rng: np.random.Generator, rank: int) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for prefix, (out, inp) in SHAPES.items():
        state[f"{prefix}.lora_A.weight"] = rng.normal(size=(rank, inp)).astype(np.float32)
        state[f"{prefix}.lora_B.weight"] = rng.normal(size=(out, rank)).astype(np.float32)
    return state


@pytest.fixture
def clients() -> tuple[list[dict[str, np.ndarray]], list[float], list[float]]:
    rng = np.random.default_rng(0)
    states = [random_adapter(rng, r) for r in RANKS]
    alphas = (16.0, 4.0, 8.0, 1.0)
    scalings = [a / r for a, r in zip(alphas, RANKS, strict=True)]
    weights = rng.uniform(0.5, 3.0, size=4).tolist()
    return states, weights, scalings


def exact_sum(
    states: list[dict[str, np.ndarray]], weights: list[float], scalings: list[float], prefix: str
) -> np.ndarray:
    p = np.asarray(weights) / sum(weights)
    return sum(
        (
            pk * delta_w(st[f"{prefix}.lora_A.weight"], st[f"{prefix}.lora_B.weight"], s)
            for st, pk, s in zip(states, p, scalings, strict=True)
        ),
        start=np.zeros(SHAPES[prefix]),
    )


def test_stack_is_exact(clients: tuple[list[dict[str, np.ndarray]], list[float], list[float]]) -> None:
    states, weights, scalings = clients
    out = stack(states, weights, scalings)
    assert stacked_rank(states) == sum(RANKS) == 15
    for prefix, (rows, cols) in SHAPES.items():
        assert out[f"{prefix}.lora_A.weight"].shape == (15, cols)
        assert out[f"{prefix}.lora_B.weight"].shape == (rows, 15)
        np.testing.assert_allclose(
            product(out, prefix), exact_sum(states, weights, scalings, prefix), atol=1e-5
        )
    delta = aggregate_delta(states, weights, scalings)
    for prefix in SHAPES:
        np.testing.assert_allclose(delta[prefix], exact_sum(states, weights, scalings, prefix), atol=1e-5)


def test_fuse_is_exact(clients: tuple[list[dict[str, np.ndarray]], list[float], list[float]]) -> None:
    states, _, scalings = clients
    out = fuse(states[0], scalings[0], states[3], scalings[3])
    assert module_ranks(out) == {Q: 9, V: 9}
    for prefix in SHAPES:
        expected = exact_sum([states[0], states[3]], [1.0, 1.0], [2 * scalings[0], 2 * scalings[3]], prefix)
        np.testing.assert_allclose(product(out, prefix), expected, atol=1e-5)


def test_project_full_rank_and_truncation(
    clients: tuple[list[dict[str, np.ndarray]], list[float], list[float]],
) -> None:
    states, weights, scalings = clients
    delta = aggregate_delta(states, weights, scalings)
    full = project(delta, rank=10, scaling=2.0)  # 10 >= min(out, in) for both modules
    for prefix in SHAPES:
        np.testing.assert_allclose(2.0 * product(full, prefix), delta[prefix], atol=1e-5)
    low = project(delta, rank=3, scaling=0.25)
    for prefix in SHAPES:
        u, s, vt = np.linalg.svd(delta[prefix].astype(np.float64), full_matrices=False)
        truncated = u[:, :3] * s[:3] @ vt[:3]
        np.testing.assert_allclose(0.25 * product(low, prefix), truncated, atol=1e-5)


def test_zero_pad_differs_from_exact(
    clients: tuple[list[dict[str, np.ndarray]], list[float], list[float]],
) -> None:
    states, weights, scalings = clients
    out = zero_pad(states, weights, scalings)
    for prefix, (rows, cols) in SHAPES.items():
        assert out[f"{prefix}.lora_A.weight"].shape == (8, cols)
        assert out[f"{prefix}.lora_B.weight"].shape == (rows, 8)
        error = np.abs(product(out, prefix) - exact_sum(states, weights, scalings, prefix)).max()
        assert error > 0.1


def test_rank_rule() -> None:
    assert rank_rule("flora", 12) == [64, 32, 16, 16, 8, 8, 4, 4, 4, 4, 64, 32]
    assert rank_rule("flora", 3) == [64, 32, 16]
    assert rank_rule("uniform:8", 3) == [8, 8, 8]
    assert rank_rule([4, 2], 2) == [4, 2]
    with pytest.raises(FedtuneError, match=r"model\.lora\.ranks: 2 ranks for 3 clients"):
        rank_rule([4, 2], 3)
    with pytest.raises(FedtuneError, match=r"model\.lora\.ranks: client 1"):
        rank_rule([4, 0], 2)
    with pytest.raises(FedtuneError, match=r"model\.lora\.ranks: unknown rule"):
        rank_rule("uniform:0", 2)
    with pytest.raises(FedtuneError, match=r"model\.lora\.ranks: unknown rule"):
        rank_rule("hetlora", 2)
