"""Where a client keeps its personal adapter between rounds (FF-LoRA).

A personal adapter never leaves the client. It is stored on the client's own disk,
one peft folder per round (:func:`fedtune.rundir.personal_folder`), so a resumed run picks
up exactly the adapter the interrupted one had after the last complete round. Where the
client's state lives is :func:`fedtune.rundir.client_state_root`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from fedtune.config import LoraConfig, ModelConfig
from fedtune.models.adapters import read_adapter_folder, save_adapter_folder
from fedtune.rundir import client_state_root, personal_folder, personal_rounds

KEEP_ROUNDS = 2  # older personal folders are pruned; resume needs only the last complete round


def state_root(node_state_dir: str | None, run_dir: str | None) -> Path:
    """The client's state root: :func:`fedtune.rundir.client_state_root`."""
    return client_state_root(node_state_dir, run_dir)


def load_personal(root: Path, pid: int, before_round: int) -> dict[str, torch.Tensor] | None:
    """The newest personal adapter saved in a round < ``before_round``, or None."""
    earlier = [r for r in personal_rounds(root, pid) if r < before_round]
    return read_adapter_folder(personal_folder(root, pid, earlier[-1])) if earlier else None


def save_personal(
    state: dict[str, torch.Tensor],
    lora: LoraConfig,
    model: ModelConfig,
    root: Path,
    pid: int,
    server_round: int,
) -> Path:
    """Save the personal adapter after ``server_round``; keep only the last ``KEEP_ROUNDS``."""
    out = save_adapter_folder(state, lora, model, personal_folder(root, pid, server_round))
    for old in personal_rounds(root, pid)[:-KEEP_ROUNDS]:
        shutil.rmtree(personal_folder(root, pid, old), ignore_errors=True)
    return out


__all__ = ["KEEP_ROUNDS", "load_personal", "save_personal", "state_root"]
