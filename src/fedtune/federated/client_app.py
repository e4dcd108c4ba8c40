"""Flower ClientApp: a thin shell that has each message worked and returns the reply.

With ``worker`` in the SuperNode's node config (``--node-config "... worker='DIR'"``) and a
``fedtune node --dir DIR`` running, the message goes to that long-lived worker
(:mod:`~fedtune.federated.node`), which keeps the model and data warm across messages and
runs. Otherwise the handlers of :mod:`~fedtune.federated.client_work` run in this process,
imported only then: a forwarding ClientApp process imports neither torch nor transformers.

``@app.query()`` is the discovery query, ``@app.query("case")`` a federated case-base search,
``@app.train`` and ``@app.evaluate`` a round's instructions. The train handler runs under
Flower's SecAgg+ mod in SecAgg+ rounds only (:mod:`~fedtune.federated.secagg_client`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedtune.federated.node import forward
from fedtune.federated.protocol.secagg import carries_secagg

app = ClientApp()


def _worked(handler: str, msg: Message, context: Context) -> Message:
    reply = forward(handler, msg, context)
    if reply is not None:
        return reply
    from fedtune.federated.client_work import handle

    return handle(handler, msg, context)


def secagg(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ mod for the messages of a SecAgg+ round; any other passes untouched."""
    if not carries_secagg(msg.content):
        return call_next(msg, context)
    from fedtune.federated.secagg_client import secagg_mod

    return secagg_mod(msg, context, call_next)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server who this client is and how much data it holds."""
    return _worked("query", msg, context)


@app.query("case")
def case_query(msg: Message, context: Context) -> Message:
    """Answer a case-base search with the top passages, where ``rag.share_case_base`` allows it."""
    return _worked("query.case", msg, context)


@app.train(mods=[secagg])
def train_handler(msg: Message, context: Context) -> Message:
    """Run the instruction's training job on this client's data; reply with the adapter and metrics."""
    return _worked("train", msg, context)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the instruction's adapter on this client's held-out data; reply with its loss."""
    return _worked("evaluate", msg, context)
