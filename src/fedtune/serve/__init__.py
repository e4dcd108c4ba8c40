"""``fedtune serve``: runs' adapters behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

:func:`build_app` loads runs and returns the ASGI app; :func:`serve` runs it under uvicorn.
The parts: :mod:`.models` (which ids, one base model with the adapters on it), :mod:`.engine`
(the generation thread that batches concurrent requests), :mod:`.api` (request bodies, limits,
errors), :mod:`.app` (the routes).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from fedtune.serve.api import Limits
from fedtune.serve.app import create_app
from fedtune.serve.engine import Engine
from fedtune.serve.models import load_catalogue

__all__ = ["Engine", "Limits", "build_app", "create_app", "load_catalogue", "serve"]


def build_app(run_dirs: list[str | Path], limits: Limits | None = None, *, max_batch: int = 16) -> FastAPI:
    """Load the runs (one base model, all adapters) and return the app serving them."""
    return create_app(Engine(load_catalogue(run_dirs), max_batch=max_batch), limits)


def serve(
    run_dirs: list[str | Path], *, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None
) -> None:
    """Serve the runs on ``host:port`` until interrupted."""
    import uvicorn

    uvicorn.run(build_app(run_dirs, limits), host=host, port=port, log_level="warning")
