"""Reaching the clients: send and gather replies by a deadline, wait for the nodes, discover them.

:func:`collect` is the round loop's send-and-receive; :func:`wait_for_nodes` waits (up to
``fed.wait_timeout``) for the SuperNodes a run needs and names the mismatch when they do not
come; :func:`discover` asks each node who it is and leaves out the nodes whose ClientApp
cannot start, so one misconfigured SuperNode does not stop a federation that can go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.config import Config
from fedtune.errors import FedtuneError
from fedtune.federated.failures import phase_outcome, train_quorum
from fedtune.federated.protocol import QueryReply, query_message, read_reply
from fedtune.federated.strategies import sample_clients
from fedtune.metrics import MetricLine

log = logging.getLogger(__name__)
_FLWR_LOG = logging.getLogger("flwr")  # Flower forwards only its own logger to `flwr run --stream`


def collect(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    on_reply: Callable[[int, int], None],
    poll: float = 0.2,
) -> list[Message]:
    """Send ``messages`` and gather the replies until all are in or ``timeout`` seconds pass.

    Flower's ``Grid.send_and_receive`` with a callback per reply (progress within a round)
    and a shorter poll; built on the Grid's public ``push_messages`` / ``pull_messages``.
    """
    pending = set(grid.push_messages(messages))
    total, replies = len(pending), []
    on_reply(0, total)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        if got:
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            on_reply(len(replies), total)
        elif pending:
            time.sleep(poll)
    return replies


def wait_for_nodes(
    grid: Grid, cfg: Config, poll: float = 0.5, *, logger: logging.Logger | None = None
) -> list[int]:
    """The node ids, once ``fed.min_available_clients`` (else every partition) are connected.

    Raises FedtuneError naming the mismatch when they are not all there after ``fed.wait_timeout``.
    """
    fed = cfg.fed
    key = "fed.min_available_clients" if fed.min_available_clients else "partition.num_partitions"
    expected = fed.min_available_clients or cfg.partition.num_partitions
    start = time.monotonic()
    next_note = start + min(30.0, fed.wait_timeout / 2)
    while len(nodes := list(grid.get_node_ids())) < expected:
        now = time.monotonic()
        if now > start + fed.wait_timeout:
            raise FedtuneError(
                f"{len(nodes)} SuperNode(s) connected within fed.wait_timeout={fed.wait_timeout:g}s, but "
                f"{key}={expected} are needed: start more SuperNodes or lower {key}"
            )
        if now > next_note:
            (logger or _FLWR_LOG).warning(
                "waiting for clients: %s of %s (%s) connected", len(nodes), expected, key
            )
            next_note = now + 30
        time.sleep(poll)
    return nodes


class Discovered(NamedTuple):
    """The clients found (node id -> partition id) and a failure line per node left out."""

    clients: dict[int, int]
    failures: list[MetricLine]


def discover(
    grid: Grid, cfg: Config, *, poll: float = 0.5, logger: logging.Logger | None = None
) -> Discovered:
    """Wait for the clients and ask each for its partition id; leave out those that fail.

    A node whose ClientApp cannot start (a missing data file, a foreign app) or does not
    answer within ``fed.wait_timeout`` is left out with one warning and never sampled; the run
    goes on while at least ``fed.min_available_clients`` (if set) and the train quorum remain.
    ``logger``: where the waiting notes and the left-out nodes are told (default: Flower's).
    """
    say = logger or _FLWR_LOG
    nodes = wait_for_nodes(grid, cfg, poll, logger=say)
    messages = [query_message(cfg, n) for n in nodes]
    wait = cfg.fed.wait_timeout  # a node's first ClientApp start (imports, data) counts as connecting
    replies = collect(grid, messages, wait, lambda *_: None, poll=poll)
    outcome = phase_outcome(0, "discovery", messages, replies, QueryReply, {}, f"fed.wait_timeout={wait:g}s")
    clients: dict[int, int] = {}
    for reply in outcome.good:
        pid = read_reply(reply, QueryReply).partition_id
        if pid in clients.values():
            raise FedtuneError(f"two nodes claim partition-id {pid}")
        clients[reply.metadata.src_node_id] = pid
    for line in outcome.failures:
        say.warning("node %s left out of the federation: %s", line["node"], line["cause"])
    fed = cfg.fed
    sampled = len(sample_clients(clients.values(), fed.fraction_train, fed.min_train_clients, cfg.seed, 1))
    need = max(fed.min_available_clients or 1, train_quorum(fed, sampled))
    if len(clients) < need:
        raise FedtuneError(
            f"{len(clients)} of {len(nodes)} clients started, fewer than the {need} needed "
            "(fed.min_available_clients, fed.min_train_replies, fed.min_train_fraction)"
        )
    log.debug("clients (node -> partition): %s", clients)
    return Discovered(clients, outcome.failures)
