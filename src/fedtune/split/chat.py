"""Generation with a split run's adapters: head and tail here, the trunk on a service.

``fedtune chat RUN_DIR`` on a split run generates across the split, as a deployed split client
would: this process runs the head and the tail with the run's client-side adapter, and the trunk
runs on a trunk service, either one given by address (``--trunk HOST:PORT``, e.g. ``fedtune
serve-trunk --config RUN_DIR/config.toml --adapter RUN_DIR/final``) or one started in this process
on loopback with the run's trunk adapter. Every part keeps its own KV cache
(:func:`~fedtune.split.split_generate`).

:func:`open_split_client` is the set-up without a session (``fedtune serve`` opens one session
per request on it); :func:`open_split_session` adds the one session a chat keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from fedtune.config import Config
from fedtune.models.adapters import read_adapter_folder
from fedtune.split.client import RemoteTrunk, TrunkClient
from fedtune.split.generate import split_generate
from fedtune.split.lm import parts_from_config
from fedtune.split.partition_model import Head, Tail
from fedtune.split.server import TrunkOptim, TrunkService, serve


@dataclass
class SplitClient:
    """A split run's head and tail here, and where its trunk service is; :meth:`close` stops a local one."""

    head: Head
    tail: Tail
    address: str
    tls_root_cert: str | None  # None: plaintext
    max_message_bytes: int
    timeout_s: float  # longest wait for one trunk reply
    server: grpc.Server | None = None  # the trunk service started in this process, if any

    def connect(self, connect_timeout_s: float | None = None) -> TrunkClient:
        """A new session with the trunk service (a ConnectionError if it does not answer in time)."""
        return TrunkClient(
            self.address,
            self.head.hidden_size,
            tls_root_cert=self.tls_root_cert,
            max_message_bytes=self.max_message_bytes,
            timeout_s=self.timeout_s,
            connect_timeout_s=connect_timeout_s,
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.stop(0.5).wait()


def open_split_client(cfg: Config, adapter: str | Path, trunk_address: str | None = None) -> SplitClient:
    """Head + tail with ``adapter``'s client-side weights, and the trunk service to use.

    Without ``trunk_address`` a trunk service with ``adapter``'s trunk weights is started in this
    process on a free loopback port (plaintext); with it, the trunk's blocks are not kept here.
    """
    state = read_adapter_folder(adapter)
    parts = parts_from_config(cfg, client_only=trunk_address is not None)
    parts.head.load_adapter_state_dict(state)
    parts.tail.load_adapter_state_dict(state)
    server, root = None, cfg.split.tls_root_cert
    if trunk_address is None:
        parts.trunk.load_adapter_state_dict(state)
        service = TrunkService(parts.trunk, TrunkOptim(step_every=0))
        server, port = serve(service, "127.0.0.1", 0)
        trunk_address, root = f"127.0.0.1:{port}", None
    limits = (int(cfg.split.max_message_mib * 2**20), cfg.split.timeout_s)
    return SplitClient(parts.head, parts.tail, trunk_address, root, *limits, server=server)


@dataclass
class SplitSession:
    """A split client's generation set-up; :meth:`close` ends the stream (and a local service)."""

    head: Head
    tail: Tail
    client: TrunkClient
    trunk: RemoteTrunk
    server: grpc.Server | None = None

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | Sequence[int] | None
    ) -> list[int]:
        """Greedy continuation of one prompt (1, T): the new tokens."""
        return split_generate(self.head, self.trunk, self.tail, input_ids, max_new_tokens, eos_token_id)[0]

    def close(self) -> None:
        self.client.close()
        if self.server is not None:
            self.server.stop(0.5).wait()


def open_split_session(cfg: Config, adapter: str | Path, trunk_address: str | None = None) -> SplitSession:
    """:func:`open_split_client` and one session with its trunk service, kept for every turn."""
    split = open_split_client(cfg, adapter, trunk_address)
    try:
        client = split.connect()
    except BaseException:
        split.close()
        raise
    return SplitSession(split.head, split.tail, client, RemoteTrunk(client), split.server)


__all__ = ["SplitClient", "SplitSession", "open_split_client", "open_split_session"]
