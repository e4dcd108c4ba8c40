"""The registry: capabilities drive the checks, and docs/strategies.md shows them as they are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.federated.strategies import STRATEGIES, check_strategy

DOC = Path(__file__).resolve().parents[3] / "docs" / "strategies.md"


def test_the_docs_table_equals_the_registry() -> None:
    rows = re.findall(r"^\| `([a-z-]+)` \| (yes|) \| (yes|) \| (yes|) \| (yes|) \|$", DOC.read_text(), re.M)
    documented = {name: tuple(v == "yes" for v in flags) for name, *flags in rows}
    registry = {
        n: (c.split, c.mixed_ranks, c.client_state, c.weighted_sum)
        for n in STRATEGIES
        for c in [STRATEGIES.get(n).capabilities]
    }
    assert documented == registry, "update the table in docs/strategies.md ('What each strategy works with')"


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_split_runs_take_exactly_the_strategies_that_say_so(name: str) -> None:
    cfg = load_config("configs/tiny.toml", [f"fed.strategy='{name}'", "split.enabled=true"])
    if STRATEGIES.get(name).capabilities.split:
        assert check_strategy(cfg).cls is STRATEGIES.get(name).cls
    else:
        with pytest.raises(FedtuneError, match=rf"fed\.strategy: '{name}' does not apply to split runs"):
            check_strategy(cfg)


def test_an_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(FedtuneError, match=r"fed\.strategy: unknown strategy 'fedsgd' \(known: fedadagrad, "):
        check_strategy(load_config("configs/tiny.toml", ["fed.strategy='fedsgd'"]))
