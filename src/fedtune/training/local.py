"""One client's local training and held-out evaluation. Knows nothing of Flower.

The input is a tokenized ``datasets.Dataset`` (``input_ids``, ``labels``,
``attention_mask``); labels of -100 carry no loss. Batches are padded by
transformers' ``DataCollatorForSeq2Seq``; optimisation is AdamW with a transformers
schedule. Everything random is drawn from the ``seed`` passed in, so a client's
round is a pure function of (adapter in, data, config, seed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, get_scheduler

from fedtune.config import TrainConfig
from fedtune.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:  # opacus and dp-accounting load only for DP-SGD (0.6 s per process)
    from fedtune.privacy.local_dp import LocalDp

MODEL_COLUMNS = ["input_ids", "labels", "attention_mask"]


@dataclass(frozen=True)
class TrainResult:
    """What a round of local training reports: loss, steps, examples and timing."""

    loss: float  # mean of the per-step losses
    steps: int
    num_examples: int  # examples in the client's training set (the FedAvg weight)
    seconds: float
    first_step_at: float  # wall clock (time.time()) when the first optimizer step finished


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation on held-out data reports: loss, perplexity, examples, tokens and time."""

    loss: float  # token-weighted mean cross-entropy over labelled tokens
    perplexity: float
    num_examples: int
    num_tokens: int
    seconds: float


def make_loader(
    ds: Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int, *, shuffle: bool, seed: int = 0
) -> DataLoader[dict[str, torch.Tensor]]:
    """Batches of ``ds``'s model columns, padded per batch (labels with -100); shuffled from ``seed``."""
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds.select_columns(MODEL_COLUMNS),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collator,
        generator=generator,
    )


def _cycle(loader: DataLoader[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def _steps(
    loader: DataLoader[dict[str, torch.Tensor]], accum: int
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """The micro-batches of each optimizer step: ``accum`` batches, cycling over the loader."""
    batches = _cycle(loader)
    while True:
        yield [next(batches) for _ in range(accum)]


def _backward(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    accum: int,
    params: list[torch.nn.Parameter],
    anchor: list[torch.Tensor],
    proximal_mu: float,
) -> float:
    """Backpropagate (the batch's token-mean loss + FedProx's term) / ``accum``; return that value."""
    loss = model(**batch).loss
    if anchor:
        loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
    loss = loss / accum
    loss.backward()
    return float(loss.item())


def planned_steps(cfg: TrainConfig, num_examples: int) -> int:
    """Optimizer steps for one round: ``max_steps``, or ``epochs`` over the data."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    assert cfg.epochs is not None
    batches = math.ceil(num_examples / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * batches / cfg.grad_accum))


def train(
    model: torch.nn.Module,
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    cfg: TrainConfig,
    *,
    seed: int,
    proximal_mu: float = 0.0,
    correction: Mapping[str, torch.Tensor] | None = None,
    dp: LocalDp | None = None,
) -> TrainResult:
    """Run the configured number of optimizer steps on ``ds`` from the model's current weights.

    ``proximal_mu > 0`` adds FedProx's ``mu/2 * ||w - w_start||^2`` over the trainable
    (adapter) weights, keeping the client near the global adapter it started from.
    ``correction`` (parameter name -> tensor) is added to those parameters' gradients
    before every step: SCAFFOLD's ``c - c_i``.
    ``dp`` trains with DP-SGD (:mod:`fedtune.privacy.local_dp`): Poisson-sampled batches,
    per-example clipping and noise replace the shuffled batches, the batch gradient and
    ``cfg.max_grad_norm``; the proximal gradient and the correction are added after the
    noise; the loss is the mean per-example loss of the steps that sampled an example.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)  # LoRA dropout
    steps = planned_steps(cfg, len(ds))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    corrected = [(p, correction[n]) for n, p in named if correction and n in correction]
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps
    )
    device = next(model.parameters()).device
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    private = None
    if dp is not None:
        from fedtune.privacy.local_dp import PrivateGradients

        private = PrivateGradients(model, dp, cfg, steps)
    loader = make_loader(ds, tokenizer, cfg.batch_size, shuffle=True, seed=seed)
    batches = private.sampled_steps(loader) if private else _steps(loader, cfg.grad_accum)
    model.train()
    losses: list[float] = []
    first_step_at = 0.0
    with private or nullcontext():
        for micro in islice(batches, steps):
            micro = [{k: v.to(device) for k, v in batch.items()} for batch in micro]
            if private:
                step_loss = private.step(micro)  # None: the step sampled no example
                for p, a in zip(params, anchor, strict=False):  # FedProx's mu (w - w0), if any
                    p.grad.add_(p.detach() - a, alpha=proximal_mu)  # type: ignore[union-attr]
            else:
                step_loss = sum(
                    _backward(model, b, cfg.grad_accum, params, anchor, proximal_mu) for b in micro
                )
            for param, extra in corrected:
                param.grad.add_(extra)  # type: ignore[union-attr]
            if cfg.max_grad_norm is not None and not private:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step_loss is not None:
                losses.append(step_loss)
            first_step_at = first_step_at or time.time()
    model.eval()
    return TrainResult(
        loss=sum(losses) / len(losses) if losses else math.nan,
        steps=steps,
        num_examples=len(ds),
        seconds=time.perf_counter() - start,
        first_step_at=first_step_at,
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, ds: Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int
) -> EvalResult:
    """Held-out loss: summed token cross-entropy / labelled tokens (not a mean of batch means)."""
    start = time.perf_counter()
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in make_loader(ds, tokenizer, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # position t predicts token t+1
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).item()
        tokens += int((shift_labels != -100).sum())
    loss = total / max(tokens, 1)
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        num_examples=len(ds),
        num_tokens=tokens,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def label_logprobs(
    model: torch.nn.Module, rows: Sequence[Mapping[str, list[int]]], pad_id: int
) -> list[float]:
    """Mean log-probability per labelled token of each tokenized row.

    Rows hold ``input_ids``, ``labels`` and ``attention_mask``; they are padded into one batch
    on the model's device.
    """
    width = max(len(r["input_ids"]) for r in rows)
    device = next(model.parameters()).device

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], device=device)

    logits = model(input_ids=padded("input_ids", pad_id), attention_mask=padded("attention_mask", 0)).logits
    target = padded("labels", IGNORE_INDEX)[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1))
    valid = target != IGNORE_INDEX
    return (logp.squeeze(-1) * valid).sum(1).div(valid.sum(1).clamp(min=1)).tolist()
