"""A tiny knowledge base built once per session with the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedtune.rag.store import build
from rag.corpus import CORPUS, DUPLICATES, INFO


@pytest.fixture(scope="session")
def built_kb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus plus its duplicates, built once; copy it (``kb_copy``) before changing it."""
    out = tmp_path_factory.mktemp("kb") / "base"
    build([*CORPUS[:5], DUPLICATES[0], *CORPUS[5:], DUPLICATES[1]], out, info=INFO)
    return out


@pytest.fixture
def kb_copy(built_kb: Path, tmp_path: Path) -> Path:
    """A private copy of the session base, for tests that change or break it."""
    return Path(shutil.copytree(built_kb, tmp_path / "base"))
