"""Reading configs: TOML files (with ``extends``), dotted ``--set`` overrides, Flower's run_config.

Errors name where a bad value came from: the file, the ``--set`` item, or the run config.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedtune.config.sections import Config
from fedtune.errors import FedtuneError


def _parse_value(text: str) -> Any:
    """An override value is TOML (``5``, ``true``, ``[1, 2]``, ``"x"``) or else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(tree: dict[str, Any], key: str, value: Any, *, where: str = "--set") -> None:
    """Set ``a.b.c`` in a nested dict, creating tables on the way."""
    parts = key.split(".")
    if not all(parts):
        raise FedtuneError(f"{where}: bad key {key!r}")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FedtuneError(f"{where}: {key!r}: {part!r} is a value, not a table")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (``fed.rounds=5``) to a raw config dict; errors name the override."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedtuneError(f"--set {item}: expected KEY=VALUE, e.g. fed.rounds=5")
        set_dotted(tree, key.strip(), _parse_value(value.strip()), where=f"--set {item}")
    return tree


def _blame(loc: tuple[str, ...], overrides: Sequence[str], source: str) -> str:
    """Who set the value at ``loc``, as an error message names it.

    The last ``--set`` of it or of a table above it (a later one replaces what an earlier one
    set), else ``source``, then naming the overrides inside ``loc`` (a check over a whole section
    may fail because of one of them).
    """
    keys = [tuple(item.partition("=")[0].strip().split(".")) for item in overrides]
    setters = [item for key, item in zip(keys, overrides, strict=True) if loc[: len(key)] == key]
    if setters:
        return f"--set {setters[-1]}"
    inside = [f"--set {item}" for key, item in zip(keys, overrides, strict=True) if key[: len(loc)] == loc]
    return f"{source} with {', '.join(inside)}" if inside else source


def validate(tree: Mapping[str, Any], *, source: str, overrides: Sequence[str] = ()) -> Config:
    """Build a Config, turning pydantic's errors into one message naming each key.

    Each error names where its value came from: ``source`` (the config file), or the
    ``--set`` item of ``overrides`` (already applied to ``tree``) that set it.
    """
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = tuple(str(p) for p in e["loc"])
            lines.append(f"{_blame(loc, overrides, source)}: {'.'.join(loc) or '(top level)'}: {e['msg']}")
        raise FedtuneError("\n".join(lines)) from None


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        nested = isinstance(value, Mapping) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out


def read_toml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file; ``extends = "other.toml"`` (relative to it) is read first, then overridden."""
    path = Path(path)
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedtuneError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise FedtuneError(f"{path}: invalid TOML: {err}") from None
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise FedtuneError(f"{path}: extends: expected a file name")
    base_path = (path.parent / parent).resolve()
    if base_path in _seen:
        raise FedtuneError(f"{path}: extends: {parent} forms a cycle")
    return _merge(read_toml(base_path, (*_seen, base_path)), tree)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a TOML config (or the defaults) and apply dotted overrides."""
    tree = read_toml(path) if path is not None else {}
    apply_overrides(tree, overrides)
    return validate(tree, source=str(path) if path else "config", overrides=overrides)


def config_from_run_config(run_config: Mapping[str, Any], app_dir: str | Path = ".") -> Config:
    """Parse Flower's flat run_config: ``config-file`` plus dotted overrides of it."""
    tree: dict[str, Any] = {}
    config_file = run_config.get("config-file")
    if config_file:
        path = Path(str(config_file))
        if not path.is_absolute():
            path = Path(app_dir) / path
        tree = read_toml(path)
    for key, value in run_config.items():
        if key != "config-file":
            set_dotted(tree, str(key), value, where="run_config")
    return validate(tree, source="run_config")


def config_from_toml_text(text: str, *, source: str) -> Config:
    """The Config in TOML ``text``; ``source`` names the text in error messages."""
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise FedtuneError(f"{source}: invalid TOML: {err}") from None
    return validate(tree, source=source)
