"""SecAgg+ behind the strategy layer: Flower's workflow and mod, fedtune's instructions and replies.

Three tiers. The maths (share plan, weights, the error bound) by hand. A loopback Grid that hands
every message of Flower's real ``SecAggPlusWorkflow`` to fedtune's real ClientApp in this process
(its ``secaggplus_mod`` included), on the tiny model: the secure mean against plain FedAvg of
the same clients, dropouts, and what each stage's reply holds. In Flower's simulation runtime
(Ray): a round with a dropout, and ``fedtune run`` against the same run without SecAgg+. All but
the first tier train and are marked integration.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedtune import launch
from fedtune.config import Config, load_config
from fedtune.errors import FedtuneError
from fedtune.federated.aggregation.secagg import (
    check_secagg,
    max_weight,
    mean_error_bound,
    secagg_plan,
    update_vector,
)
from fedtune.federated.protocol import Job, RoundMetrics, TrainReply, read_instruction, read_reply
from fedtune.federated.protocol.messages import SECAGG_RECORD
from fedtune.federated.protocol.secagg import reply_metrics
from fedtune.federated.records import from_record, to_record
from fedtune.federated.secagg import STAGES, SecureResult, secure_round
from fedtune.federated.strategies import AdapterStrategy, build_strategy, check_strategy
from fedtune.models.adapters import initial_adapter_state

NODE = 1000  # node id of partition p is NODE + p
Plain = dict[int, tuple[dict[str, np.ndarray], int, dict[str, np.ndarray]]]
SECAGG = ("partition.num_partitions=4", "privacy.secagg.enabled=true", "fed.rounds=1")
FITRES = {"fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status"}  # Flower's layout


@pytest.fixture(autouse=True, scope="module")
def _task_identity():
    from federated.fakes import task_identity

    yield from task_identity()


# -- the maths, by hand --------------------------------------------------------------
@pytest.mark.parametrize(
    ("clients", "num_shares", "threshold", "want"),
    [
        (4, 1.0, 0.5, (4, 2, 4)),  # round(1.0 * 4) = 4 shares; round(0.5 * 4) = 2; every client a neighbour
        (7, 0.5, 0.5, (5, 2, 5)),  # round(3.5) = 4 -> odd 5; round(2.5) = 2 (round half to even)
        (7, 0.6, 0.7, (5, 4, 5)),  # round(4.2) = 4 -> 5; round(3.5) = 4
        (6, 3, 2, (3, 2, 3)),  # counts as given; 3 // 2 = 1 on either side + itself
        (10, 0.2, 1.0, (3, 3, 3)),  # round(2.0) = 2 -> odd 3; threshold all 3: no dropout tolerated
    ],
)
def test_the_plan_is_what_flowers_setup_stage_does(clients, num_shares, threshold, want) -> None:
    from flwr.server import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    from fedtune.federated.protocol.secagg import workflow_state
    from fedtune.federated.secagg import _Capture

    plan = secagg_plan(clients, num_shares, threshold)
    assert (plan.shares, plan.threshold, plan.neighbours) == want
    sent: list[Message] = []
    grid = SimpleNamespace(
        run=SimpleNamespace(run_id=1), send_and_receive=lambda m, timeout: sent.extend(m) or []
    )
    context = Context(run_id=1, node_id=0, node_config={}, state=workflow_state(1), run_config={})
    state = WorkflowState()
    nodes = list(range(NODE, NODE + clients))
    workflow = SecAggPlusWorkflow(num_shares, threshold)
    workflow.setup_stage(grid, LegacyContext(context, strategy=_Capture(grid, nodes)), state)  # type: ignore[arg-type]
    setup = sent[0].content[SECAGG_RECORD]
    assert (setup["share_num"], setup["threshold"]) == (plan.shares, plan.threshold)
    assert {len(n) for n in state.nid_to_neighbours.values()} == {plan.neighbours}


def test_the_error_bound_by_hand() -> None:
    # DP: w = 1, M = 1, T = 4 -> q = [4, 4], exact weights; (2 n c) / Q = (2 * 2 * 1) / 8
    assert (
        mean_error_bound([1, 1], max_weight=1, clipping_range=1, quantization_range=4, max_abs_update=9)
        == 0.5
    )
    # M = 4, T = 10: q = [round(2.5), round(5.0)] = [2, 5]; sum |q - w T / M| = 0.5; D = 0.5
    # (2 * 2 * 1 + 2 * 0.5 * 0.5) / 7
    got = mean_error_bound([1, 2], max_weight=4, clipping_range=1, quantization_range=10, max_abs_update=0.5)
    assert got == pytest.approx(4.5 / 7)


def test_the_update_vector_is_trained_minus_sent_in_the_sent_order() -> None:
    sent = {"b": np.array([1.0, 2.0], np.float32), "a": np.array([[0.5]], np.float32)}
    trained = {"a": np.array([[0.75]], np.float32), "b": np.array([0.0, 2.5], np.float32)}
    vector = update_vector(trained, sent)
    assert [v.tolist() for v in vector] == [[-1.0, 0.5], [[0.25]]] and vector[0].dtype == np.float64
    assert update_vector({"b": trained["b"]}, sent)[1].tolist() == [[0.0]]  # not sent back: did not train
    with pytest.raises(ValueError, match="not sent"):
        update_vector({**trained, "c": np.zeros(1)}, sent)


def test_the_weights_scale() -> None:
    cfg = load_config("configs/tiny.toml", list(SECAGG))
    assert max_weight(cfg) == 16.0  # data.max_train_examples bounds a client's examples
    dp = load_config("configs/tiny.toml", [*SECAGG, "privacy.dp=true", "privacy.noise_multiplier=1.0"])
    assert max_weight(dp) == 1.0


# -- refusals before a run directory exists -----------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["fed.strategy=median"], r"privacy\.secagg: fed\.strategy 'median' is not a weighted sum"),
        (
            ["privacy.secagg.reconstruction_threshold=3", "fed.fraction_train=0.5"],
            r"reconstruction_threshold",
        ),
        (["partition.num_partitions=1"], r"privacy\.secagg: SecAgg\+ sums at least 2 clients"),
        (["privacy.secagg.num_shares=4", "partition.num_partitions=5"], r"num_shares: a count must be odd"),
        (["fed.clip_norm=1.0"], r"fed\.clip_norm: the server never sees one client's update"),
    ],
)
def test_a_run_secagg_cannot_serve_is_refused_before_its_directory(
    tmp_path: Path, overrides: list[str], match: str
) -> None:
    cfg = load_config("configs/tiny.toml", [*SECAGG, f"run.output_dir='{tmp_path}'", *overrides])
    with pytest.raises(FedtuneError, match=match):
        launch.run(cfg, progress=False)
    assert not any(tmp_path.iterdir())


def test_the_threshold_check_counts_the_sampled_clients() -> None:
    # 4 of 8 clients a round: 4 holders of each key, so 3 of them may rebuild it and 1 may drop out
    over = [
        *SECAGG,
        "partition.num_partitions=8",
        "fed.fraction_train=0.5",
        "privacy.secagg.reconstruction_threshold=3",
    ]
    cfg = load_config("configs/tiny.toml", over)
    check_strategy(cfg)
    plan = check_secagg(cfg, 4)
    assert (plan.shares, plan.threshold, plan.neighbours, plan.tolerated) == (4, 3, 4, 1)
    with pytest.raises(FedtuneError, match=r"3 shares rebuild a key, but a client's key has only 2 holders"):
        check_secagg(cfg, 2)


# -- Flower's workflow and mod, fedtune's ClientApp, in this process --------------------
IN_PROCESS = pytest.mark.integration  # tiny-model training in this process: seconds per round


class Loopback:
    """A Grid that hands each message to fedtune's ClientApp here, with one Context per node.

    ``lose``: (call, node) pairs whose reply never comes back (the node failed); calls count the
    Grid's ``send_and_receive`` calls, which are the workflow's stages in order.
    """

    def __init__(self, clients: int) -> None:
        self.run = SimpleNamespace(run_id=1)
        self.contexts = {
            NODE + p: Context(
                run_id=1,
                node_id=NODE + p,
                node_config={"partition-id": p, "num-partitions": clients},
                state=RecordDict(),
                run_config={},
            )
            for p in range(clients)
        }
        self.lose: set[tuple[int, int]] = set()
        self.replies: list[list[Message]] = []  # per call

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from fedtune.federated.client_app import app

        call, out = len(self.replies), []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{call}-{i}"  # as the runtime assigns
            node = msg.metadata.dst_node_id
            if (call, node) in self.lose:
                continue
            delivered = copy.deepcopy(msg)  # the runtime serialises: no record is shared between nodes
            try:
                out.append(app(delivered, self.contexts[node]))
            except Exception as err:  # the runtime answers a raising ClientApp with an error reply
                out.append(Message(Error(code=0, reason=repr(err)), reply_to=delivered))
        self.replies.append(out)
        return out


def _strategy(cfg: Config) -> tuple[AdapterStrategy, ArrayRecord]:
    """The strategy of ``cfg`` over its clients (node NODE + p) and the starting adapter."""
    s = build_strategy(cfg, {NODE + p: p for p in range(cfg.partition.num_partitions)})
    start = {k: v.numpy() for k, v in initial_adapter_state(cfg.model, seed=cfg.seed).items()}
    return s, to_record(start, "float32")


def _secure(cfg: Config, grid: Any) -> SecureResult:
    """Round 1's training through SecAgg+ (its instructions are those of the plain round)."""
    s, arrays = _strategy(cfg)
    return secure_round(grid, s.configure_train(1, arrays, ConfigRecord(), grid), cfg)


def _fedavg(plain: Plain, pids: Iterable[int]) -> dict[str, np.ndarray]:
    """sum w_i d_i / sum w_i over ``pids``, in float64."""
    total = sum(plain[p][1] for p in pids)
    return {k: sum(plain[p][1] * plain[p][0][k] for p in pids) / total for k in plain[0][0]}


def _bound(cfg: Config, plain: Plain, pids: list[int]) -> float:
    """The stated bound for these clients, after checking that the quantiser clips none of them."""
    sec, m = cfg.privacy.secagg, max_weight(cfg)
    for p in pids:
        delta, w, _ = plain[p]
        ratio = round(w / m * sec.quantization_range) / sec.quantization_range
        assert ratio * max(np.abs(v).max() for v in delta.values()) <= sec.clipping_range
    return mean_error_bound(
        [plain[p][1] for p in pids],
        max_weight=m,
        clipping_range=sec.clipping_range,
        quantization_range=sec.quantization_range,
        max_abs_update=max(np.abs(v).max() for p in pids for v in plain[p][0].values()),
    )


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return load_config("configs/tiny.toml", [*SECAGG, f"run.output_dir='{tmp_path_factory.mktemp('runs')}'"])


@pytest.fixture(scope="module")
def plain(cfg: Config) -> Plain:
    """A plain round of the tiny model over 4 clients: partition id -> (update, examples, trained adapter)."""
    s, arrays = _strategy(cfg)
    grid = Loopback(4)
    messages = list(s.configure_train(1, arrays, ConfigRecord(), grid))
    sent = {m.metadata.dst_node_id: from_record(read_instruction(m).adapter) for m in messages}
    out = {}
    for msg in grid.send_and_receive(messages):
        reply = read_reply(msg, TrainReply)
        start, trained = sent[msg.metadata.src_node_id], from_record(reply.adapter)
        delta = dict(zip(start, update_vector(trained, start), strict=True))
        out[reply.partition_id] = (delta, reply.num_examples, trained)
    return out


@pytest.fixture(scope="module")
def secure(cfg: Config) -> tuple[SecureResult, Loopback]:
    grid = Loopback(4)
    return _secure(cfg, grid), grid


@IN_PROCESS
def test_the_secure_mean_is_fedavg_of_the_same_clients_within_the_bound(cfg, plain, secure) -> None:
    result, _ = secure
    want, bound = _fedavg(plain, range(4)), _bound(cfg, plain, [0, 1, 2, 3])
    assert [r.partition_id for r in result.replies] == [0, 1, 2, 3]
    assert result.weights == [plain[p][1] for p in range(4)] and result.dropped == []
    assert all(r.adapter.count_bytes() == 0 and r.train_loss > 0 for r in result.replies)
    error = max(np.abs(result.mean_update[k] - want[k]).max() for k in want)
    assert error <= bound
    assert bound < 1e-3 * max(np.abs(v).max() for v in want.values())  # the bound says something


def _error(result: SecureResult, want: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(result.mean_update[k] - want[k]).max()) for k in want)


@IN_PROCESS
def test_a_client_lost_after_training_is_left_out_and_the_round_completes(cfg, plain) -> None:
    grid = Loopback(4)
    grid.lose = {(2, NODE + 1)}  # its masked vector never arrives
    result = _secure(cfg, grid)
    assert result.dropped == [NODE + 1] and result.survivors == [NODE, NODE + 2, NODE + 3]
    assert [r.partition_id for r in result.replies] == [0, 2, 3]
    assert _error(result, _fedavg(plain, [0, 2, 3])) <= _bound(cfg, plain, [0, 2, 3])


@IN_PROCESS
def test_a_client_that_fails_while_training_is_left_out(cfg, plain, monkeypatch) -> None:
    from fedtune.federated import client_work

    train = client_work.TRAIN[Job.PLAIN]

    def fails_on_2(task):
        if task.partition_id == 2:
            raise RuntimeError("out of memory")
        return train(task)

    monkeypatch.setitem(client_work.TRAIN, Job.PLAIN, fails_on_2)
    result = _secure(cfg, Loopback(4))
    assert result.dropped == [NODE + 2]
    assert _error(result, _fedavg(plain, [0, 1, 3])) <= _bound(cfg, plain, [0, 1, 3])


@IN_PROCESS
def test_a_client_lost_while_unmasking_still_counts(cfg, plain) -> None:
    grid = Loopback(4)
    grid.lose = {(3, NODE + 3)}  # its vector is in the sum; the others' shares remove its mask
    result = _secure(cfg, grid)
    assert result.dropped == [] and len(result.bytes_up[NODE + 3]) == 3
    assert _error(result, _fedavg(plain, range(4))) <= _bound(cfg, plain, [0, 1, 2, 3])


@IN_PROCESS
def test_more_dropouts_than_the_threshold_allows_stop_the_round_clearly(cfg) -> None:
    grid = Loopback(4)
    grid.lose = {(2, NODE + p) for p in (1, 2, 3)}  # 1 left; 2 shares rebuild a key
    with pytest.raises(FedtuneError, match=r"halted in stage 'collect masked vectors' \(1 of 4 clients"):
        _secure(cfg, grid)


FLOWER_KEYS = {  # what Flower's mod puts in its record at each stage
    "setup": {"pk1", "pk2"},
    "share keys": {"dsts", "ctxts"},
    "collect masked vectors": {"masked_params"},
    "unmask": {"nids", "shares"},
}


def _blobs(reply: Message) -> list[bytes]:
    """Every byte string in a reply: array data and bytes values (lists included)."""
    out: list[bytes] = []
    for record in reply.content.values():
        for value in record.values():
            if isinstance(record, ArrayRecord):
                out.append(value.data)
            else:
                out += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, bytes)]
    return out


@IN_PROCESS
def test_what_a_client_sends_under_secagg(cfg, plain, secure) -> None:
    result, grid = secure
    metrics = set(reply_metrics(result.replies[0]))  # the scalar fields of a TrainReply
    assert len(grid.replies) == len(STAGES)
    for stage, replies in zip(STAGES, grid.replies, strict=True):
        for reply in replies:
            assert not reply.has_error()
            content = reply.content
            assert set(content) == (
                {SECAGG_RECORD} | (FITRES if stage == "collect masked vectors" else set())
            )
            assert set(content[SECAGG_RECORD]) == FLOWER_KEYS[stage]
            assert all(
                len(r) == 0 for r in content.values() if isinstance(r, ArrayRecord)
            )  # emptied by the mod
            if stage == "collect masked vectors":
                assert set(content["fitres.metrics"]) == metrics
                assert all(isinstance(v, int | float) for v in content["fitres.metrics"].values())
    needles = set()  # 16 bytes of every trained tensor (as sent in a plain round) and every update
    for delta, _, trained in plain.values():
        for key in delta:
            for arr in (
                trained[key].astype(np.float16),
                trained[key],
                delta[key],
                delta[key].astype(np.float32),
            ):
                if np.any(arr.ravel()[:2]):
                    needles.add(np.ascontiguousarray(arr).tobytes()[:16])
    blobs = [b for replies in grid.replies for reply in replies for b in _blobs(reply)]
    assert blobs and not any(n in b for n in needles for b in blobs)


# -- the same in Flower's simulation runtime (Ray) ----------------------------------
class _Losing:
    """A Grid that loses ``node``'s reply to the ``call``-th ``send_and_receive``."""

    def __init__(self, grid: Grid, call: int, node: int) -> None:
        self._grid, self._call, self._node, self._calls = grid, call, node, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._calls += 1
        if self._calls - 1 == self._call:
            replies = [r for r in replies if r.metadata.src_node_id != self._node]
        return replies


@pytest.mark.integration
def test_a_simulated_secagg_round_is_fedavg_within_the_bound_and_survives_a_dropout(tmp_path: Path) -> None:
    from flwr.serverapp import ServerApp

    from fedtune.federated.server_app import discover
    from fedtune.federated.simulation import run_server_app

    cfg = load_config("configs/tiny.toml", [*SECAGG, f"run.output_dir='{tmp_path}'"])
    found: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        clients = discover(grid, cfg).clients
        s = build_strategy(cfg, clients)
        start = {k: v.numpy() for k, v in initial_adapter_state(cfg.model, seed=cfg.seed).items()}
        arrays = to_record(start, "float32")
        messages = list(s.configure_train(1, arrays, ConfigRecord(), grid))
        sent = from_record(read_instruction(messages[0]).adapter)  # the global in the wire dtype
        plain: Plain = {}
        for msg in grid.send_and_receive(messages):
            reply = read_reply(msg, TrainReply)
            delta = dict(zip(sent, update_vector(from_record(reply.adapter), sent), strict=True))
            plain[reply.partition_id] = (delta, reply.num_examples, {})
        found["plain"], found["node_of"] = plain, {p: n for n, p in clients.items()}
        found["secure"] = secure_round(grid, s.configure_train(1, arrays, ConfigRecord(), grid), cfg)
        lossy = _Losing(grid, 2, found["node_of"][1])  # partition 1's masked vector is lost
        found["lossy"] = secure_round(lossy, s.configure_train(1, arrays, ConfigRecord(), grid), cfg)  # type: ignore[arg-type]

    run_server_app(cfg, server)
    plain, secure, lossy = found["plain"], found["secure"], found["lossy"]
    assert secure.dropped == [] and [r.partition_id for r in secure.replies] == [0, 1, 2, 3]
    assert _error(secure, _fedavg(plain, range(4))) <= _bound(cfg, plain, [0, 1, 2, 3])
    assert lossy.dropped == [found["node_of"][1]]
    assert _error(lossy, _fedavg(plain, [0, 2, 3])) <= _bound(cfg, plain, [0, 2, 3])
    assert all(len(sizes) == 4 for sizes in secure.bytes_up.values())  # every node answered every stage


@pytest.mark.integration
def test_a_secagg_run_ends_where_fedavg_does_within_the_bound(tmp_path: Path) -> None:
    """``fedtune run`` with SecAgg+ against the same run without it, one round of 4 clients.

    FedAvg's new global is the mean of the clients' fp16 adapters; SecAgg+'s is the server's
    fp32 global plus the mean of (fp16 adapter - fp16 global), so the two differ by the fp16
    rounding of the broadcast global, ``g - fp16(g)``, and the quantisation bound (4.8e-7 here:
    every client has 16 examples = max weight, so (2 n c) / (n T) = 2 / 2**22).
    """
    over = [*SECAGG, "fed.evaluate_before=false", "fed.fraction_evaluate=0.0", "run.report=false"]
    secure_cfg = load_config("configs/tiny.toml", [*over, f"run.output_dir='{tmp_path / 's'}'"])
    plain_cfg = load_config(
        "configs/tiny.toml", [*over, "privacy.secagg.enabled=false", f"run.output_dir='{tmp_path / 'p'}'"]
    )
    secure, plain = launch.run(secure_cfg, progress=False), launch.run(plain_cfg, progress=False)
    g = initial_adapter_state(secure_cfg.model, seed=secure_cfg.seed)
    got, fedavg = secure.load_round(1), plain.load_round(1)
    want = {k: g[k].double() + fedavg[k].double() - g[k].half().double() for k in g}
    assert max(float((got[k].double() - want[k]).abs().max()) for k in g) <= 5e-7
    line = next(m for m in secure.metrics() if m["phase"] == "server" and m["round"] == 1)
    assert line["num_clients"] == 4 and line["train_loss"] > 0


@IN_PROCESS
def test_under_dp_every_weight_is_1_and_the_mean_is_uniform_within_2c_over_t(tmp_path: Path) -> None:
    dp = ["privacy.dp=true", "privacy.noise_multiplier=1.0", f"run.output_dir='{tmp_path}'"]
    cfg = load_config("configs/tiny.toml", [*SECAGG, *dp])
    s, arrays = _strategy(cfg)
    grid = Loopback(4)
    messages = list(s.configure_train(1, arrays, ConfigRecord(), grid))
    sent = from_record(read_instruction(messages[0]).adapter)
    deltas = [
        update_vector(from_record(read_reply(r, TrainReply).adapter), sent)
        for r in grid.send_and_receive(messages)
    ]
    result = secure_round(grid, s.configure_train(1, arrays, ConfigRecord(), grid), cfg)  # the same cohort
    assert result.weights == [1.0] * len(deltas) and len(deltas) >= 2
    want = {k: sum(d[i] for d in deltas) / len(deltas) for i, k in enumerate(sent)}
    assert (
        _error(result, want) <= 2 * cfg.privacy.secagg.clipping_range / cfg.privacy.secagg.quantization_range
    )
    new, metrics = s.aggregate_mean(
        1, result.mean_update, result.replies, result.weights
    )  # noised by the strategy
    assert new is not None and RoundMetrics.from_record(metrics).num_clients == len(deltas)


class _Corrupting(Loopback):
    """A Loopback whose node ``bad`` sends a masked vector missing its last array in stage 2."""

    def __init__(self, clients: int, bad: int) -> None:
        super().__init__(clients)
        self.bad = bad

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        out = super().send_and_receive(messages, timeout=timeout)
        if len(self.replies) == 3:  # stage 2: the masked vectors
            for reply in out:
                if reply.metadata.src_node_id == self.bad and not reply.has_error():
                    record = reply.content.config_records[RECORD_KEY_CONFIGS]
                    record[Key.MASKED_PARAMETERS] = list(record[Key.MASKED_PARAMETERS])[:-1]
        return out


@IN_PROCESS
def test_a_malformed_masked_update_is_left_out_as_a_dropout(cfg, plain, caplog) -> None:
    result = _secure(cfg, _Corrupting(4, NODE + 1))
    assert result.dropped == [NODE + 1] and [r.partition_id for r in result.replies] == [0, 2, 3]
    assert _error(result, _fedavg(plain, [0, 2, 3])) <= _bound(cfg, plain, [0, 2, 3])
    assert any(
        "SecAgg+ update left out" in r.message and "masked vector" in r.message for r in caplog.records
    )


@IN_PROCESS
def test_under_ffa_lora_only_b_is_masked_sent_and_summed(tmp_path: Path) -> None:
    ffa = load_config(
        "configs/tiny.toml", [*SECAGG, "model.lora.freeze_a=true", f"run.output_dir='{tmp_path}'"]
    )
    result = _secure(ffa, Loopback(4))
    assert result.mean_update and all(".lora_B." in k for k in result.mean_update)
    assert len(result.survivors) == 4
    b_values = sum(v.size for v in result.mean_update.values())
    full = _secure(load_config("configs/tiny.toml", [*SECAGG, f"run.output_dir='{tmp_path}'"]), Loopback(4))
    assert sum(v.size for v in full.mean_update.values()) > b_values
    masked = STAGES.index("collect masked vectors")
    assert all(result.bytes_up[n][masked] < full.bytes_up[n][masked] for n in result.survivors)
