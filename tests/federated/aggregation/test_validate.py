import math

import numpy as np
import pytest

from fedtune.errors import FedtuneError
from fedtune.federated.aggregation.fedavg import fedavg
from fedtune.federated.aggregation.validate import check_update, clip_update, filter_updates, update_norm

REF = {
    "a": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32),
    "b": np.array([0.0, 0.0], dtype=np.float32),
}
# Differences from REF: a + [[3, 0, 0], [0, 0, 0]], b + [0, 4] -> norm sqrt(9 + 16) = 5.
UPD = {
    "a": np.array([[4.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32),
    "b": np.array([0.0, 4.0], dtype=np.float32),
}


def test_check_update_accepts_a_good_update() -> None:
    check_update(UPD, REF, where="client 0")


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"a": REF["a"]}, "client 3: missing key b"),
        ({**REF, "c": REF["b"]}, "client 3: unexpected key c"),
        ({**REF, "a": np.zeros((3, 2), np.float32)}, r"client 3: a has shape \(3, 2\)"),
        ({**REF, "b": np.array([0, 1])}, "client 3: b has dtype int"),
        ({**REF, "b": np.array([np.nan, np.inf], np.float32)}, "client 3: b has 2 non-finite"),
    ],
)
def test_check_update_names_the_client_and_key(update: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(FedtuneError, match=match):
        check_update(update, REF, where="client 3")


def test_update_norm_and_clip_hand_worked() -> None:
    assert update_norm(UPD, REF) == pytest.approx(5.0)
    assert update_norm(REF, REF) == 0.0
    # Clipping to 2.5 halves the difference: a + [[1.5, 0, 0], ...], b + [0, 2].
    clipped = clip_update(UPD, REF, max_norm=2.5)
    np.testing.assert_allclose(clipped["a"], [[2.5, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_allclose(clipped["b"], [0.0, 2.0])
    assert update_norm(clipped, REF) == pytest.approx(2.5)
    # Under the limit: unchanged.
    np.testing.assert_array_equal(clip_update(UPD, REF, max_norm=10.0)["a"], UPD["a"])


def test_filter_updates_hand_worked_norms() -> None:
    # Norms 5, 5, 15 (3x): with factor 2 the median of the others is 5 for the third
    # (rejected) and 10 for the first two (kept).
    big = {"a": REF["a"] + 3 * (UPD["a"] - REF["a"]), "b": 3 * UPD["b"]}
    kept, reasons = filter_updates(
        [UPD, UPD, big], REF, where=["c0", "c1", "c2"], max_norm=None, norm_factor=2
    )
    assert kept == [0, 1]
    assert reasons == ["c2: huge-norm: norm 15 > 2 × median 5 of the others"]
    kept, reasons = filter_updates([UPD, big], REF, where=["c0", "c1"], max_norm=10.0, norm_factor=None)
    assert kept == [0]
    assert reasons == ["c1: over max_norm: norm 15 > 10"]
    # A single update has no others to compare with.
    assert filter_updates([big], REF, where=["c0"], max_norm=None, norm_factor=2) == ([0], [])


def test_filter_rejects_bad_updates_and_fedavg_of_kept_equals_fedavg_of_good() -> None:
    rng = np.random.default_rng(0)
    ref = {"a": rng.normal(size=(4, 8)).astype(np.float32), "b": rng.normal(size=(8, 4)).astype(np.float32)}

    def noisy(scale: float) -> dict[str, np.ndarray]:
        return {k: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in ref.items()}

    good = [noisy(0.1) for _ in range(4)]
    nan = noisy(0.1)
    nan["a"][1, 2] = np.nan
    wrong_shape = {**noisy(0.1), "b": np.zeros((4, 8), np.float32)}
    huge = noisy(100.0)
    updates = [good[0], nan, good[1], wrong_shape, good[2], huge, good[3]]
    where = [f"client {i}" for i in range(len(updates))]

    kept, reasons = filter_updates(updates, ref, where=where, max_norm=None, norm_factor=5.0)

    assert kept == [0, 2, 4, 6]
    assert len(reasons) == 3
    assert reasons[0].startswith("invalid: client 1: a has 1 non-finite")
    assert reasons[1].startswith("invalid: client 3: b has shape (4, 8)")
    assert reasons[2].startswith("client 5: huge-norm")
    weights = [10, 20, 30, 40, 50, 60, 70]
    from_kept = fedavg([updates[i] for i in kept], [weights[i] for i in kept])
    from_good = fedavg(good, [10, 30, 50, 70])
    assert set(from_kept) == set(from_good)
    for key in from_good:
        np.testing.assert_array_equal(from_kept[key], from_good[key])
    assert all(math.isfinite(update_norm(updates[i], ref)) for i in kept)
