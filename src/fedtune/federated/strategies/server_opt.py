"""Server optimisers on the pseudo-gradient: FedAvgM, FedAdam, FedYogi, FedAdagrad.

Clients train as in FedAvg; the server treats the clients' mean minus the global adapter
as a gradient step and applies its own optimiser to it
(:class:`~fedtune.federated.aggregation.server_opt.ServerOptimizer`, whose state is
checkpointed with every round). Settings: ``fed.server_lr`` (eta), ``fed.server_momentum``
(FedAvgM), ``fed.beta_1``, ``fed.beta_2``, ``fed.tau``; unset ones take Flower's defaults.
"""

from __future__ import annotations

from typing import ClassVar

from fedtune.config import Config
from fedtune.federated.aggregation.server_opt import DEFAULTS, Kind, ServerOptimizer
from fedtune.federated.strategies.base import AdapterStrategy, Arrays


def make_optimizer(kind: Kind, cfg: Config) -> ServerOptimizer:
    """The optimiser ``kind`` with the config's settings, Flower's defaults for the unset ones."""
    fed = cfg.fed
    eta, beta_1, beta_2, tau = DEFAULTS[kind]
    return ServerOptimizer(
        kind,
        eta=fed.server_lr if fed.server_lr is not None else eta,
        beta_1=fed.beta_1 if fed.beta_1 is not None and kind in ("adam", "yogi") else beta_1,
        beta_2=fed.beta_2 if fed.beta_2 is not None and kind in ("adam", "yogi") else beta_2,
        tau=fed.tau if fed.tau is not None and kind != "avgm" else tau,
        momentum=fed.server_momentum if kind == "avgm" else 0.0,
    )


class ServerOptStrategy(AdapterStrategy):
    """FedAvg's mean, then a server optimiser step from the round's global adapter."""

    kind: ClassVar[Kind]

    def __init__(self, cfg: Config, clients: dict[int, int]) -> None:
        super().__init__(cfg, clients)
        self.optimizer = make_optimizer(self.kind, cfg)

    def apply_mean(self, mean: Arrays) -> Arrays:
        return self.optimizer.step(self._global, mean, self.current_round)

    def server_state(self) -> Arrays:
        return self.optimizer.state_dict()

    def load_server_state(self, state: Arrays, current: Arrays) -> None:
        self.optimizer.load_state_dict(state)


class FedAvgMStrategy(ServerOptStrategy):
    """FedAvg with a server learning rate and momentum (Hsu et al., 2019)."""

    kind = "avgm"


class FedAdamStrategy(ServerOptStrategy):
    """Adam on the pseudo-gradient (Reddi et al., 2021)."""

    kind = "adam"


class FedYogiStrategy(ServerOptStrategy):
    """Yogi on the pseudo-gradient (Reddi et al., 2021)."""

    kind = "yogi"


class FedAdagradStrategy(ServerOptStrategy):
    """Adagrad on the pseudo-gradient (Reddi et al., 2021)."""

    kind = "adagrad"
