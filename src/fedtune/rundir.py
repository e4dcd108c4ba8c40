"""The run directory: the unit a user keeps (resume, report, eval and chat all take it).

::

    RUN_DIR/
      config.toml          resolved config
      base.json            how the base model was loaded at the start ({"model.quantization": ...}):
                           a resume must load it the same way
      metrics.jsonl        one JSON object per client per phase per round (+ "server" lines)
      state.json           {"last_round": k}: rounds 1..k are complete (+ "stopped" or "failed": why)
      rounds/0000/         the starting adapter; rounds/NNNN/ the global adapter after round N
                           (+ server_state.safetensors: the server optimiser's moments)
      final/               the global adapter after the last round
        privacy.json       with privacy.dp: ε spent, δ, accountant, noise, clipping, sampling
      report/              plots and index.html
      eval/                ``fedtune eval`` / ``fedtune judge`` results (docs/evaluation.md):
        generation.json    generation metrics per variant (base, adapter, personal), client, union
        answers.jsonl      the generated answers, one line per variant x example
        lm_eval.json       lm-evaluation-harness results for base and adapter
        judge-single.json  LLM-as-judge grades; judge-vs-<other run>.json: pairwise verdicts
      clients/<id>/        a simulated client's own state (see :func:`client_state_root`):
        personal-NNNN/     its FF-LoRA personal adapter after round N
        stack.safetensors  the FLoRA stack it last received (``fed.stack_mode = "merge"``)

This module is the one place that spells these names; everything else asks :class:`RunDir`
(or, on a client, the module-level functions). Every file is written atomically
(:mod:`fedtune.io`) and a round counts as complete only once its adapter and its metrics are
on disk, so a crash loses at most the round in progress and ``--resume`` continues from the
last complete one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.config import Config, LoraConfig, config_from_toml_text
from fedtune.errors import FedtuneError
from fedtune.io import atomic_file, write_text_atomic

if TYPE_CHECKING:  # torch and peft are imported only where adapters are read or written,
    import numpy as np  # so that reports and path look-ups stay light
    import torch

CONFIG = "config.toml"
BASE = "base.json"
METRICS = "metrics.jsonl"
STATE = "state.json"
PRIVACY = "privacy.json"
SERVER_STATE = "server_state.safetensors"  # optimiser moments of fedadam & co., for resume
ROUNDS = "rounds"
FINAL = "final"
REPORT = "report"
REPORT_PAGE = "index.html"
CLIENTS = "clients"
PERSONAL = "personal-"  # + the round, 4 digits
STACK_FILE = "stack.safetensors"
EVAL = "eval"
GENERATION = "generation.json"
ANSWERS = "answers.jsonl"
LM_EVAL = "lm_eval.json"
JUDGE_SINGLE = "judge-single.json"
JUDGE_VS = "judge-vs-"  # + the other run directory's name + .json
RESIDUAL = "residual-"  # + the round, 4 digits, + .safetensors: fed.error_feedback's rounding error


def _base(cfg: Config) -> dict[str, Any]:
    """How ``cfg`` loads the base model, as ``base.json`` records it (dotted key -> value)."""
    q = cfg.model.quantization
    return {"model.quantization": None if q is None else q.model_dump()}


class RunDir:
    """Reader and writer of one run directory, and the owner of its paths."""

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
        write_text_atomic(run.config_file, cfg.to_toml())
        write_text_atomic(path / BASE, json.dumps(_base(cfg), sort_keys=True) + "\n")
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        if not run.config_file.is_file():
            raise FedtuneError(f"{run.path}: not a fedtune run directory (no {CONFIG})")
        return run

    # -- paths --------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT

    @property
    def report_page(self) -> Path:
        return self.report_dir / REPORT_PAGE

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL

    @property
    def generation_file(self) -> Path:
        return self.eval_dir / GENERATION

    @property
    def answers_file(self) -> Path:
        return self.eval_dir / ANSWERS

    @property
    def lm_eval_file(self) -> Path:
        return self.eval_dir / LM_EVAL

    @property
    def judge_single_file(self) -> Path:
        return self.eval_dir / JUDGE_SINGLE

    def judge_vs_file(self, other: str | Path) -> Path:
        """Pairwise verdicts of this run's answers against run directory ``other``'s."""
        return self.eval_dir / f"{JUDGE_VS}{Path(other).resolve().name}.json"

    @property
    def clients_dir(self) -> Path:
        """Where simulated clients keep their own state when the run directory is on their host."""
        return self.path / CLIENTS

    def round_dir(self, server_round: int) -> Path:
        return self.path / ROUNDS / f"{server_round:04d}"

    def final_dir(self) -> Path:
        """The adapter to use: ``final/``, or the last complete round's while the run is unfinished."""
        final = self.path / FINAL
        if final.is_dir():
            return final
        last = self.last_round()
        if last <= 0:
            raise FedtuneError(f"{self.path}: no complete round yet, so no adapter to use")
        return self.round_dir(last)

    def latest_personal(self, pid: int) -> Path:
        """Client ``pid``'s newest personal adapter folder, kept in this run directory (simulation)."""
        rounds = personal_rounds(self.clients_dir, pid)
        if not rounds:
            raise FedtuneError(f"{self.path}: no personal adapter of client {pid} on this host")
        return personal_folder(self.clients_dir, pid, rounds[-1])

    # -- config -------------------------------------------------------------------
    def config(self) -> Config:
        path = self.config_file
        return config_from_toml_text(path.read_text(encoding="utf-8"), source=str(path))

    def resume_config(self) -> Config:
        """The config to continue this run with: its ``config.toml``, checked against ``base.json``.

        Refused if it no longer loads the base as the run started (``base.json``; absent in
        older runs: not checked): the adapter was trained on that base, and a resume on another
        quantisation would mix two.
        """
        cfg = self.config()
        path = self.path / BASE
        if not path.is_file():
            return cfg
        started, now = json.loads(path.read_text(encoding="utf-8")), _base(cfg)
        for key, value in started.items():
            if now.get(key) != value:
                raise FedtuneError(
                    f"{key}: {self.config_file} has {now.get(key)!r}, but the run started with {value!r} "
                    f"({path.name}); a run and its resume must load the base alike"
                )
        return cfg

    # -- rounds -------------------------------------------------------------------
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
        from fedtune.models.adapters import save_adapter_folder

        folder = save_adapter_folder(state, lora or cfg.model.lora, cfg.model, self.round_dir(server_round))
        if server_state:
            import numpy as np
            from safetensors.numpy import save_file

            with atomic_file(folder / SERVER_STATE) as tmp:
                save_file({k: np.ascontiguousarray(v) for k, v in server_state.items()}, str(tmp))
        return folder

    def load_server_state(self, server_round: int) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        path = self.round_dir(server_round) / SERVER_STATE
        return load_file(str(path)) if path.is_file() else {}

    def load_round(self, server_round: int) -> dict[str, torch.Tensor]:
        from fedtune.models.adapters import read_adapter_folder

        return read_adapter_folder(self.round_dir(server_round))

    def last_round(self) -> int:
        """The last complete round: -1 before round 0 (the starting adapter's evaluation)."""
        path = self.path / STATE
        if not path.is_file():
            return -1
        return int(json.loads(path.read_text())["last_round"])

    def mark_complete(self, server_round: int) -> None:
        write_text_atomic(self.path / STATE, json.dumps({"last_round": server_round}) + "\n")

    def mark_stopped(self, reason: str) -> None:
        """The run ended before ``fed.rounds`` on purpose (e.g. its privacy budget), for this reason."""
        state = {"last_round": self.last_round(), "stopped": reason}
        write_text_atomic(self.path / STATE, json.dumps(state) + "\n")

    def stopped(self) -> str | None:
        """Why the run ended early on purpose, or None."""
        return self._state().get("stopped")

    def mark_failed(self, cause: str) -> None:
        """The run failed (e.g. a round below its quorum); rounds 1..last are complete, resumable."""
        state = {"last_round": self.last_round(), "failed": cause}
        write_text_atomic(self.path / STATE, json.dumps(state) + "\n")

    def failed(self) -> str | None:
        """Why the run failed, or None (a later complete round clears it)."""
        return self._state().get("failed")

    def _state(self) -> dict[str, Any]:
        path = self.path / STATE
        return dict(json.loads(path.read_text())) if path.is_file() else {}

    def save_final(
        self, state: Mapping[str, torch.Tensor], cfg: Config, *, lora: LoraConfig | None = None
    ) -> Path:
        from fedtune.models.adapters import save_adapter_folder

        return save_adapter_folder(state, lora or cfg.model.lora, cfg.model, self.path / FINAL)

    def save_privacy(self, folder: Path, summary: Mapping[str, Any]) -> None:
        """``privacy.json`` beside an adapter: the DP guarantee it was released under."""
        write_text_atomic(folder / PRIVACY, json.dumps(dict(summary), indent=2, sort_keys=True) + "\n")

    def privacy(self) -> dict[str, Any] | None:
        """``final/privacy.json``, or None for a run without client-level DP."""
        path = self.path / FINAL / PRIVACY
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    # -- metrics ------------------------------------------------------------------
    def append_metrics(self, records: Iterable[Mapping[str, Any]]) -> None:
        lines = "".join(json.dumps(dict(r), sort_keys=True) + "\n" for r in records)
        with open(self.metrics_file, "a", encoding="utf-8") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        path = self.metrics_file
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def rollback_to(self, server_round: int) -> None:
        """Forget anything past ``server_round`` (the remains of an interrupted round).

        Failure lines stay: the clients did fail, and the report shows it.
        """
        kept = [r for r in self.metrics() if int(r.get("round", 0)) <= server_round or "event" in r]
        write_text_atomic(self.metrics_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        rounds = self.path / ROUNDS
        if rounds.is_dir():
            for child in rounds.iterdir():
                if child.name.isdigit() and int(child.name) > server_round:
                    shutil.rmtree(child)
        shutil.rmtree(self.path / FINAL, ignore_errors=True)


# -- a client's own state -------------------------------------------------------------
# A client may run on another host than the run directory, so these take the state root
# (``client_state_root``) rather than a RunDir.


def client_state_root(node_state_dir: str | None, run_dir: str | None) -> Path:
    """Where a client keeps its state between rounds (personal adapters, the FLoRA stack).

    Under the SuperNode's ``state-dir`` node config if given (``<state-dir>/runs/<run dir's
    name>``: a SuperNode serves many runs, and one run's state must never reach another); else
    ``<run dir>/clients`` when the run directory is on this host (simulation); else
    ``$FEDTUNE_CACHE/clients/<run dir's name>``.
    """
    from fedtune.models.load import cache_dir

    if node_state_dir:
        return Path(node_state_dir) / "runs" / (RunDir(run_dir).path.name if run_dir else "unnamed-run")
    if not run_dir:
        return cache_dir() / CLIENTS / "unnamed-run"
    run = RunDir(run_dir)
    if run.path.is_dir():
        return run.clients_dir
    return cache_dir() / CLIENTS / run.path.name


def client_folder(root: Path, pid: int) -> Path:
    """Partition ``pid``'s folder under a state root."""
    return root / str(pid)


def personal_folder(root: Path, pid: int, server_round: int) -> Path:
    """The personal adapter folder of partition ``pid`` after ``server_round``."""
    return client_folder(root, pid) / f"{PERSONAL}{server_round:04d}"


def personal_rounds(root: Path, pid: int) -> list[int]:
    """The rounds of partition ``pid``'s personal adapter folders, ascending."""
    folder = client_folder(root, pid)
    if not folder.is_dir():
        return []
    names = (p.name.removeprefix(PERSONAL) for p in folder.glob(f"{PERSONAL}*") if p.is_dir())
    return sorted(int(n) for n in names if n.isdigit())


def stack_file(root: Path, pid: int) -> Path:
    """Partition ``pid``'s cached FLoRA stack."""
    return client_folder(root, pid) / STACK_FILE


def residual_file(root: Path, pid: int, server_round: int) -> Path:
    """Partition ``pid``'s rounding error left after its update of ``server_round`` (error feedback)."""
    return client_folder(root, pid) / f"{RESIDUAL}{server_round:04d}.safetensors"


def residual_rounds(root: Path, pid: int) -> list[int]:
    """The rounds of partition ``pid``'s residual files, ascending."""
    folder = client_folder(root, pid)
    names = (p.name.removeprefix(RESIDUAL).removesuffix(".safetensors") for p in folder.glob(f"{RESIDUAL}*"))
    return sorted(int(n) for n in names if n.isdigit())


__all__ = [
    "RunDir",
    "client_folder",
    "client_state_root",
    "personal_folder",
    "personal_rounds",
    "residual_file",
    "residual_rounds",
    "stack_file",
]
