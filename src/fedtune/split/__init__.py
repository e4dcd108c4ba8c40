"""Split federated learning: the client holds head and tail, a server runs the trunk."""

from fedtune.split.client import RemoteTrunk, TrunkClient, remote_split_step
from fedtune.split.generate import split_generate
from fedtune.split.partition_model import (
    Head,
    PartCache,
    SplitParts,
    Tail,
    Trunk,
    client_adapter_state_dict,
    cut_model,
    valid_counts,
)
from fedtune.split.protocol import ProtocolError
from fedtune.split.server import TrunkService, serve
from fedtune.split.step import Crossing, StepResult, split_step

__all__ = [
    "Crossing",
    "Head",
    "PartCache",
    "ProtocolError",
    "RemoteTrunk",
    "SplitParts",
    "StepResult",
    "Tail",
    "Trunk",
    "TrunkClient",
    "TrunkService",
    "client_adapter_state_dict",
    "cut_model",
    "remote_split_step",
    "serve",
    "split_generate",
    "split_step",
    "valid_counts",
]
