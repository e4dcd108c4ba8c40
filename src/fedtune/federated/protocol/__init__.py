"""The server <-> client protocol: typed instructions and replies <-> Flower records.

Every message fedtune sends is one of the dataclasses below, and every record key is
written once, here: a field ``server_round`` travels as ``server-round``. Scalars go in the
message's ``config`` record (instructions) or ``metrics`` record (replies); adapter arrays
in an ``ArrayRecord`` each, named after their field. An instruction names its job
explicitly (:class:`Job`), so a client never guesses what it was asked from which keys are
present, and carries the run's resolved config, parsed once per message.

Decoding checks the schema: the protocol version, every required field present, every
value of its declared type, no unknown field. A message from a foreign or older app is
refused with a :class:`ProtocolError` naming the field, so a client answers it with an
error reply and the server leaves such a reply out; the round goes on either way.

::

    server                                 client
    Query(config)                 ->       QueryReply(partition_id, num_train, num_test)
    Instruction(job, round, ...)  ->       TrainReply(adapter, num_examples, ...)  (train)
                                           EvaluateReply(eval_loss, ...)           (evaluate)
    CaseQuery(question, k)        ->       CaseHits(texts, ids, sources, ranks)    (query.case)

The modules: :mod:`.wire` (dataclass <-> records, the checks), :mod:`.messages` (a round's
messages), :mod:`.case` (the case-base search). Import from the package.
"""

from fedtune.federated.protocol.case import CASE_QUERY, CaseHits, CaseQuery, case_query_message
from fedtune.federated.protocol.messages import (
    EvaluateReply,
    Instruction,
    Job,
    Query,
    QueryReply,
    RoundMetrics,
    TrainReply,
    instruction_message,
    query_message,
    read_instruction,
    read_reply,
    reply_message,
)
from fedtune.federated.protocol.wire import PROTOCOL, ProtocolError

__all__ = [
    "CASE_QUERY",
    "PROTOCOL",
    "CaseHits",
    "CaseQuery",
    "EvaluateReply",
    "Instruction",
    "Job",
    "ProtocolError",
    "Query",
    "QueryReply",
    "RoundMetrics",
    "TrainReply",
    "case_query_message",
    "instruction_message",
    "query_message",
    "read_instruction",
    "read_reply",
    "reply_message",
]
