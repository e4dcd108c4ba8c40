"""Where a client keeps its personal adapter between rounds (FF-LoRA).

A personal adapter never leaves the client. It is stored on the client's own disk,
one peft folder per round (``<state dir>/<partition id>/personal-NNNN/``), so a
resumed run picks up exactly the adapter the interrupted one had after the last
complete round. The state dir is the SuperNode's ``state-dir`` node config if given;
else ``<run dir>/clients`` when the run directory is on this host (simulation); else
``$FEDTUNE_CACHE/clients/<run name>``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from fedtune.config import LoraConfig, ModelConfig
from fedtune.models.adapters import read_adapter_folder, save_adapter_folder
from fedtune.models.load import cache_dir

KEEP_ROUNDS = 2  # older personal folders are pruned; resume needs only the last complete round


def state_root(node_state_dir: str | None, run_dir: str | None) -> Path:
    if node_state_dir:
        return Path(node_state_dir)
    if not run_dir:
        return cache_dir() / "clients" / "unnamed-run"
    run = Path(run_dir)
    if run.is_dir():
        return run / "clients"
    return cache_dir() / "clients" / run.name


def personal_folder(root: Path, pid: int, server_round: int) -> Path:
    return root / str(pid) / f"personal-{server_round:04d}"


def load_personal(root: Path, pid: int, before_round: int) -> dict[str, torch.Tensor] | None:
    """The newest personal adapter saved in a round < ``before_round``, or None."""
    folder = root / str(pid)
    if not folder.is_dir():
        return None
    rounds = sorted(
        int(p.name.split("-")[1]) for p in folder.glob("personal-*") if p.name.split("-")[1].isdigit()
    )
    earlier = [r for r in rounds if r < before_round]
    return read_adapter_folder(personal_folder(root, pid, earlier[-1])) if earlier else None


def save_personal(
    state: dict[str, torch.Tensor],
    lora: LoraConfig,
    model: ModelConfig,
    root: Path,
    pid: int,
    server_round: int,
) -> Path:
    out = save_adapter_folder(state, lora, model, personal_folder(root, pid, server_round))
    for old in sorted((root / str(pid)).glob("personal-*"))[:-KEEP_ROUNDS]:
        shutil.rmtree(old, ignore_errors=True)
    return out
