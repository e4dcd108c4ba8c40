"""fedtune's messages inside Flower's SecAgg+ (the legacy ``SecAggPlusWorkflow`` and ``secaggplus_mod``).

Flower 1.41 has SecAgg+ only in its legacy API. Its workflow keeps the round in a
``LegacyContext``'s state; its client mod keeps its keys in a ``secaggplus_configs`` record
beside the message's own records, reads the train handler's reply in the legacy ``FitRes``
layout, then empties every array of that reply and adds the masked vector to its record. This
module owns those layouts as fedtune uses them:

- in stage 2 of a round the client gets its ordinary :class:`Instruction`, with ``secagg`` set,
  and Flower's record beside it (``read_instruction`` checks that the two agree);
- it answers with a ``FitRes``: parameters = its update vector (masked by the mod before
  anything leaves), num_examples = its weight in the sum, metrics = its :class:`TrainReply`'s
  scalars (:func:`masked_reply_content`);
- the server reads those metrics back as a TrainReply with an empty adapter (:func:`reply_from_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fedtune.federated.protocol.messages import SECAGG_RECORD, TrainReply
from fedtune.federated.protocol.wire import ProtocolError, schema

_ADAPTER = next(f.key for f in schema(TrainReply) if f.name == "adapter")


def carries_secagg(content: RecordDict) -> bool:
    """Whether a message belongs to a SecAgg+ round (Flower's record is in it)."""
    return SECAGG_RECORD in content


def reply_metrics(reply: TrainReply) -> dict[str, Scalar]:
    """A train reply's scalar fields as they travel (protocol version included); no adapter."""
    return dict(reply.to_content()[TrainReply.scalars])  # type: ignore[arg-type]


def masked_reply_content(reply: TrainReply, update: Sequence[np.ndarray], weight: int) -> RecordDict:
    """The reply ``secaggplus_mod`` reads: a ``FitRes`` of ``update``, ``weight`` and ``reply``'s scalars.

    Built by Flower's own converter, so the layout is the one the mod reads. The mod masks
    ``update`` and empties the parameters before the reply leaves the client.
    """
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(update)), weight, reply_metrics(reply))
    return fitres_to_recorddict(fitres, keep_input=False)


def reply_from_metrics(metrics: Mapping[str, Scalar], where: str) -> TrainReply:
    """A client's clear-text metrics from its ``FitRes`` as a TrainReply whose adapter is empty.

    The secure sum replaces the adapter; every scalar is checked as in any reply.
    """
    content = RecordDict({TrainReply.scalars: MetricRecord(dict(metrics)), _ADAPTER: ArrayRecord()})  # type: ignore[arg-type]
    return TrainReply.from_content(content, where=where)


def masked_reply_error(content: RecordDict, shapes: Sequence[tuple[int, ...]], where: str) -> str | None:
    """Why a stage-2 reply cannot go into the secure sum, or None when it can.

    Its masked vector must have the round's layout (Flower's weight factor, then one array per
    adapter tensor, ``shapes``) and its scalars must read as a :class:`TrainReply`.
    """
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    try:
        blobs = content.config_records[SECAGG_RECORD][Key.MASKED_PARAMETERS]
        got = [tuple(bytes_to_ndarray(b).shape) for b in blobs]  # type: ignore[union-attr, arg-type]
        reply_from_metrics(recorddict_to_fitres(content, keep_input=True).metrics, where)
    except (ProtocolError, KeyError, ValueError, TypeError, AttributeError) as err:
        return f"{where}: malformed SecAgg+ reply: {err}"[:300]
    expected = [(1,), *(tuple(s) for s in shapes)]
    if got != expected:
        return f"{where}: masked vector of shapes {got[:4]}..., expected {expected[:4]}..."
    return None


def workflow_state(server_round: int) -> RecordDict:
    """The state Flower's workflows read from a ``LegacyContext``: the round, the (unused) parameters.

    The workflow sends no parameters of its own: each client's instruction carries its adapter.
    """
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    return RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )


__all__ = [
    "SECAGG_RECORD",
    "carries_secagg",
    "masked_reply_content",
    "reply_from_metrics",
    "reply_metrics",
    "workflow_state",
]
