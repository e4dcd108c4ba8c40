"""Name -> implementation registries, checked on registration and on lookup."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedtune.errors import FedtuneError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


class Registry(Generic[T]):
    """A checked mapping from lowercase names to implementations.

    Parameters
    ----------
    kind
        What the registry holds ("data format", "template", ...); used in errors.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``; duplicates and bad names are refused."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if not _NAME.match(name):
            raise ValueError(f"bad {self.kind} name {name!r}: use lowercase letters, digits, '_' or '-'")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def get(self, name: str, *, where: str = "") -> T:
        """Look ``name`` up; an unknown name raises FedtuneError listing the known ones."""
        try:
            return self._items[name]
        except KeyError:
            at = f"{where}: " if where else ""
            known = ", ".join(sorted(self._items))
            raise FedtuneError(f"{at}unknown {self.kind} {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
