"""A trivial Flower app: the cost of the deployment runtime itself, per round.

Each round sends every node a train message (``size`` float16 values, as the demo's adapter on
the wire, in one array or in ``pieces`` distinct arrays as fedtune sends one per tensor), then
an evaluate message, and waits for all replies, polling
every 0.2 s as fedtune's round loop does. The clients only echo. The round times go to the
run config's ``out`` as JSON: bench/deployment.py subtracts them from fedtune's round.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


def _phase(grid: Grid, nodes: list[int], content: RecordDict, message_type: str) -> None:
    messages = [Message(content=content, message_type=message_type, dst_node_id=n) for n in nodes]
    pending = set(grid.push_messages(messages))
    while pending:
        got = list(grid.pull_messages(pending))
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending:
            time.sleep(0.2)


@server.main()
def main(grid: Grid, context: Context) -> None:
    rounds, size = int(context.run_config["rounds"]), int(context.run_config["size"])
    while len(nodes := list(grid.get_node_ids())) < int(context.run_config["nodes"]):
        time.sleep(0.2)
    pieces = int(context.run_config["pieces"])  # 1, or as many distinct arrays as the adapter has tensors
    rng = np.random.default_rng(0)  # distinct data: Flower stores identical arrays once
    parts = np.array_split(rng.standard_normal(size).astype(np.float16), pieces)
    arrays = ArrayRecord({f"t{i}": Array(np.ascontiguousarray(part)) for i, part in enumerate(parts)})
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _phase(grid, nodes, RecordDict({"arrays": arrays}), MessageType.TRAIN)
        _phase(grid, nodes, RecordDict({"arrays": arrays}), MessageType.EVALUATE)
        times.append(time.perf_counter() - t0)
    with open(str(context.run_config["out"]), "w") as out:
        json.dump({"round_s": times, "nodes": len(nodes)}, out)


@client.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"loss": 0.0})}), reply_to=msg)
