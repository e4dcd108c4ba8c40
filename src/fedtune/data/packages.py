"""Installed packages that ship data files, found without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedtune.errors import FedtuneError


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FedtuneError(f"built-in data needs the PyPI package {package!r}; install it with pip")
    return Path(next(iter(spec.submodule_search_locations)))
