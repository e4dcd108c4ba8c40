"""The client's side of SecAgg+: Flower's ``secaggplus_mod`` around the train handler, and the reply it masks.

A SecAgg+ round sends each client four train messages (setup, share keys, collect masked
vectors, unmask). Flower's mod answers three of them itself; in the third it calls the train
handler with fedtune's instruction (``secagg`` set) and masks the handler's reply: the update
``trained - sent`` and its weight, quantised and masked, are all that leaves besides keys,
shares and the reply's scalar metrics (:mod:`fedtune.federated.protocol.secagg`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable

from fedtune.federated.aggregation.secagg import aggregation_weight, update_vector
from fedtune.federated.protocol import TrainReply
from fedtune.federated.protocol.secagg import masked_reply_content
from fedtune.federated.records import from_record
from fedtune.federated.task import Task
from fedtune.models.adapters import sent_keys


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod``, for the messages of a SecAgg+ round only.

    Flower's mod reads its record from every train message, so a plain round's instruction,
    which has none, must not reach it: the ClientApp's ``secagg`` mod checks, and imports this
    module only then.
    """
    return secaggplus_mod(msg, context, call_next)


def masked_reply(task: Task, reply: TrainReply, to: Message) -> Message:
    """The reply for the mod to mask: the update vector, the weight and ``reply``'s scalars.

    The update is ``reply``'s adapter minus the one the instruction sent, key by key in the
    sent order (under client-level DP ``reply`` is already clipped and noised); the weight is
    the client's training examples, or 1 under DP-FedAvg.
    """
    assert task.inst.adapter is not None  # read_instruction refuses a secagg instruction without one
    sent = from_record(task.inst.adapter)
    sent = {
        k: sent[k] for k in sent_keys(sent, task.cfg.model.lora)
    }  # FFA-LoRA: B only, as the server's layout
    vector = update_vector(from_record(reply.adapter), sent)
    weight = aggregation_weight(reply.num_examples, task.cfg.privacy.dp)
    return Message(masked_reply_content(reply, vector, weight), reply_to=to)
