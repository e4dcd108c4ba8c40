"""SecAgg+ maths as fedtune uses it: share counts, the update vector, weights, the error bound.

Pure functions, no Flower. Flower's SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``) sums
integer vectors; what it computes from the clients' float vectors is worked out here, so the round
loop can check a config before a run starts and a test can hold the result to a stated bound.

What Flower does with client ``i``'s vector ``d_i`` and weight ``w_i`` (``M`` = max_weight,
``T`` = quantization_range, ``c`` = clipping_range, ``n`` clients in the sum):

- ``q_i = round(w_i / M * T)``, ``r_i = q_i / T``; the client quantises ``x_i = clip(r_i d_i, ±c)``
  to ``z_i`` in ``[0, T]`` by stochastic rounding of ``(x_i + c) T / (2c)`` (so ``|error| < 1``);
- the server unmasks ``Z = sum z_i`` and ``Q = sum q_i`` and returns
  ``(Z 2c / T - n c) * T / Q  =  sum x_i / sum r_i  +  e``,  with ``|e| < 2 n c / Q``.

Without clipping (``r_i |d_i| <= c``) that is ``sum q_i d_i / Q``, the weighted mean with the
weights rounded to ``q_i``; against the exact ``sum w_i d_i / sum w_i`` the rounding adds at most
``2 D sum |q_i - w_i T / M| / Q`` (``D = max |d_i|``). :func:`mean_error_bound` is the sum of
the two. Under client-level DP every weight is 1 and ``M = 1``: ``q_i = T`` exactly, and the
bound is ``2 c / T`` (4.8e-7 at the defaults ``c = 1``, ``T = 2**22``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedtune.config import Config
from fedtune.errors import FedtuneError

FLOWER_MAX_WEIGHT = 1000.0  # Flower's default max_weight, when nothing bounds the weights
MODULUS = 2**32  # Flower's default modulus_range: sums of masked integers wrap around at it


@dataclass(frozen=True)
class SecAggPlan:
    """How Flower's SecAgg+ sets up a round of ``clients``: shares per key, the threshold, neighbours.

    Each client splits its keys into ``shares`` shares held by its ``neighbours`` (itself
    included); ``threshold`` of them rebuild a key. A round completes while every client keeps
    ``threshold`` live neighbours: up to ``tolerated`` of a client's neighbours may drop out.
    """

    clients: int
    shares: int
    threshold: int
    neighbours: int

    @property
    def tolerated(self) -> int:
        return self.neighbours - self.threshold


def flower_count(value: float) -> int | float:
    """A config count as Flower takes it: at most 1 a fraction (float), above 1 a count (int)."""
    if value <= 1:
        return float(value)
    if value != int(value):
        raise ValueError(f"{value} is neither a fraction (at most 1) nor a whole count")
    return int(value)


def secagg_plan(clients: int, num_shares: float, reconstruction_threshold: float) -> SecAggPlan:
    """The share count, threshold and neighbourhood Flower's setup stage derives for ``clients``.

    Mirrors ``SecAggPlusWorkflow.setup_stage`` (Flower 1.41; a test holds the two together):
    a fractional share count is ``round(f * clients)``, made odd below ``clients`` and at least 3
    (else every client); a fractional threshold is ``max(round(f * shares), 2)``; each client's
    neighbours are the ``shares // 2`` on either side of it in a shuffled ring.
    """
    shares_in, threshold_in = flower_count(num_shares), flower_count(reconstruction_threshold)
    if isinstance(shares_in, float):
        shares = round(shares_in * clients)
        if shares < clients and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = clients
    else:
        shares = shares_in
    threshold = max(round(threshold_in * shares), 2) if isinstance(threshold_in, float) else threshold_in
    ring = shares + 1 if shares != clients and shares % 2 == 0 else shares  # Flower rounds up to odd
    return SecAggPlan(clients, shares, threshold, min(clients, 2 * (ring // 2) + 1))


def check_secagg(cfg: Config, sampled: int) -> SecAggPlan:
    """``privacy.secagg``'s plan for ``sampled`` clients a round; FedtuneError if it cannot work."""
    sec = cfg.privacy.secagg
    where = "fed.fraction_train, fed.min_train_clients and partition.num_partitions"
    if sampled < 2:
        raise FedtuneError(f"privacy.secagg: SecAgg+ sums at least 2 clients a round; {where} give {sampled}")
    if len(set(cfg.model.lora.ranks or ())) > 1:
        raise FedtuneError(
            "privacy.secagg: clients of different LoRA ranks (model.lora.ranks) send vectors of different "
            "shapes; SecAgg+ sums vectors of one layout"
        )
    for name in ("clip_norm", "outlier_norm_factor"):  # rules over single updates
        if getattr(cfg.fed, name) is not None:
            raise FedtuneError(
                f"fed.{name}: the server never sees one client's update under privacy.secagg; "
                "unset it (privacy.dp clips on the clients)"
            )
    try:
        shares, threshold = flower_count(sec.num_shares), flower_count(sec.reconstruction_threshold)
    except ValueError as err:
        raise FedtuneError(f"privacy.secagg: {err}") from None
    if isinstance(shares, int) and (shares <= 2 or (shares % 2 == 0 and shares != sampled)):
        raise FedtuneError(
            f"privacy.secagg.num_shares: a count must be odd and above 2 (or the {sampled} clients "
            f"sampled a round), got {shares}"
        )
    if isinstance(threshold, int) and isinstance(shares, int) and threshold >= shares:
        raise FedtuneError(
            f"privacy.secagg.reconstruction_threshold: {threshold} must be below privacy.secagg.num_shares"
        )
    if sampled * sec.quantization_range >= MODULUS:  # the unmasked sum of n values in [0, T] must not wrap
        raise FedtuneError(
            f"privacy.secagg.quantization_range: {sampled} clients times {sec.quantization_range} "
            f"reach 2**32, where Flower's masked sums wrap around; lower it"
        )
    plan = secagg_plan(sampled, sec.num_shares, sec.reconstruction_threshold)
    if plan.neighbours < plan.threshold:
        raise FedtuneError(
            f"privacy.secagg.reconstruction_threshold: {plan.threshold} shares rebuild a key, but a "
            f"client's key has only {plan.neighbours} holders among the {sampled} clients sampled a "
            f"round ({where}); lower it or sample more clients"
        )
    return plan


def max_weight(cfg: Config) -> float:
    """The largest aggregation weight a client can send: Flower scales each weight by it (``r_i = w_i / M``).

    1 under client-level DP (every weight is 1); else ``data.max_train_examples`` when set (the
    weight is the client's training examples); else Flower's default, 1000. A weight above it
    clips harder (``r_i d_i`` is clipped to ±c); one far below it loses precision (see the bound).
    """
    if cfg.privacy.dp:
        return 1.0
    return float(cfg.data.max_train_examples or FLOWER_MAX_WEIGHT)


def aggregation_weight(num_examples: int, dp: bool) -> int:
    """A client's weight in the secure sum: its training examples (FedAvg), or 1 under DP-FedAvg."""
    return 1 if dp else num_examples


def vector_layout(states: Sequence[Mapping[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    """The update vector's layout: the first state's (key, shape) order; every state must match it.

    SecAgg+ sums vectors position by position, so every client must send the same keys and shapes.
    """
    if not states:
        raise ValueError("no states")
    layout = [(key, tuple(shape)) for key, shape in states[0].items()]
    for i, state in enumerate(states[1:], start=1):
        if [(k, tuple(s)) for k, s in state.items()] != layout:
            raise FedtuneError(
                f"privacy.secagg: client {i}'s adapter differs in keys or shapes from client 0's; "
                "SecAgg+ sums vectors of one layout"
            )
    return layout


def update_vector(trained: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """``trained - sent`` per key in ``sent``'s order, in float64; 0 for a key not sent back.

    A key the client does not send back did not train (FFA-LoRA's frozen A). float64 (exact for
    float32 and float16 inputs) keeps Flower's quantiser arithmetic in float64, so its only error
    is the quantisation itself; the vector never leaves the client unmasked.
    """
    if extra := sorted(trained.keys() - sent.keys()):
        raise ValueError(f"trained adapter has keys that were not sent: {extra[:3]}")
    return [
        trained[k].astype(np.float64) - sent[k].astype(np.float64)
        if k in trained
        else np.zeros(sent[k].shape)
        for k in sent
    ]


def from_vector(
    vector: Sequence[np.ndarray], layout: Sequence[tuple[str, tuple[int, ...]]]
) -> dict[str, np.ndarray]:
    """The summed vector back as a state dict by ``layout``."""
    if len(vector) != len(layout):
        raise ValueError(f"{len(vector)} arrays for a layout of {len(layout)}")
    out = {}
    for arr, (key, shape) in zip(vector, layout, strict=True):
        out[key] = np.asarray(arr, dtype=np.float64).reshape(shape)
    return out


def quantised_weights(weights: Sequence[int], max_weight: float, quantization_range: int) -> list[int]:
    """Flower's integer weights ``q_i = round(w_i / M * T)``, as ``secaggplus_mod`` computes them."""
    return [round(w / max_weight * quantization_range) for w in weights]


def mean_error_bound(
    weights: Sequence[int],
    *,
    max_weight: float,
    clipping_range: float,
    quantization_range: int,
    max_abs_update: float,
) -> float:
    """Largest per-coordinate error of the secure mean against ``sum w_i d_i / sum w_i``.

    ``(2 n c + 2 D sum_i |q_i - w_i T / M|) / Q`` (module docstring), for updates whose every
    value satisfies ``r_i |d_i| <= c`` (nothing clipped) and ``|d_i| <= D = max_abs_update``.
    """
    t = quantization_range
    q = quantised_weights(weights, max_weight, t)
    rounding = sum(abs(qi - w / max_weight * t) for qi, w in zip(q, weights, strict=True))
    return (2 * len(weights) * clipping_range + 2 * max_abs_update * rounding) / sum(q)
