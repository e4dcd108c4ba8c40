"""SecAgg+ behind fedtune's strategy layer: one round's training through Flower's legacy workflow.

Flower 1.41 has SecAgg+ only as ``SecAggPlusWorkflow``, which runs against a ``LegacyContext``
whose legacy ``Strategy`` configures ``FitIns`` and receives the aggregate in ``aggregate_fit``.
:func:`secure_round` bridges it without changing what a strategy is:

- the strategy configures the round as always (``configure_train``: one :class:`Instruction`
  per sampled node); the round loop hands those messages here;
- :class:`_Workflow` is Flower's workflow, except that stage 2 sends each node its instruction
  (``secagg`` set) instead of a legacy ``FitIns``; Flower's share exchange, masking and unmasking
  run unchanged; :class:`_Capture` is the legacy strategy the workflow calls: it configures nothing
  of its own and keeps the unmasked sum and the clients' clear-text metrics;
- the result (:class:`SecureResult`) goes back to the strategy as the clients' weighted mean
  update (``AdapterStrategy.aggregate_mean``), which turns it into the new global adapter.

Why a subclass rather than a ``FitIns`` that carries the instruction: an instruction is a typed
message (named ``ArrayRecord`` s with dtypes and shapes, a config record with the run's config);
a ``FitIns`` is one list of byte tensors and a flat scalar dict, so it would take a second
encoding of the protocol and a second decoder on the client. Replacing the workflow's per-node
content after its setup stage keeps one protocol: the client reads the message it reads in a plain
round, plus Flower's record. The override touches one field of Flower's ``WorkflowState``
(``nid_to_fitins``, the per-node content of stage 2) and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.server import ClientManager, LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedtune.config import Config
from fedtune.errors import FedtuneError
from fedtune.federated.aggregation.secagg import (
    check_secagg,
    flower_count,
    from_vector,
    max_weight,
    vector_layout,
)
from fedtune.federated.protocol import TrainReply, read_instruction
from fedtune.federated.protocol.secagg import masked_reply_error, reply_from_metrics, workflow_state
from fedtune.federated.records import shapes
from fedtune.models.adapters import sent_keys

log = logging.getLogger(__name__)

STAGES = ("setup", "share keys", "collect masked vectors", "unmask")  # one send_and_receive each
OnStage = Callable[[str, int, int], None]  # (stage, nodes that answered, nodes asked)


@dataclass(frozen=True)
class SecureResult:
    """One secure round: the weighted mean update, the clients' clear-text metrics, who took part, bytes.

    ``mean_update`` is ``sum w_i d_i / sum w_i`` over the ``survivors`` (``d_i`` = the client's
    adapter minus the one it was sent, ``w_i`` its weight), within the quantisation bound of
    :func:`~fedtune.federated.aggregation.secagg.mean_error_bound`. ``replies`` are the
    survivors' :class:`TrainReply` s in partition order, their adapters empty. ``bytes_down`` /
    ``bytes_up``: per node, the payload bytes of each stage it was sent / answered.
    """

    mean_update: dict[str, np.ndarray]
    replies: list[TrainReply]
    weights: list[float]  # the survivors' weights, in the order of ``replies``
    survivors: list[int]  # node ids whose masked vectors are in the sum
    dropped: list[int]  # node ids sampled but not in the sum
    bytes_down: dict[int, list[int]] = field(default_factory=dict)
    bytes_up: dict[int, list[int]] = field(default_factory=dict)


def payload_bytes(content: RecordDict) -> int:
    """A message's payload bytes by Flower's ``count_bytes`` convention, for SecAgg+'s records too.

    Tensor data, keys, 8 bytes a number, 1 a bool, the length of text and bytes. Flower's
    ``ConfigRecord.count_bytes`` refuses the empty strings and lists SecAgg+'s records hold.
    """
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
            continue
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            total += len(key) + sum(
                len(v) if isinstance(v, str | bytes) else 1 if isinstance(v, bool) else 8 for v in values
            )
    return total


class _CountingGrid(Grid):
    """The round loop's Grid, counting each node's payload bytes per workflow stage."""

    def __init__(self, grid: Grid, on_stage: OnStage | None, shapes: Sequence[tuple[int, ...]] = ()) -> None:
        self.grid, self.on_stage, self.shapes = grid, on_stage, shapes
        self.answered: list[int] = []  # per stage run: the nodes that answered without an error
        self.down: dict[int, list[int]] = {}
        self.up: dict[int, list[int]] = {}

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def _malformed_as_dropped(self, sent: list[Message], replies: list[Message]) -> list[Message]:
        """A masked update that cannot go into the sum is answered as a dropout (logged, left out).

        Flower's workflow then never adds it and removes its masks in the unmask stage, as for
        any client lost in training; the round goes on with the others.
        """
        by_id = {m.metadata.message_id: m for m in sent}
        out = []
        for reply in replies:
            node = reply.metadata.src_node_id
            reason = (
                None if reply.has_error() else masked_reply_error(reply.content, self.shapes, f"node {node}")
            )
            if reason is not None:
                log.warning("SecAgg+ update left out: %s", reason)
                reply = Message(
                    Error(code=0, reason=reason), reply_to=by_id[reply.metadata.reply_to_message_id]
                )
            out.append(reply)
        return out

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            self.down.setdefault(msg.metadata.dst_node_id, []).append(payload_bytes(msg.content))
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if len(self.answered) == STAGES.index("collect masked vectors"):
            replies = self._malformed_as_dropped(messages, replies)
        for reply in replies:
            size = 0 if reply.has_error() else payload_bytes(reply.content)
            self.up.setdefault(reply.metadata.src_node_id, []).append(size)
        self.answered.append(sum(not r.has_error() for r in replies))
        if self.on_stage is not None:
            self.on_stage(STAGES[min(len(self.answered), len(STAGES)) - 1], self.answered[-1], len(messages))
        return replies


class _Capture(Strategy):
    """The legacy strategy the workflow calls: every node's ``FitIns`` empty, the aggregate kept.

    ``configure_fit`` returns one empty ``FitIns`` per node (the workflow sends fedtune's
    instruction instead, :class:`_Workflow`); ``aggregate_fit`` receives the unmasked weighted
    mean as every result's parameters, and each survivor's clear-text ``FitRes``.
    """

    def __init__(self, grid: Grid, nodes: Sequence[int]) -> None:
        self.grid, self.nodes = grid, list(nodes)
        self.vector: list[np.ndarray] | None = None
        self.results: list[tuple[int, FitRes]] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[Any, FitIns]]:
        run_id = self.grid.run.run_id
        return [(GridClientProxy(n, self.grid, run_id), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[Any, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results = [(proxy.node_id, res) for proxy, res in results]
        self.vector = parameters_to_ndarrays(results[0][1].parameters) if results else []
        return None, {}  # the round loop, not the legacy context, keeps the global adapter

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[Any, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[Any, EvaluateRes]], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, sending each node fedtune's instruction in stage 2 (module docstring)."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.contents = contents

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().setup_stage(grid, context, state)
        # stage 2 adds Flower's record to this content and sends it
        state.nid_to_fitins = {node: self.contents[node] for node in state.nid_to_fitins}
        return ok


def secure_round(
    grid: Grid, messages: Iterable[Message], cfg: Config, *, on_stage: OnStage | None = None
) -> SecureResult:
    """Train the clients of ``messages`` (a strategy's train instructions) and sum their updates with SecAgg+.

    Raises FedtuneError when the round cannot complete: too few clients for
    ``privacy.secagg.reconstruction_threshold``, or too many dropped out; ProtocolError when a
    survivor's clear-text metrics do not follow the protocol (its update is already in the sum).
    """
    insts = {msg.metadata.dst_node_id: read_instruction(msg) for msg in messages}
    check_secagg(cfg, len(insts))
    adapters = [inst.adapter for inst in insts.values() if inst.adapter is not None]
    lora = cfg.model.lora  # FFA-LoRA: the vector holds B only, A is not trained
    sizes = [shapes(record) for record in adapters]
    layout = vector_layout([{k: s[k] for k in sent_keys(s, lora)} for s in sizes])
    server_round = next(iter(insts.values())).server_round
    sec = cfg.privacy.secagg
    counting = _CountingGrid(grid, on_stage, [shape for _, shape in layout])
    capture = _Capture(grid, sorted(insts))
    workflow = _Workflow(
        {node: replace(inst, secagg=True).to_content() for node, inst in insts.items()},
        num_shares=flower_count(sec.num_shares),
        reconstruction_threshold=flower_count(sec.reconstruction_threshold),
        max_weight=max_weight(cfg),
        clipping_range=sec.clipping_range,
        quantization_range=sec.quantization_range,
        timeout=sec.timeout or cfg.fed.timeout,
    )
    base = Context(
        run_id=grid.run.run_id, node_id=0, node_config={}, state=workflow_state(server_round), run_config={}
    )
    workflow(counting, LegacyContext(base, strategy=capture))
    if capture.vector is None:
        stage = STAGES[len(counting.answered) - 1] if counting.answered else STAGES[0]
        answered = counting.answered[-1] if counting.answered else 0
        raise FedtuneError(
            f"round {server_round}: SecAgg+ halted in stage {stage!r} ({answered} of {len(insts)} "
            "clients answered); every client needs privacy.secagg.reconstruction_threshold live "
            "neighbours (see the log)"
        )
    read = sorted(
        (
            (reply_from_metrics(res.metrics, f"reply from node {node}"), float(res.num_examples), node)
            for node, res in capture.results
        ),
        key=lambda item: item[0].partition_id,
    )
    survivors = [node for _, _, node in read]
    dropped = sorted(set(insts) - set(survivors))
    log.info(
        "round %s: SecAgg+ summed %s of %s clients (dropped: %s)",
        server_round,
        len(read),
        len(insts),
        dropped,
    )
    return SecureResult(
        mean_update=from_vector(capture.vector, layout),
        replies=[reply for reply, _, _ in read],
        weights=[weight for _, weight, _ in read],
        survivors=survivors,
        dropped=dropped,
        bytes_down=counting.down,
        bytes_up=counting.up,
    )
