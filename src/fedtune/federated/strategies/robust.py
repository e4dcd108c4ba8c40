"""Robust aggregation: coordinate median, trimmed mean and Krum over the accepted updates.

The rules are pure functions (:mod:`fedtune.federated.aggregation.robust`); example counts
are ignored, so a client cannot buy influence by claiming more data.
"""

from __future__ import annotations

from fedtune.federated.aggregation.robust import krum, median, trimmed_mean
from fedtune.federated.strategies.base import AdapterStrategy, Arrays, Update


class MedianStrategy(AdapterStrategy):
    """Coordinate-wise median of the accepted updates."""

    def aggregate_updates(self, updates: list[Update]) -> Arrays:
        return median([u.state for u in updates])


class TrimmedMeanStrategy(AdapterStrategy):
    """Coordinate-wise trimmed mean; ``fed.trim_fraction`` cut from each side."""

    def aggregate_updates(self, updates: list[Update]) -> Arrays:
        return trimmed_mean([u.state for u in updates], self.cfg.fed.trim_fraction)


class KrumStrategy(AdapterStrategy):
    """Krum: the update closest to its ``n - f - 2`` neighbours (``fed.krum_malicious`` = f)."""

    def aggregate_updates(self, updates: list[Update]) -> Arrays:
        return krum([u.state for u in updates], self.cfg.fed.krum_malicious)
