"""What ``fedtune serve`` serves: one base model, every run's adapters on it, named by ``model``.

Each run directory ``RUN`` gives the model id ``RUN``'s folder name (its global adapter) and,
for runs whose clients kept personal adapters on this host (FF-LoRA), ``NAME/client-PID``: the
global adapter and client PID's personal one summed, as the client uses them (``fedtune chat
--client``). ``base`` is the base model without adapter. All runs must share the base model
(``[model]`` apart from ``lora``): it is loaded once and the adapters sit on it side by side
(peft multi-adapter), switched per batch. A RAG run's ids retrieve from its reference base
before each chat answer, as ``fedtune chat RUN --rag`` does without a case base (the clients'
case bases are theirs). A split run's id generates across the split, its trunk on a trunk
service, when :func:`load_catalogue` is given a way to open one (``open_split``, from
:mod:`fedtune.serve.split`); without it the run's adapter goes on the base model like any other
run's (the whole model in this process).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedtune.config import Config
from fedtune.errors import FedtuneError
from fedtune.models.adapters import check_adapter_folder, load_adapter_folder
from fedtune.models.generation import check_can_stop
from fedtune.models.load import load_model, load_tokenizer
from fedtune.rag.chat import ChatRetrieval, chat_retrieval
from fedtune.rundir import RunDir, personal_folder, personal_rounds

log = logging.getLogger(__name__)

BASE_ID = "base"


class SplitBackend(Protocol):
    """What generates a split run's requests instead of the engine (a ``serve.split.SplitModel``)."""

    def submit(self, request: Any) -> None: ...  # a serve.engine.GenRequest (engine imports this module)

    def close(self) -> None: ...


@dataclass(frozen=True)
class Served:
    """One model id: the peft adapters summed for it (none: the base) and its run's prompt settings."""

    id: str
    template: str
    max_source_length: int
    adapters: tuple[str, ...] = ()
    run: Path | None = None
    retrieval: ChatRetrieval | None = None  # RAG runs: evidence before the last user turn
    split: SplitBackend | None = None  # split runs served split: generates instead of the engine


@dataclass
class Catalogue:
    """The loaded base model (a PeftModel once an adapter is on it), its tokenizer, the ids served."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    served: dict[str, Served] = field(default_factory=dict)
    # held while a request's prompt is built: the tokenizer and a retriever serve one thread at a time
    prompt_lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, model_id: str) -> Served | None:
        return self.served.get(model_id)

    def close(self) -> None:
        """Stop the split runs' threads and the trunk services started for them."""
        for served in self.served.values():
            if served.split is not None:
                served.split.close()


SplitOpener = Callable[[str, Config, Path, Catalogue], SplitBackend]
"""Opens a split run for serving: (model id, the run's config, its adapter folder, the catalogue)."""


def _base_key(cfg: Config) -> dict[str, object]:
    return cfg.model.model_dump(exclude={"lora"})


def run_retrieval(run: RunDir, cfg: Config, tokenizer: PreTrainedTokenizerBase) -> ChatRetrieval | None:
    """A RAG run's retrieval from its reference base, as ``fedtune chat --rag`` without a case base."""
    if not cfg.rag.enabled:
        return None
    try:
        return chat_retrieval(cfg, tokenizer)
    except FedtuneError as err:
        raise FedtuneError(f"{run.path}: a RAG run the server cannot retrieve for: {err}") from None


def personal_adapters(run: RunDir) -> dict[int, Path]:
    """Each client's newest personal adapter kept in the run directory (FF-LoRA), by client id."""
    root = run.clients_dir
    if not root.is_dir():
        return {}
    pids = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    return {
        pid: personal_folder(root, pid, rounds[-1]) for pid in pids if (rounds := personal_rounds(root, pid))
    }


def _attach(model: torch.nn.Module, folder: Path, name: str) -> torch.nn.Module:
    return load_adapter_folder(model, folder, name=name)  # type: ignore[arg-type]


def load_catalogue(run_dirs: list[str | Path], open_split: SplitOpener | None = None) -> Catalogue:
    """Load the runs' shared base model once and every adapter on it; FedtuneError on a mismatch.

    A split run's id is opened by ``open_split`` (:func:`fedtune.serve.split.split_opener`);
    without it the run is served unsplit. :meth:`Catalogue.close` stops what ``open_split`` started.
    """
    if not run_dirs:
        raise FedtuneError("fedtune serve: give at least one run directory")
    runs = [RunDir.open(d) for d in run_dirs]
    cfgs = [r.config() for r in runs]
    for run, cfg in zip(runs, cfgs, strict=True):
        if _base_key(cfg) != _base_key(cfgs[0]):
            raise FedtuneError(
                f"{run.path}: its [model] differs from {runs[0].path}'s apart from lora; "
                "serve runs of different base models from separate servers"
            )
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names) or BASE_ID in names:
        raise FedtuneError(
            f"model ids are the run folders' names, which must differ from each other and from {BASE_ID!r}: "
            f"got {names}"
        )
    folders = [check_adapter_folder(r.final_dir()) for r in runs]  # all checked before loading
    first = cfgs[0]
    model: torch.nn.Module = load_model(first.model)
    catalogue = Catalogue(model=model, tokenizer=load_tokenizer(first.model))
    check_can_stop(model, catalogue.tokenizer, f"fedtune serve {runs[0].path}")
    _add(catalogue, Served(BASE_ID, first.data.template, first.data.max_source_length))
    try:
        for i, (run, cfg, folder) in enumerate(zip(runs, cfgs, folders, strict=True)):
            if cfg.split.enabled and open_split is not None:
                _add_split_run(catalogue, run, cfg, folder, open_split)
                continue
            if cfg.split.enabled:
                log.info("%s: a split run, served unsplit (the whole model in this process)", run.path.name)
            _add_run(catalogue, f"r{i}", run, cfg, folder)
    except BaseException:
        catalogue.close()  # the trunk services started so far
        raise
    catalogue.model.eval()
    return catalogue


def _add_run(catalogue: Catalogue, name: str, run: RunDir, cfg: Config, folder: Path) -> None:
    """The run's adapter (peft adapter ``name``) and its clients' personal ones onto the base model."""
    catalogue.model = _attach(catalogue.model, folder, name)
    settings = (cfg.data.template, cfg.data.max_source_length)
    retrieval = run_retrieval(run, cfg, catalogue.tokenizer)
    _add(catalogue, Served(run.path.name, *settings, (name,), run.path, retrieval))
    for pid, personal in personal_adapters(run).items():
        catalogue.model = _attach(catalogue.model, personal, f"{name}_c{pid}")
        adapters = (name, f"{name}_c{pid}")
        _add(catalogue, Served(f"{run.path.name}/client-{pid}", *settings, adapters, run.path, retrieval))


def _add_split_run(
    catalogue: Catalogue, run: RunDir, cfg: Config, folder: Path, open_split: SplitOpener
) -> None:
    """A split run generating across the split (split runs keep no personal adapters)."""
    retrieval = run_retrieval(run, cfg, catalogue.tokenizer)
    backend = open_split(run.path.name, cfg, folder, catalogue)
    settings = (cfg.data.template, cfg.data.max_source_length)
    catalogue.served[run.path.name] = Served(run.path.name, *settings, (), run.path, retrieval, backend)


def _add(catalogue: Catalogue, served: Served) -> None:
    if served.id in catalogue.served:
        raise FedtuneError(f"model id {served.id!r} twice: serve runs whose folders have different names")
    catalogue.served[served.id] = served


def activate(model: torch.nn.Module, adapters: tuple[str, ...]) -> None:
    """Make ``adapters`` (summed) the active ones; none: the base (peft's adapter layers bypassed)."""
    if not isinstance(model, PeftModel):
        return
    if adapters:
        model.base_model.enable_adapter_layers()  # type: ignore[operator]
        model.base_model.set_adapter(list(adapters))  # type: ignore[operator]
    else:
        model.base_model.disable_adapter_layers()  # type: ignore[operator]
