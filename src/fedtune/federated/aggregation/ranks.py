"""Aggregation of LoRA adapters whose ranks differ between clients: pure numpy, no I/O.

A LoRA module's update is ``ΔW = s · B @ A`` with ``A`` of shape ``(r, in)``,
``B`` of shape ``(out, r)`` and scaling ``s = alpha / r``. Averaging ``A`` and ``B``
separately (FedAvg) is neither defined for different ranks nor exact for equal ones,
because the mean of products is not the product of means. This module offers:

- :func:`stack` (FLoRA): one adapter of rank ``Σ r_k`` whose ``B @ A`` is exactly
  ``Σ p_k s_k B_k A_k``;
- :func:`zero_pad`: the zero-padding baseline FLoRA compares against (not exact);
- :func:`aggregate_delta` + :func:`project` (FlexLoRA): the exact sum of updates,
  then a truncated SVD back to a chosen rank;
- :func:`fuse` (FF-LoRA): a global and a personal adapter as one adapter;
- :func:`rank_rule`: per-client ranks from a list or a named rule.

State dicts use peft's exchange key names (``get_peft_model_state_dict``), e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Adapters returned
by :func:`stack`, :func:`zero_pad` and :func:`fuse` carry their clients' scalings in
``A`` and must be applied with scaling 1, i.e. ``lora_alpha = r``.
Arithmetic is float64; returned arrays are float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedtune.errors import FedtuneError

Arrays = Mapping[str, np.ndarray]
Modules = dict[str, tuple[np.ndarray, np.ndarray]]

_A = ".lora_A.weight"
_B = ".lora_B.weight"

# FLoRA's heterogeneous setting (Wang et al., 2024): ten clients, ranks 64 down to 4.
FLORA_RANKS = (64, 32, 16, 16, 8, 8, 4, 4, 4, 4)


def lora_modules(state: Arrays) -> Modules:
    """Group a peft adapter state dict into its LoRA modules.

    Parameters
    ----------
    state
        Keys ending in ``.lora_A.weight`` (shape ``(r, in)``) and ``.lora_B.weight``
        (shape ``(out, r)``), as ``get_peft_model_state_dict`` writes them.

    Returns
    -------
    dict
        Module prefix (the key without ``.lora_A.weight``) -> ``(A, B)``, in key order.

    Raises
    ------
    FedtuneError
        If a key is not a LoRA factor, a factor lacks its partner, a factor is not 2-D,
        or ``A`` and ``B`` disagree on the rank.
    """
    modules: Modules = {}
    for key in state:
        if key.endswith(_A):
            prefix, partner = key[: -len(_A)], key[: -len(_A)] + _B
        elif key.endswith(_B):
            prefix, partner = key[: -len(_B)], key[: -len(_B)] + _A
        else:
            raise FedtuneError(f"{key}: not a LoRA factor (expected a key ending in {_A} or {_B})")
        if partner not in state:
            raise FedtuneError(f"{key}: no matching {partner}")
        if prefix in modules:
            continue
        a, b = state[prefix + _A], state[prefix + _B]
        if a.ndim != 2 or b.ndim != 2:
            raise FedtuneError(f"{prefix}: LoRA factors must be 2-D, got {a.shape} and {b.shape}")
        if a.shape[0] != b.shape[1]:
            raise FedtuneError(
                f"{prefix}: lora_A has rank {a.shape[0]} {a.shape} but lora_B has rank {b.shape[1]} {b.shape}"
            )
        modules[prefix] = (a, b)
    return modules


def module_ranks(state: Arrays) -> dict[str, int]:
    """Rank of each LoRA module of ``state`` (module prefix -> r)."""
    return {prefix: a.shape[0] for prefix, (a, _) in lora_modules(state).items()}


def stacked_rank(states: Sequence[Arrays]) -> int:
    """Rank of :func:`stack`'s result: the sum of the clients' ranks.

    The returned adapter must be configured with ``r = lora_alpha = stacked_rank``.

    Raises
    ------
    FedtuneError
        If a client's modules do not all have the same rank (then read the per-module
        ranks of the stacked adapter with :func:`module_ranks`).
    """
    total = 0
    for k, state in enumerate(states):
        ranks = set(module_ranks(state).values())
        if len(ranks) != 1:
            raise FedtuneError(f"client {k}: modules have ranks {sorted(ranks)}, expected one rank")
        total += ranks.pop()
    return total


def delta_w(a: np.ndarray, b: np.ndarray, scaling: float) -> np.ndarray:
    """The LoRA weight update ``scaling · B @ A`` (shape ``(out, in)``), float64."""
    return float(scaling) * (b.astype(np.float64) @ a.astype(np.float64))


def _weights_and_scalings(
    n: int, weights: Sequence[float], scalings: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """``(p_k, s_k)`` as float64 arrays, the weights normalised to sum 1."""
    if len(weights) != n or len(scalings) != n:
        raise ValueError(f"{n} states but {len(weights)} weights and {len(scalings)} scalings")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    s = np.asarray(scalings, dtype=np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"scalings must be finite, got {list(scalings)}")
    return w / w.sum(), s


def _client_modules(states: Sequence[Arrays]) -> list[Modules]:
    """Every client's modules; all clients must have the same modules and in/out features."""
    if not states:
        raise ValueError("nothing to aggregate")
    per_client = [lora_modules(state) for state in states]
    ref = per_client[0]
    for k, modules in enumerate(per_client[1:], start=1):
        if set(modules) != set(ref):
            diff = sorted(set(modules) ^ set(ref))[:3]
            raise FedtuneError(f"client {k}: LoRA modules differ from client 0 (e.g. {diff})")
        for prefix, (a, b) in modules.items():
            a0, b0 = ref[prefix]
            if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
                raise FedtuneError(
                    f"client {k}: {prefix} maps {a.shape[1]} -> {b.shape[0]} features, "
                    f"client 0 maps {a0.shape[1]} -> {b0.shape[0]}"
                )
    return per_client


def _stack(per_client: Sequence[Modules], coef: np.ndarray) -> dict[str, np.ndarray]:
    """``A = vstack_k(c_k A_k)``, ``B = hstack_k(B_k)`` per module, so ``B @ A = Σ c_k B_k A_k``."""
    out: dict[str, np.ndarray] = {}
    for prefix, (a0, b0) in per_client[0].items():
        rank = sum(modules[prefix][0].shape[0] for modules in per_client)
        a_out = np.empty((rank, a0.shape[1]), dtype=np.float32)
        b_out = np.empty((b0.shape[0], rank), dtype=np.float32)
        start = 0
        for modules, c in zip(per_client, coef, strict=True):
            a, b = modules[prefix]
            stop = start + a.shape[0]
            # The product is formed in float64 and rounded once into the float32 output.
            np.multiply(a, c, out=a_out[start:stop], dtype=np.float64)
            b_out[:, start:stop] = b
            start = stop
        out[prefix + _A] = a_out
        out[prefix + _B] = b_out
    return out


def stack(
    states: Sequence[Arrays], weights: Sequence[float], scalings: Sequence[float]
) -> dict[str, np.ndarray]:
    """FLoRA aggregation: stack the clients' factors into one exact adapter.

    Parameters
    ----------
    states
        Client adapters; ranks may differ, modules and in/out features may not.
    weights
        Client weights ``w_k`` (e.g. example counts), normalised to ``p_k = w_k / Σ w``.
    scalings
        Client scalings ``s_k = alpha_k / r_k``.

    Returns
    -------
    dict
        Per module ``A = vstack_k(p_k s_k A_k)`` of shape ``(Σ r_k, in)`` and
        ``B = hstack_k(B_k)`` of shape ``(out, Σ r_k)``, under the same key names, so
        ``B @ A = Σ_k p_k s_k B_k A_k``. Apply it with scaling 1:
        ``r = lora_alpha =`` :func:`stacked_rank`.
    """
    per_client = _client_modules(states)
    p, s = _weights_and_scalings(len(states), weights, scalings)
    return _stack(per_client, p * s)


def zero_pad(
    states: Sequence[Arrays], weights: Sequence[float], scalings: Sequence[float]
) -> dict[str, np.ndarray]:
    """Zero-padding baseline: pad every client to the largest rank, then FedAvg A and B.

    Each client's scaling is folded into its ``A`` first, so the result is applied with
    scaling 1 (``r = lora_alpha =`` the largest rank). The product of the averaged
    factors is *not* ``Σ p_k s_k B_k A_k`` in general (cross terms ``B_j A_k``);
    FLoRA uses this as the inexact baseline. With equal ranks it is FedAvg of
    ``(s_k A_k, B_k)``.

    Parameters
    ----------
    states, weights, scalings
        As for :func:`stack`.

    Returns
    -------
    dict
        Per module ``A = Σ p_k pad(s_k A_k)`` of shape ``(max r_k, in)`` and
        ``B = Σ p_k pad(B_k)`` of shape ``(out, max r_k)``, float32.
    """
    per_client = _client_modules(states)
    p, s = _weights_and_scalings(len(states), weights, scalings)
    out: dict[str, np.ndarray] = {}
    for prefix, (a0, b0) in per_client[0].items():
        rank = max(modules[prefix][0].shape[0] for modules in per_client)
        a_acc = np.zeros((rank, a0.shape[1]), dtype=np.float64)
        b_acc = np.zeros((b0.shape[0], rank), dtype=np.float64)
        for modules, pk, sk in zip(per_client, p, s, strict=True):
            a, b = modules[prefix]
            r = a.shape[0]
            a_acc[:r] += pk * sk * a.astype(np.float64)
            b_acc[:, :r] += pk * b.astype(np.float64)
        out[prefix + _A] = a_acc.astype(np.float32)
        out[prefix + _B] = b_acc.astype(np.float32)
    return out


def aggregate_delta(
    states: Sequence[Arrays], weights: Sequence[float], scalings: Sequence[float]
) -> dict[str, np.ndarray]:
    """The exact aggregated update per module: ``Σ_k p_k s_k B_k A_k`` (FlexLoRA).

    Returns
    -------
    dict
        Module prefix -> ``ΔW`` of shape ``(out, in)``, float32; feed it to :func:`project`.
    """
    per_client = _client_modules(states)
    p, s = _weights_and_scalings(len(states), weights, scalings)
    out: dict[str, np.ndarray] = {}
    for prefix, (a0, b0) in per_client[0].items():
        acc = np.zeros((b0.shape[0], a0.shape[1]), dtype=np.float64)
        for modules, c in zip(per_client, p * s, strict=True):
            acc += delta_w(*modules[prefix], c)
        out[prefix] = acc.astype(np.float32)
    return out


def project(delta: Mapping[str, np.ndarray], rank: int, scaling: float) -> dict[str, np.ndarray]:
    """Best rank-``rank`` LoRA factors of each update (truncated SVD; FlexLoRA warm start).

    With ``ΔW ≈ U_r S_r V_rᵀ``: ``B = U_r √S_r / √scaling`` and
    ``A = √S_r V_rᵀ / √scaling``, so ``scaling · B @ A`` is the best rank-``rank``
    approximation of ``ΔW`` (Eckart–Young). Where ``rank`` exceeds ``min(out, in)`` the
    extra rows of A and columns of B are zero: exact, but those directions get no
    gradient in later training.

    Parameters
    ----------
    delta
        Module prefix -> ``ΔW`` of shape ``(out, in)``, e.g. from :func:`aggregate_delta`.
    rank
        Target rank ``r > 0``.
    scaling
        Target scaling ``alpha / r > 0`` that the returned adapter is applied with.

    Returns
    -------
    dict
        peft key names (``<prefix>.lora_A.weight``, ``<prefix>.lora_B.weight``), float32.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    if not scaling > 0:
        raise ValueError(f"scaling must be positive, got {scaling}")
    out: dict[str, np.ndarray] = {}
    for prefix, dw in delta.items():
        if dw.ndim != 2:
            raise FedtuneError(f"{prefix}: ΔW must be 2-D, got shape {dw.shape}")
        u, s, vt = np.linalg.svd(dw.astype(np.float64), full_matrices=False)
        keep = min(rank, s.size)
        root = np.sqrt(s[:keep] / scaling)
        a = np.zeros((rank, dw.shape[1]), dtype=np.float32)
        b = np.zeros((dw.shape[0], rank), dtype=np.float32)
        a[:keep] = root[:, None] * vt[:keep]
        b[:, :keep] = u[:, :keep] * root[None, :]
        out[prefix + _A] = a
        out[prefix + _B] = b
    return out


def fuse(
    global_state: Arrays, global_scaling: float, personal_state: Arrays, personal_scaling: float
) -> dict[str, np.ndarray]:
    """FF-LoRA fusion: a global and a personal adapter as one adapter of rank ``r_g + r_p``.

    Returns
    -------
    dict
        Per module ``A = [s_g A_g; s_p A_p]``, ``B = [B_g, B_p]``, so that
        ``B @ A = s_g B_g A_g + s_p B_p A_p`` exactly; apply it with scaling 1.
    """
    per_client = _client_modules([global_state, personal_state])
    coef = np.asarray([global_scaling, personal_scaling], dtype=np.float64)
    if not np.isfinite(coef).all():
        raise ValueError(f"scalings must be finite, got {coef.tolist()}")
    return _stack(per_client, coef)


def rank_rule(name_or_list: str | Sequence[int], num_clients: int) -> list[int]:
    """Per-client LoRA ranks (config key ``model.lora.ranks``).

    Parameters
    ----------
    name_or_list
        A list of ``num_clients`` positive ranks, returned as is; ``"flora"``: FLoRA's
        ranks 64, 32, 16, 16, 8, 8, 4, 4, 4, 4, cycled to ``num_clients``;
        ``"uniform:R"``: ``[R] * num_clients``.
    num_clients
        Number of clients (partitions).

    Raises
    ------
    FedtuneError
        For an unknown rule, a wrong-length list or a non-positive rank.
    """
    if num_clients <= 0:
        raise FedtuneError(f"model.lora.ranks: need a positive number of clients, got {num_clients}")
    if isinstance(name_or_list, str):
        rule = name_or_list.strip().lower()
        if rule == "flora":
            return [FLORA_RANKS[k % len(FLORA_RANKS)] for k in range(num_clients)]
        name, _, value = rule.partition(":")
        if name == "uniform" and value.strip().isdigit() and int(value) > 0:
            return [int(value)] * num_clients
        raise FedtuneError(
            f"model.lora.ranks: unknown rule {name_or_list!r}; "
            "expected 'flora', 'uniform:R' (R > 0) or a list of ranks"
        )
    ranks = list(name_or_list)
    if len(ranks) != num_clients:
        raise FedtuneError(f"model.lora.ranks: {len(ranks)} ranks for {num_clients} clients")
    for k, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int | np.integer) or r <= 0:
            raise FedtuneError(f"model.lora.ranks: client {k} has rank {r!r}, expected an integer > 0")
    return ranks


def fresh_like(state: Arrays, rank: int, seed: int) -> dict[str, np.ndarray]:
    """A new rank-``rank`` adapter for the modules of ``state``, drawn from ``seed``.

    A as peft initialises it (Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))),
    B zero.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for prefix, (a, b) in sorted(lora_modules(state).items()):
        bound = 1.0 / np.sqrt(a.shape[1])
        out[prefix + _A] = rng.uniform(-bound, bound, size=(rank, a.shape[1])).astype(np.float32)
        out[prefix + _B] = np.zeros((b.shape[0], rank), dtype=np.float32)
    return out
