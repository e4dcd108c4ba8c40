"""Retriever-generator alignment: the query adapter's maths and the generator's scores."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.config import ModelConfig
from fedtune.federated.aggregation.fedavg import fedavg
from fedtune.models.load import load_model, load_tokenizer
from fedtune.rag import align
from fedtune.rag.augment import Budget, Evidence


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_softmax_by_hand():
    out = align.softmax(np.array([[0.0, np.log(3.0)]]), tau=1.0)
    np.testing.assert_allclose(out, [[0.25, 0.75]], rtol=1e-6)
    np.testing.assert_allclose(
        align.softmax(np.array([[0.0, np.log(3.0)]]), tau=0.5), [[0.1, 0.9]], rtol=1e-6
    )


def test_identity_adapter_changes_nothing():
    q = unit(np.array([[3.0, 4.0], [1.0, 0.0]]))
    np.testing.assert_allclose(align.adapt_queries(q, align.identity_adapter(2)), q, rtol=1e-6)
    assert align.adapt_queries(q, None) is q


def synthetic(seed: int, n: int = 16):
    """Queries whose plain nearest candidate is passage 0, while the targets prefer passage 1."""
    rng = np.random.default_rng(seed)
    q = unit(rng.normal(size=(n, 4)))
    noise = unit(rng.normal(size=(n, 4)))
    cands = np.stack([q, unit(q + 2 * noise), unit(rng.normal(size=(n, 4)))], axis=1)
    targets = np.tile(np.array([0.1, 0.8, 0.1], dtype=np.float32), (n, 1))
    return q, cands.astype(np.float32), targets


def test_training_lowers_the_kl_to_the_targets():
    q, cands, targets = synthetic(0)
    start = align.identity_adapter(4)
    trained = align.train_query_adapter(start, q, cands, targets, epochs=200, lr=5e-2)
    before = align.kl_to_targets(start, q, cands, targets)
    assert before == pytest.approx(align.kl_to_targets(None, q, cands, targets), rel=1e-5)
    assert align.kl_to_targets(trained, q, cands, targets) < 0.8 * before


def test_clients_adapters_average_like_an_adapter():
    a, b = align.identity_adapter(2), {align.ADAPTER_KEY: np.zeros((2, 2), dtype=np.float32)}
    avg = fedavg([a, b], [3, 1])
    np.testing.assert_allclose(avg[align.ADAPTER_KEY], 0.75 * np.eye(2))


def test_answer_logliks_one_score_per_passage():
    cfg = ModelConfig(name="tiny-llama")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    budget = Budget(tok, "chat", max_source_length=128, max_passage_tokens=32)
    passages = [
        Evidence("reference", str(i), "s", t) for i, t in enumerate(["Cats purr.", "Dogs bark loudly."])
    ]
    scores = align.answer_logliks(model, budget, "What do cats do?", "Cats purr.", passages)
    assert scores.shape == (2,) and np.all(np.isfinite(scores)) and np.all(scores < 0)
    alone = align.answer_logliks(model, budget, "What do cats do?", "Cats purr.", passages[1:])
    np.testing.assert_allclose(alone, scores[1:], rtol=1e-4, atol=1e-5)  # padding does not change a score
