"""Use a run's adapter: load base + adapter as the run trained it, evaluate, chat.

The run's own config decides the model, the dtype, the prompt template and the RoPE
scaling, so chat and evaluation see the model exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.config import Config
from fedtune.data.pipeline import client_tokenized, partitions
from fedtune.data.tokenize import build_generation_input
from fedtune.data.types import Conversation
from fedtune.errors import FedtuneError
from fedtune.models.adapters import check_adapter_folder, load_adapter_folder
from fedtune.models.generation import input_device, pad_id, stop_ids
from fedtune.models.load import load_model, load_tokenizer
from fedtune.rundir import RunDir
from fedtune.training.local import evaluate

if TYPE_CHECKING:
    from fedtune.split.chat import SplitSession


@dataclass
class Loaded:
    """A model ready for :func:`reply`: the run's config, the model or split session, its tokenizer."""

    cfg: Config
    model: torch.nn.Module | None  # None when generating across the split (``split``)
    tokenizer: PreTrainedTokenizerBase
    adapter: Path | None
    split: SplitSession | None = None


def load_split_run(
    run_dir: str | Path, *, adapter: str | Path | None = None, trunk: str | None = None
) -> Loaded:
    """A split run's head + tail here and its trunk on a service; :func:`reply` generates across the split.

    ``trunk`` is the service's address (default: one started here on loopback). Close with
    ``loaded.split.close()``.
    """
    from fedtune.split.chat import open_split_session

    run = RunDir.open(run_dir)
    cfg = run.config()
    if not cfg.split.enabled:
        raise FedtuneError(f"{run.path}: not a split run (split.enabled is false)")
    folder = check_adapter_folder(adapter or run.final_dir())
    session = open_split_session(cfg, folder, trunk)
    return Loaded(cfg=cfg, model=None, tokenizer=load_tokenizer(cfg.model), adapter=folder, split=session)


def load_run(
    run_dir: str | Path,
    *,
    adapter: str | Path | None = None,
    base_only: bool = False,
    client: int | None = None,
) -> Loaded:
    """The run's base model with its final adapter (or ``adapter``, or none).

    ``client`` (FF-LoRA runs) fuses in that client's latest personal adapter, as the
    client itself uses it; it must be on this host (:meth:`RunDir.latest_personal`).
    A missing or corrupt adapter folder is a FedtuneError naming it.
    """
    run = RunDir.open(run_dir)
    cfg = run.config()
    # checked before the base model loads, so a bad folder fails at once
    folder = None if base_only else check_adapter_folder(adapter or run.final_dir())
    personal = None if base_only or client is None else check_adapter_folder(run.latest_personal(client))
    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg.model)
    model: torch.nn.Module = base
    if folder is not None:
        peft_model = load_adapter_folder(base, folder)
        if personal is not None:
            load_adapter_folder(peft_model, personal, name="personal")
            peft_model.base_model.set_adapter(["default", "personal"])  # type: ignore[operator]
        model = peft_model
    model.eval()
    return Loaded(cfg=cfg, model=model, tokenizer=tokenizer, adapter=folder)


def evaluate_clients(loaded: Loaded) -> dict[int, float]:
    """Held-out loss of every client's test split under the loaded model."""
    cfg = loaded.cfg
    out = {}
    for pid in range(len(partitions(cfg))):
        _, test = client_tokenized(cfg, loaded.tokenizer, pid)
        assert loaded.model is not None
        out[pid] = evaluate(loaded.model, test, loaded.tokenizer, cfg.train.eval_batch_size).loss
    return out


@torch.no_grad()
def reply(loaded: Loaded, history: Conversation, *, max_new_tokens: int = 128) -> str:
    """Greedy reply to a conversation whose last message is the user's."""
    if not history or history[-1]["role"] != "user":
        raise FedtuneError("the conversation must end with a user message")
    cfg = loaded.cfg
    ids = build_generation_input(history, loaded.tokenizer, cfg.data.template, cfg.data.max_source_length)
    input_ids = torch.tensor([ids])
    if loaded.split is not None:
        new = loaded.split.generate(input_ids, max_new_tokens, stop_ids(None, loaded.tokenizer))
        return str(loaded.tokenizer.decode(new, skip_special_tokens=True)).strip()
    assert loaded.model is not None
    return greedy(loaded.model, loaded.tokenizer, ids, max_new_tokens)


@torch.no_grad()
def greedy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, ids: list[int], max_new_tokens: int
) -> str:
    """The greedy continuation of the prompt ``ids`` (up to EOS or ``max_new_tokens``), decoded."""
    input_ids = torch.tensor([ids], device=input_device(model))
    stops = stop_ids(model, tokenizer)
    output = model.generate(  # type: ignore[operator]
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id(tokenizer, stops),
        eos_token_id=stops,
    )
    return str(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)).strip()
