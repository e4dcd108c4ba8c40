"""The configuration reference (``docs/configuration.md``), rendered from the config fields themselves.

Every key's type, default, bounds and description come from the pydantic models in
:mod:`fedtune.config`, so the page cannot drift from the code: a test compares the
committed page with :func:`render`.

Usage::

    python -m fedtune.config_reference --write docs/configuration.md   # regenerate
    python -m fedtune.config_reference --check docs/configuration.md   # exit 1 if stale
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from fedtune.config import Config

DEFAULT_PATH = "docs/configuration.md"

INTRO = """\
Every key of a fedtune config, generated from the field descriptions in `src/fedtune/config/sections.py`
(do not edit by hand; regenerate with `{command}`).

A config is one TOML file in which every key is optional (`fedtune run --config FILE`);
`extends = "other.toml"` at the top of a file reads that file first (relative to this one) and
then applies this one over it. `--set KEY=VALUE` overrides one dotted key with a TOML value
(`--set fed.rounds=5`, `--set model.lora.target_modules=['q_proj']`); under `flwr run` the same
settings travel in the run config's `overrides` (see [deployment.md](deployment.md)). An
unknown key or a value out of its bounds is refused with the dotted key named, before a run
directory is made; every run writes the resolved config to `RUN_DIR/config.toml`.

An *unset* default means the key is absent unless given (TOML has no null); the description
says what applies then. Bounds are those the value is checked against. What the settings do:
[data.md](data.md) (formats, templates, partitions), [strategies.md](strategies.md) (`fed.*`
aggregation), [split-learning.md](split-learning.md) (`split.*`)."""


@dataclass(frozen=True)
class Section:
    """One table of the reference: a pydantic model and where it sits in the config tree.

    Parameters
    ----------
    key
        Dotted path of the section (``model.lora``); ``""`` for the root's own keys.
    model
        The pydantic model whose fields are the section's keys.
    intro
        Text under the heading: the description of the field that holds the section.
    optional
        Whether the section may be absent (its field defaults to ``None``).
    """

    key: str
    model: type[BaseModel]
    intro: str = ""
    optional: bool = False


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``X`` or ``X | None``), or None for a plain value."""
    candidates = [a for a in (get_args(annotation) or (annotation,)) if a is not type(None)]
    if len(candidates) == 1 and isinstance(candidates[0], type) and issubclass(candidates[0], BaseModel):
        return candidates[0]
    return None


def sections(root: type[BaseModel], key: str = "") -> Iterator[Section]:
    """Every section under ``root``, depth first, each right after its parent."""
    for name, field in root.model_fields.items():
        model = _section_model(field.annotation)
        if model is None:
            continue
        dotted = f"{key}.{name}" if key else name
        yield Section(dotted, model, field.description or "", optional=field.default is None)
        yield from sections(model, dotted)


def type_text(annotation: Any) -> str:
    """A field's type as a TOML user writes it: ``None`` left out, tuples shown as lists."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(v) for v in get_args(annotation))
    if origin in (Union, types.UnionType):
        # TOML has no null: an optional key is simply left out, which the default column says.
        return " | ".join(type_text(a) for a in get_args(annotation) if a is not type(None))
    if origin is tuple:
        # config tuples are frozen lists; in TOML they are arrays
        return f"list[{type_text(get_args(annotation)[0])}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return str(getattr(annotation, "__name__", annotation))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, for the printable values configs hold
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def default_text(field: FieldInfo) -> str:
    """``"required"``, ``"unset"`` (a ``None`` default) or the default as a TOML value in backticks."""
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    return "unset" if value is None else f"`{_toml(value)}`"


def bounds_text(field: FieldInfo) -> str:
    """The field's numeric bounds, ``>= 1, <= 5``; empty when it has none."""
    parts = []
    for meta in field.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if isinstance(meta, annotated_types.BaseMetadata) and getattr(meta, attr, None) is not None:
                parts.append(f"{op} {getattr(meta, attr)}")
    return f"`{', '.join(parts)}`" if parts else ""


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped (also inside code spans)."""
    return " ".join(text.split()).replace("|", "\\|")


def table(section: Section) -> str:
    """The Markdown table of a section's own keys (nested sections get tables of their own)."""
    lines = ["| key | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, field in section.model.model_fields.items():
        if _section_model(field.annotation) is not None:
            continue
        dotted = f"{section.key}.{name}" if section.key else name
        cells = [
            f"`{dotted}`",
            f"`{type_text(field.annotation)}`",
            default_text(field),
            bounds_text(field),
            field.description or "",
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def render(
    root: type[BaseModel] = Config,
    *,
    title: str = "Configuration reference",
    intro: str = INTRO.format(command=f"python -m fedtune.config_reference --write {DEFAULT_PATH}"),
) -> str:
    """The reference page for ``root``: its own keys first, then one table per section.

    Parameters
    ----------
    root
        The config model to document (:class:`fedtune.config.Config`).
    title
        The page's level-1 heading.
    intro
        Text under the title; empty for none.

    Returns
    -------
    str
        Markdown ending in one newline. A section nested ``d`` deep gets a level ``d + 1``
        heading, ``[dotted.key]`` as TOML writes its table.
    """
    parts = [f"# {title}"]
    if intro:
        parts.append(intro)
    own = Section("", root)
    if any(_section_model(f.annotation) is None for f in root.model_fields.values()):
        parts += ["## Top level", table(own)]
    for section in sections(root):
        parts.append(f"{'#' * (section.key.count('.') + 2)} `[{section.key}]`")
        intro_text = " ".join(section.intro.split())
        if section.optional:
            intro_text += " Optional: absent unless given."
        if intro_text.strip():
            parts.append(intro_text.strip())
        parts.append(table(section))
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reference, write it (``--write PATH``) or check a written copy (``--check PATH``)."""
    parser = argparse.ArgumentParser(prog="python -m fedtune.config_reference", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH", help=f"write the reference to PATH (e.g. {DEFAULT_PATH})")
    group.add_argument("--check", metavar="PATH", help="exit 1 if PATH differs from the rendered reference")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
        sys.stdout.write(f"wrote {args.write}\n")
        return 0
    if args.check:
        path = Path(args.check)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            return 0
        state = "is missing" if current is None else "is stale (it differs from the config's fields)"
        sys.stderr.write(
            f"{path} {state}; regenerate it with: python -m fedtune.config_reference --write {path}\n"
        )
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
