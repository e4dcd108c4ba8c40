"""FedAvg (McMahan et al., 2017): the example-weighted mean of the clients' adapters."""

from __future__ import annotations

from fedtune.federated.strategies.base import AdapterStrategy


class FedAvgStrategy(AdapterStrategy):
    """Plain FedAvg: every client trains the global adapter; the server averages by examples."""
