import numpy as np

from fedtune.config import load_config
from fedtune.federated.scaffold import ScaffoldStrategy, scaffold_step
from fedtune.federated.strategies import build_strategy


def test_scaffold_step_hand_worked() -> None:
    x, c = {"w": np.array([0.0])}, {"w": np.array([0.0])}
    ys = [{"w": np.array([1.0])}, {"w": np.array([3.0])}]
    zeros = [{"w": np.array([0.0])}, {"w": np.array([0.0])}]
    new_x, new_c, new_ci = scaffold_step(x, ys, [1, 1], c, zeros, steps=[1, 1], lr=1.0, num_clients=2)
    assert new_x["w"][0] == 2.0  # 0 + mean(1 - 0, 3 - 0)
    assert [ci["w"][0] for ci in new_ci] == [-1.0, -3.0]  # 0 - 0 + (0 - y_i) / (1 * 1)
    assert new_c["w"][0] == -2.0  # 0 + ((-1 - 0) + (-3 - 0)) / 2
    # half the clients took part: c moves by |S|/N of the mean change
    _, half_c, _ = scaffold_step(x, ys[:1], [1], c, zeros[:1], steps=[2], lr=0.5, num_clients=2)
    assert half_c["w"][0] == -0.5  # c_1+ = (0 - 1) / (2 * 0.5) = -1, over N = 2


def test_corrections_and_state_round_trip() -> None:
    cfg = load_config("configs/tiny.toml", ["fed.strategy='scaffold'", "partition.num_partitions=2"])
    strategy = build_strategy(cfg, {10: 0, 11: 1})
    assert isinstance(strategy, ScaffoldStrategy)
    strategy._global = {"w": np.zeros(2, np.float32)}
    strategy.aggregate_states(
        [{"w": np.ones(2, np.float32)}, {"w": 3 * np.ones(2, np.float32)}], [1, 1], [0, 1]
    )
    state = strategy.server_state()
    again = build_strategy(cfg, {10: 0, 11: 1})
    again.load_server_state(state, strategy._global)
    assert np.array_equal(again.c["w"], strategy.c["w"])
    assert np.array_equal(again.c_clients[1]["w"], strategy.c_clients[1]["w"])


def test_control_variates_use_the_rounds_scheduled_lr() -> None:
    """With fed.lr_schedule the clients trained at the round's lr; c_i divides by that lr."""
    overrides = ["fed.strategy='scaffold'", "partition.num_partitions=1", "train.max_steps=1"]
    cfg = load_config(
        "configs/tiny.toml", [*overrides, "fed.lr_schedule='linear'", "fed.rounds=2", "train.lr=0.5"]
    )
    strategy = build_strategy(cfg, {10: 0})
    assert isinstance(strategy, ScaffoldStrategy)
    strategy._global = {"w": np.zeros(1, np.float32)}
    strategy.current_round = 2  # linear over 2 rounds: round 2 trains at lr 0.25
    strategy.aggregate_states([{"w": np.ones(1, np.float32)}], [1], [0])
    # c_1 = (x - y) / (steps * lr) = (0 - 1) / (1 * 0.25) = -4 (not -2 at the base lr)
    assert strategy.c_clients[0]["w"][0] == -4.0
