from fedtune.federated.strategies.base import sample_clients


def test_full_participation_takes_everyone_in_order() -> None:
    assert sample_clients([3, 1, 2], 1.0, 1, seed=0, server_round=1) == [1, 2, 3]


def test_fraction_and_minimum() -> None:
    ids = range(10)
    assert len(sample_clients(ids, 0.3, 1, seed=0, server_round=1)) == 3  # floor(0.3 * 10)
    assert len(sample_clients(ids, 0.05, 2, seed=0, server_round=1)) == 2  # minimum wins
    assert len(sample_clients(ids, 0.5, 20, seed=0, server_round=1)) == 10  # capped at n


def test_sampling_is_reproducible_per_seed_and_round() -> None:
    a = sample_clients(range(10), 0.4, 1, seed=7, server_round=3)
    assert a == sample_clients(range(10), 0.4, 1, seed=7, server_round=3)
    others = {tuple(sample_clients(range(10), 0.4, 1, seed=7, server_round=r)) for r in range(1, 9)}
    assert len(others) > 1  # rounds draw different clients
