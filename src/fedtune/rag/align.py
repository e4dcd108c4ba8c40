"""Retriever-generator alignment: teach the query side of the dense retriever what the generator uses.

For a training question, each of its candidate passages is scored by the generator: the
mean log-likelihood of the gold answer given that passage alone as evidence. The softmax of
those scores (temperature ``tau_g``) is the target; the retriever's distribution is the
softmax of cosine similarities between the *adapted* query and the passages (``tau_r``).
The query adapter is a ``d x d`` matrix ``W`` (identity at the start) applied to the query
embedding before normalising; it is trained to minimise ``KL(target || retriever)``, as in
REPLUG's LM-supervised retrieval (Shi et al. 2023), with the passage side frozen so the
index is never rebuilt. Clients train ``W`` on their own questions and the server averages
it like an adapter (:func:`fedtune.federated.aggregation.fedavg.fedavg`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedtune.data.tokenize import tokenize_conversation
from fedtune.data.types import message
from fedtune.rag.augment import Budget, Evidence, augment
from fedtune.training.local import label_logprobs

ADAPTER_KEY = "rag.query_adapter"


def identity_adapter(dim: int) -> dict[str, np.ndarray]:
    """A query adapter that changes nothing (the start of training)."""
    return {ADAPTER_KEY: np.eye(dim, dtype=np.float32)}


def adapt_queries(vectors: np.ndarray, adapter: dict[str, np.ndarray] | None) -> np.ndarray:
    """Query embeddings through the adapter ``W`` (rows ``q W^T``), unit length again."""
    if adapter is None:
        return vectors
    out = vectors @ adapter[ADAPTER_KEY].T
    return np.ascontiguousarray(
        out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12), dtype=np.float32
    )


def answer_logliks(
    model: torch.nn.Module, budget: Budget, question: str, answer: str, passages: Sequence[Evidence]
) -> np.ndarray:
    """Mean log-likelihood per answer token of ``answer`` given each passage alone as evidence."""
    conv = [message("user", question), message("assistant", answer)]
    limits = {"max_source_length": budget.max_source_length, "max_target_length": 64}
    rows = [
        tokenize_conversation(augment(conv, [ev], budget)[0], budget.tokenizer, budget.template, **limits)
        for ev in passages
    ]
    return np.asarray(label_logprobs(model, rows, budget.tokenizer.pad_token_id or 0), dtype=np.float32)


def softmax(x: np.ndarray, tau: float) -> np.ndarray:
    """Row-wise softmax of ``x / tau``."""
    z = x / tau
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def train_query_adapter(
    adapter: dict[str, np.ndarray],
    queries: np.ndarray,
    candidates: np.ndarray,
    targets: np.ndarray,
    *,
    tau_r: float = 0.05,
    lr: float = 1e-3,
    epochs: int = 20,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``adapter`` after full-batch Adam epochs on ``KL(targets || softmax(cos(W q, p) / tau_r))``.

    ``queries``: N x d unit query embeddings; ``candidates``: N x M x d unit passage
    embeddings; ``targets``: N x M distributions (rows sum to 1).
    """
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.from_numpy(adapter[ADAPTER_KEY].copy()))
    q, p, t = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in (queries, candidates, targets))
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        qa = torch.nn.functional.normalize(q @ w.T, dim=-1)
        logits = torch.einsum("nd,nmd->nm", qa, p) / tau_r
        loss = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), t, reduction="batchmean")
        loss.backward()
        opt.step()
    return {ADAPTER_KEY: w.detach().numpy().astype(np.float32)}


def kl_to_targets(
    adapter: dict[str, np.ndarray] | None,
    queries: np.ndarray,
    candidates: np.ndarray,
    targets: np.ndarray,
    tau_r: float = 0.05,
) -> float:
    """Mean ``KL(targets || retriever)`` of an adapter (None: the plain query embeddings)."""
    qa = adapt_queries(np.asarray(queries, dtype=np.float32), adapter)
    sims = np.einsum("nd,nmd->nm", qa, candidates)
    r = softmax(sims, tau_r)
    return float(np.mean(np.sum(targets * (np.log(targets.clip(1e-12)) - np.log(r.clip(1e-12))), axis=1)))
