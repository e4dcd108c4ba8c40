"""DP-FedAvg maths (McMahan et al. 2018; Andrew et al. 2021): pure numpy, no Flower, no I/O.

One round of client-level DP-FedAvg over adapter updates ``Δ_i = trained_i − global``:

- every client clips its ``Δ_i`` to L2 norm ``C`` (:func:`clip_delta`) and, with
  ``privacy.noise = "client"``, adds a Gaussian share of std ``z_Δ C / √m`` (:func:`noise_like`);
- the server sums the clipped updates, adds ``N(0, (z_Δ C)²)`` per coordinate (trusted
  server) and divides by the *expected* cohort size ``m``, not the number that replied
  (:func:`noised_mean`): the sensitivity of the mean is then ``C / m`` whoever replies;
- with adaptive clipping each client also reports whether ``‖Δ_i‖ ≤ C``; the server
  releases the count with noise std ``σ_b`` and moves ``C`` geometrically towards the
  ``γ``-quantile of the norms (:func:`adaptive_clip`).

Clients are sampled by partition id (:func:`dp_sample`) from a generator seeded by the
server's secret seed and the round: reproducible on resume, unknown to the clients (a public
seed would let anyone know who was sampled, which voids the amplification by sampling that
the accountant counts on).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


def global_norm(delta: Arrays) -> float:
    """L2 norm of all tensors of ``delta`` together, in float64."""
    return math.sqrt(sum(float(np.vdot(v.astype(np.float64), v.astype(np.float64))) for v in delta.values()))


def clip_delta(delta: Arrays, clip_norm: float) -> tuple[dict[str, np.ndarray], bool]:
    """``delta`` scaled to norm at most ``clip_norm``, and whether it was within the norm already.

    Returns float32 tensors; ``within`` is the bit adaptive clipping counts.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    norm = global_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = {k: (v.astype(np.float64) * factor).astype(np.float32) for k, v in delta.items()}
    return clipped, norm <= clip_norm


def noise_like(shapes: Arrays, std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Gaussian noise of std ``std`` per coordinate, one tensor per key of ``shapes`` (in its order)."""
    return {k: rng.normal(0.0, std, size=v.shape).astype(np.float64) for k, v in shapes.items()}


def noised_mean(
    deltas: Sequence[Arrays],
    template: Arrays,
    *,
    expected_size: float,
    noise_std: float,
    rng: np.random.Generator | None,
) -> tuple[dict[str, np.ndarray], float, float]:
    """``(Σ Δ_i + N(0, noise_std²)) / expected_size``, and the norms of its noise and signal parts.

    Parameters
    ----------
    deltas
        The clipped updates (any number, also none), in partition order.
    template
        Keys and shapes of the result (the global adapter).
    expected_size
        ``m``: the cohort size the round was planned for (fixed-size sampling: the sample;
        Poisson: ``q N``).
    noise_std
        Std of the server's noise on the sum (``z_Δ C``); 0 when the clients added it.
    rng
        The server's noise generator (unused when ``noise_std`` is 0).

    Returns
    -------
    mean, noise_norm, signal_norm
        float32 tensors; ``noise_norm`` is ``‖noise‖ / m`` (0 without server noise) and
        ``signal_norm`` is ``‖Σ Δ_i‖ / m``, the mean before the noise.
    """
    if not expected_size > 0:
        raise ValueError(f"expected_size must be positive, got {expected_size}")
    total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in template.items()}
    for delta in deltas:
        for key in total:
            total[key] += delta[key].astype(np.float64)
    noise_norm, signal_norm = 0.0, global_norm(total) / expected_size
    if noise_std > 0:
        if rng is None:
            raise ValueError("noise_std > 0 needs a generator")
        noise = noise_like(template, noise_std, rng)
        noise_norm = global_norm(noise) / expected_size
        for key in total:
            total[key] += noise[key]
    return {k: (v / expected_size).astype(np.float32) for k, v in total.items()}, noise_norm, signal_norm


def adaptive_clip(
    clip_norm: float,
    within: int,
    count: int,
    *,
    expected_size: float,
    count_std: float,
    target_quantile: float,
    clip_lr: float,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Andrew et al.'s geometric update: ``C · exp(−η (b̃ − γ))`` with ``b̃`` the noised share within.

    ``within`` of the ``count`` updates had norm ≤ ``clip_norm``. Each client's bit is centred,
    ``b_i − ½``, so one client more or less moves the released sum by ½ whatever its bit (the
    sensitivity Andrew et al.'s ``2σ_b`` accounting assumes):
    ``b̃ = (Σ (b_i − ½) + N(0, σ_b²)) / m + ½``. Returns the new clip norm and ``b̃``.
    """
    centred = within - count / 2 + float(rng.normal(0.0, count_std))
    share = centred / expected_size + 0.5
    return clip_norm * math.exp(-clip_lr * (share - target_quantile)), share


def cohort_size(num_clients: int, fraction: float, minimum: int) -> int:
    """``m``: ``max(minimum, floor(fraction · N))`` capped at ``N``, as for fedtune's usual sampling."""
    return min(num_clients, max(minimum, math.floor(fraction * num_clients)))


def dp_sample(partition_ids: Iterable[int], size: int, method: str, rng: np.random.Generator) -> list[int]:
    """The round's clients as sorted partition ids.

    ``size`` of them without replacement ("fixed"), or each with probability ``size / N`` ("poisson").
    """
    ids = sorted(partition_ids)
    if method == "fixed":
        return sorted(int(i) for i in rng.choice(ids, size=min(size, len(ids)), replace=False))
    if method == "poisson":
        q = size / len(ids)
        return [i for i, u in zip(ids, rng.random(len(ids)), strict=True) if u < q]
    raise ValueError(f"unknown sampling method {method!r}")


def privatise(
    trained: Arrays, start: Arrays, clip_norm: float, noise_std: float | None, rng: np.random.Generator | None
) -> tuple[dict[str, np.ndarray], bool]:
    """A client's side of DP-FedAvg: ``start + clip(trained − start) (+ its noise share)``.

    Over the keys of ``trained`` (FFA-LoRA sends only B). Returns the state to send (float32)
    and whether the update was within ``clip_norm``.
    """
    start = {k: start[k] for k in trained}
    delta = {k: trained[k].astype(np.float64) - start[k].astype(np.float64) for k in start}
    clipped, within = clip_delta(delta, clip_norm)
    if noise_std and rng is None:
        raise ValueError("a noise share needs a generator")
    noise = noise_like(start, noise_std, rng) if noise_std and rng is not None else None
    out = {}
    for key, ref in start.items():
        value = ref.astype(np.float64) + clipped[key]
        if noise is not None:
            value += noise[key]
        out[key] = value.astype(np.float32)
    return out, within
