"""The run directory: the unit a user keeps (resume, report, eval and chat all take it).

::

    RUN_DIR/
      config.toml          resolved config
      metrics.jsonl        one JSON object per client per phase per round (+ "server" lines)
      state.json           {"last_round": k}: rounds 1..k are complete
      rounds/0000/         the starting adapter; rounds/NNNN/ the global adapter after round N
      final/               the global adapter after the last round
      report/              plots and index.html

Every file is written atomically (temp file + rename) and a round counts as complete
only once its adapter and its metrics are on disk, so a crash loses at most the round
in progress and ``--resume`` continues from the last complete one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from fedtune.config import Config, LoraConfig, config_from_toml_text
from fedtune.errors import FedtuneError
from fedtune.models.adapters import read_adapter_folder, save_adapter_folder

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
STATE = "state.json"
SERVER_STATE = "server_state.safetensors"  # optimiser moments of fedadam & co., for resume


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """Reader and writer of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- creation -----------------------------------------------------------------
    @classmethod
    def create(cls, cfg: Config) -> RunDir:
        """A new, uniquely named run directory holding the resolved config."""
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        root = Path(cfg.run.output_dir)
        path = root / f"{cfg.run.name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = root / f"{cfg.run.name}-{stamp}-{n}"
        path.mkdir(parents=True)
        run = cls(path)
        write_text_atomic(run.path / CONFIG, cfg.to_toml())
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        if not (run.path / CONFIG).is_file():
            raise FedtuneError(f"{run.path}: not a fedtune run directory (no {CONFIG})")
        return run

    def config(self) -> Config:
        path = self.path / CONFIG
        return config_from_toml_text(path.read_text(encoding="utf-8"), source=str(path))

    # -- rounds -------------------------------------------------------------------
    def round_dir(self, server_round: int) -> Path:
        return self.path / "rounds" / f"{server_round:04d}"

    def save_round(
        self,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        cfg: Config,
        *,
        lora: LoraConfig | None = None,
        server_state: Mapping[str, np.ndarray] | None = None,
    ) -> Path:
        """The global adapter after a round (+ the server optimiser's state, if any).

        ``lora`` overrides ``model.lora`` where the global adapter has its own rank
        (heterogeneous-rank strategies keep it at scaling 1).
        """
        folder = save_adapter_folder(state, lora or cfg.model.lora, cfg.model, self.round_dir(server_round))
        if server_state:
            tmp = folder / f".{SERVER_STATE}"
            save_numpy({k: np.ascontiguousarray(v) for k, v in server_state.items()}, str(tmp))
            os.replace(tmp, folder / SERVER_STATE)
        return folder

    def load_server_state(self, server_round: int) -> dict[str, np.ndarray]:
        path = self.round_dir(server_round) / SERVER_STATE
        return load_numpy(str(path)) if path.is_file() else {}

    def load_round(self, server_round: int) -> dict[str, torch.Tensor]:
        return read_adapter_folder(self.round_dir(server_round))

    def last_round(self) -> int:
        """The last complete round: -1 before round 0 (the starting adapter's evaluation)."""
        path = self.path / STATE
        if not path.is_file():
            return -1
        return int(json.loads(path.read_text())["last_round"])

    def mark_complete(self, server_round: int) -> None:
        write_text_atomic(self.path / STATE, json.dumps({"last_round": server_round}) + "\n")

    def save_final(
        self, state: Mapping[str, torch.Tensor], cfg: Config, *, lora: LoraConfig | None = None
    ) -> Path:
        return save_adapter_folder(state, lora or cfg.model.lora, cfg.model, self.path / "final")

    def final_dir(self) -> Path:
        final = self.path / "final"
        if final.is_dir():
            return final
        last = self.last_round()
        if last <= 0:
            raise FedtuneError(f"{self.path}: no complete round yet, so no adapter to use")
        return self.round_dir(last)

    # -- metrics ------------------------------------------------------------------
    def append_metrics(self, records: Iterable[Mapping[str, Any]]) -> None:
        lines = "".join(json.dumps(dict(r), sort_keys=True) + "\n" for r in records)
        with open(self.path / METRICS, "a", encoding="utf-8") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def rollback_to(self, server_round: int) -> None:
        """Forget anything past ``server_round`` (the remains of an interrupted round)."""
        kept = [r for r in self.metrics() if int(r.get("round", 0)) <= server_round]
        write_text_atomic(self.path / METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        rounds = self.path / "rounds"
        if rounds.is_dir():
            for child in rounds.iterdir():
                if child.name.isdigit() and int(child.name) > server_round:
                    shutil.rmtree(child)
        shutil.rmtree(self.path / "final", ignore_errors=True)
