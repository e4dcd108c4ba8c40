import numpy as np

from fedtune.federated.aggregation.scaffold import scaffold_step


def test_scaffold_step_hand_worked() -> None:
    x, c = {"w": np.array([0.0])}, {"w": np.array([0.0])}
    ys = [{"w": np.array([1.0])}, {"w": np.array([3.0])}]
    zeros = [{"w": np.array([0.0])}, {"w": np.array([0.0])}]
    new_x, new_c, new_ci = scaffold_step(x, ys, [1, 1], c, zeros, steps=[1, 1], lrs=[1.0, 1.0], num_clients=2)
    assert new_x["w"][0] == 2.0  # 0 + mean(1 - 0, 3 - 0)
    assert [ci["w"][0] for ci in new_ci] == [-1.0, -3.0]  # 0 - 0 + (0 - y_i) / (1 * 1)
    assert new_c["w"][0] == -2.0  # 0 + ((-1 - 0) + (-3 - 0)) / 2
    # half the clients took part: c moves by |S|/N of the mean change
    _, half_c, _ = scaffold_step(x, ys[:1], [1], c, zeros[:1], steps=[2], lrs=[0.5], num_clients=2)
    assert half_c["w"][0] == -0.5  # c_1+ = (0 - 1) / (2 * 0.5) = -1, over N = 2


def test_each_client_divides_by_its_own_steps_and_lr() -> None:
    x, c = {"w": np.array([0.0])}, {"w": np.array([0.0])}
    ys = [{"w": np.array([1.0])}, {"w": np.array([1.0])}]
    zeros = [{"w": np.array([0.0])}, {"w": np.array([0.0])}]
    _, _, new_ci = scaffold_step(x, ys, [1, 1], c, zeros, steps=[1, 4], lrs=[0.5, 0.25], num_clients=2)
    assert [ci["w"][0] for ci in new_ci] == [-2.0, -1.0]  # -1 / (1 * 0.5), -1 / (4 * 0.25)
