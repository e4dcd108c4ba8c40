import numpy as np

from federated.fakes import send, strategy, train_reply
from fedtune.federated.records import from_record
from fedtune.federated.strategies.scaffold import ScaffoldStrategy

ZERO = {"w": np.zeros(2, np.float32)}


def _round(s, server_round: int, ys: list[np.ndarray], **reported) -> None:
    sent = send(s, server_round, ZERO)
    replies = [train_reply(msg, pid, {"w": ys[pid]}, 1, **reported) for pid, (_, msg) in sent.items()]
    s.aggregate_train(server_round, replies)


def test_corrections_and_state_round_trip() -> None:
    s = strategy("fed.strategy='scaffold'", clients=2)
    assert isinstance(s, ScaffoldStrategy)
    assert all(inst.correction is None for inst, _ in send(s, 1, ZERO).values())  # c = 0 before round 1
    _round(s, 1, [np.ones(2, np.float32), 3 * np.ones(2, np.float32)], steps=1, lr=1.0)
    # c_0 = -1, c_1 = -3, c = -2: client 0 is sent c - c_0 = -1, client 1 c - c_1 = 1
    sent = send(s, 2, ZERO)
    assert from_record(sent[0][0].correction)["w"].tolist() == [-1.0, -1.0]
    assert from_record(sent[1][0].correction)["w"].tolist() == [1.0, 1.0]
    assert send(s, 2, ZERO, train=False)[0][0].correction is None  # evaluation needs none
    again = strategy("fed.strategy='scaffold'", clients=2)
    again.load_server_state(s.server_state(), ZERO)
    assert np.array_equal(again.c["w"], s.c["w"]) and np.array_equal(
        again.c_clients[1]["w"], s.c_clients[1]["w"]
    )


def test_control_variates_use_what_the_clients_report() -> None:
    """c_i divides by the steps and lr the client reports (e.g. a scheduled lr), not a recomputation."""
    s = strategy("fed.strategy='scaffold'", "train.max_steps=3", clients=1)
    _round(s, 1, [np.ones(2, np.float32)], steps=2, lr=0.25)
    # c_0 = (x - y) / (steps * lr) = (0 - 1) / (2 * 0.25) = -2 (the config's 3 steps at 1e-3 are not used)
    assert s.c_clients[0]["w"].tolist() == [-2.0, -2.0]
