"""``fedtune serve``: runs' adapters behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

:func:`build_app` loads runs and returns the ASGI app; :func:`serve` runs it under uvicorn.
The parts: :mod:`.models` (which ids, one base model with the adapters on it), :mod:`.engine`
(the generation thread that batches concurrent requests), :mod:`.split` (split runs: head and
tail here, the trunk on a trunk service), :mod:`.api` (request bodies, limits, errors),
:mod:`.app` (the routes).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from fedtune.errors import FedtuneError
from fedtune.serve.api import Limits
from fedtune.serve.app import create_app
from fedtune.serve.engine import Engine
from fedtune.serve.models import Catalogue, load_catalogue
from fedtune.serve.split import SplitServing, check_split_serving, split_opener

__all__ = ["Engine", "Limits", "SplitServing", "build_app", "create_app", "load_catalogue", "serve"]


def build_app(
    run_dirs: list[str | Path],
    limits: Limits | None = None,
    *,
    max_batch: int = 16,
    split: SplitServing | None = None,
) -> FastAPI:
    """Load the runs (one base model, all adapters; split runs as ``split`` says) and return the app.

    Split runs generate across the split by default (:class:`SplitServing`); trunk services
    started for them stop when the app shuts down (its lifespan).
    """
    split = split or SplitServing()
    check_split_serving(run_dirs, split)
    catalogue = load_catalogue(run_dirs, split_opener(split))
    try:
        check_prompt_limit(catalogue, limits)
        engine = Engine(catalogue, max_batch=max_batch)
    except BaseException:
        catalogue.close()
        raise
    return create_app(engine, limits)


def check_prompt_limit(catalogue: Catalogue, limits: Limits | None) -> None:
    """Refuse ``--max-prompt-tokens`` past the base model's positions (FedtuneError)."""
    asked = limits.max_prompt_tokens if limits else None
    positions = getattr(getattr(catalogue.model, "config", None), "max_position_embeddings", None)
    if asked is not None and isinstance(positions, int) and asked > positions:
        raise FedtuneError(
            f"--max-prompt-tokens {asked} is more than the base model's {positions} positions "
            "(max_position_embeddings)"
        )


def serve(
    run_dirs: list[str | Path],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    split: SplitServing | None = None,
) -> None:
    """Serve the runs on ``host:port`` until interrupted."""
    import uvicorn

    uvicorn.run(build_app(run_dirs, limits, split=split), host=host, port=port, log_level="warning")
