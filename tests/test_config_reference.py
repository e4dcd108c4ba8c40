"""docs/configuration.md is rendered from the config's fields and kept in step with them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from fedtune.config import Config
from fedtune.config_reference import main, render, sections

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "configuration.md"
REGENERATE = "python -m fedtune.config_reference --write docs/configuration.md"


def test_committed_reference_is_current() -> None:
    # Prepare / Execute
    committed = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else ""

    # Assert
    assert committed == render(), f"docs/configuration.md is stale; regenerate it with `{REGENERATE}`"


def test_every_field_has_a_description() -> None:
    # Prepare: the root's own fields and every (nested) section's
    models = [("", Config)] + [(s.key, s.model) for s in sections(Config)]

    # Execute
    missing = [
        f"{key}.{name}".lstrip(".")
        for key, model in models
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]

    # Assert
    assert missing == [], f"fields without description= in src/fedtune/config.py: {missing}"


def test_reference_covers_every_section() -> None:
    keys = [s.key for s in sections(Config)]

    assert keys[:4] == ["data", "partition", "model", "model.rope_scaling"]
    assert {"model.lora", "split.protect", "run"} <= set(keys)
    assert "### `[model.lora]`" in render() and "### `[split.protect]`" in render()


class _Inner(BaseModel):
    depth: int = Field(2, ge=1, le=5, description="how deep")


class _Small(BaseModel):
    name: str = Field("x", description="a name")
    rate: float | None = Field(None, gt=0, description="a rate")
    mode: Literal["a", "b"] = Field("a", description="a | b")
    tags: tuple[str, ...] = Field(("p", "q"), description="some tags")
    inner: _Inner = Field(default_factory=_Inner, description="Nested settings.")
    extra: _Inner | None = Field(None, description="Maybe more.")


def test_render_small_model_by_hand() -> None:
    # Prepare: worked by hand; pipes escaped for Markdown tables, None left out of types,
    # tuples shown as TOML lists, an optional section says so, sections follow their parent
    expected = """\
# Small

## Top level

| key | type | default | bounds | description |
|---|---|---|---|---|
| `name` | `str` | `"x"` |  | a name |
| `rate` | `float` | unset | `> 0` | a rate |
| `mode` | `"a" \\| "b"` | `"a"` |  | a \\| b |
| `tags` | `list[str]` | `["p", "q"]` |  | some tags |

## `[inner]`

Nested settings.

| key | type | default | bounds | description |
|---|---|---|---|---|
| `inner.depth` | `int` | `2` | `>= 1, <= 5` | how deep |

## `[extra]`

Maybe more. Optional: absent unless given.

| key | type | default | bounds | description |
|---|---|---|---|---|
| `extra.depth` | `int` | `2` | `>= 1, <= 5` | how deep |
"""

    # Execute
    text = render(_Small, title="Small", intro="")

    # Assert
    assert text == expected


def test_check_fails_on_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    path = tmp_path / "configuration.md"
    path.write_text(render().replace("LoRA rank", "LoRA rang"), encoding="utf-8")

    # Execute
    stale = main(["--check", str(path)])
    message = capsys.readouterr().err
    assert main(["--write", str(path)]) == 0
    fresh = main(["--check", str(path)])

    # Assert
    assert stale == 1
    assert "stale" in message and f"python -m fedtune.config_reference --write {path}" in message
    assert fresh == 0
