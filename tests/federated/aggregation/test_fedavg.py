import numpy as np
import pytest

from fedtune.errors import FedtuneError
from fedtune.federated.aggregation.fedavg import fedavg, weighted_mean


def test_fedavg_hand_worked() -> None:
    w0 = {"a": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([[0.0]], dtype=np.float32)}
    w1 = {"a": np.array([4.0, 8.0], dtype=np.float32), "b": np.array([[3.0]], dtype=np.float32)}
    out = fedavg([w0, w1], [1, 2])
    # (w0 * 1 + w1 * 2) / 3
    np.testing.assert_allclose(out["a"], [(1 + 8) / 3, (2 + 16) / 3], rtol=1e-7)
    np.testing.assert_allclose(out["b"], [[2.0]])
    assert out["a"].dtype == np.float32


def test_fedavg_single_client_is_identity() -> None:
    w = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    np.testing.assert_array_equal(fedavg([w], [5])["a"], w["a"])


def test_fedavg_is_order_independent_up_to_rounding() -> None:
    rng = np.random.default_rng(0)
    states = [{"a": rng.normal(size=(4, 4)).astype(np.float32)} for _ in range(5)]
    weights = [3, 1, 4, 1, 5]
    a = fedavg(states, weights)["a"]
    b = fedavg(states[::-1], weights[::-1])["a"]
    np.testing.assert_allclose(a, b, atol=1e-7)


def test_fedavg_rejects_mismatched_updates() -> None:
    with pytest.raises(FedtuneError, match="keys differ"):
        fedavg([{"a": np.zeros(2)}, {"b": np.zeros(2)}], [1, 1])
    with pytest.raises(FedtuneError, match="shape"):
        fedavg([{"a": np.zeros(2)}, {"a": np.zeros(3)}], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        fedavg([{"a": np.zeros(2)}], [0])


def test_weighted_mean() -> None:
    assert weighted_mean([1.0, 4.0], [3, 1]) == pytest.approx((1 * 3 + 4 * 1) / 4)
