"""One rule for reading a JSON or record scalar as a declared type (protocol and metrics)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

NO_MATCH = object()


def match_scalar(value: Any, kinds: Iterable[Any]) -> Any:
    """``value`` as the first of ``kinds`` it fits, else :data:`NO_MATCH`.

    ``kinds`` are ``type(None)``, bool, int, float and str. A bool is never an int or a float
    (JSON and Flower keep them apart); an int is a float (``1`` for ``1.0``).
    """
    for kind in kinds:
        if kind is type(None) and value is None:
            return None
        if kind is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue
        if kind is int and isinstance(value, int):
            return value
        if kind is float and isinstance(value, int | float):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    return NO_MATCH
