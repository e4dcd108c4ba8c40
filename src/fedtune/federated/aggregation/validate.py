"""Checks on client updates before aggregation: pure numpy, no Flower, no I/O.

A client can send a malformed update (wrong keys or shapes, integer tensors, NaN or
inf after a diverged step) or a valid but far too large one (a bad learning rate, a
poisoned client). :func:`filter_updates` reports both kinds and never raises for a
bad update, so one client cannot stop a round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedtune.errors import FedtuneError

Arrays = Mapping[str, np.ndarray]


def check_update(update: Arrays, reference: Arrays, *, where: str) -> None:
    """Raise unless ``update`` has ``reference``'s keys and shapes, floats, all finite.

    Parameters
    ----------
    update
        A client's state dict.
    reference
        The state dict the client started from (the global adapter).
    where
        Who sent it, for the message, e.g. ``"client 3"``.

    Raises
    ------
    FedtuneError
        Naming ``where`` and the first offending key.
    """
    missing = sorted(set(reference) - set(update))
    if missing:
        raise FedtuneError(f"{where}: missing key {missing[0]} ({len(missing)} missing)")
    extra = sorted(set(update) - set(reference))
    if extra:
        raise FedtuneError(f"{where}: unexpected key {extra[0]} ({len(extra)} unexpected)")
    for key, ref in reference.items():
        value = np.asarray(update[key])
        if value.shape != ref.shape:
            raise FedtuneError(f"{where}: {key} has shape {value.shape}, expected {ref.shape}")
        if not np.issubdtype(value.dtype, np.floating):
            raise FedtuneError(f"{where}: {key} has dtype {value.dtype}, expected a floating dtype")
        if not np.isfinite(value).all():
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            raise FedtuneError(f"{where}: {key} has {bad} non-finite values (NaN or inf)")


def update_norm(update: Arrays, reference: Arrays) -> float:
    """L2 norm of ``update - reference`` over all tensors together, in float64."""
    total = 0.0
    for key, ref in reference.items():
        diff = update[key].astype(np.float64) - ref.astype(np.float64)
        total += float(np.vdot(diff, diff))
    return float(np.sqrt(total))


def clip_update(update: Arrays, reference: Arrays, max_norm: float) -> dict[str, np.ndarray]:
    """Scale ``update - reference`` down to norm ``max_norm`` if it is larger.

    Returns
    -------
    dict
        ``reference + (update - reference) · min(1, max_norm / norm)`` per key, float32.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = update_norm(update, reference)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    out: dict[str, np.ndarray] = {}
    for key, ref in reference.items():
        ref64 = ref.astype(np.float64)
        out[key] = (ref64 + factor * (update[key].astype(np.float64) - ref64)).astype(np.float32)
    return out


def filter_updates(
    updates: Sequence[Arrays],
    reference: Arrays | Sequence[Arrays],
    *,
    where: Sequence[str],
    max_norm: float | None,
    norm_factor: float | None,
) -> tuple[list[int], list[str]]:
    """Which updates to aggregate, and why the others are left out.

    An update is rejected, in this order, if it fails :func:`check_update`
    ("invalid"), if its norm (distance to ``reference``) exceeds ``max_norm``
    ("over max_norm"), or if its norm exceeds ``norm_factor`` times the median norm
    of the *other* valid updates ("huge-norm"). The median is robust to a minority of
    outliers; with no other valid update there is nothing to compare with and the
    huge-norm test is skipped.

    Parameters
    ----------
    updates
        Client state dicts.
    reference
        The global state the clients started from, or one start state per update
        (clients with different adapter ranks start from different states).
    where
        A label per update for the reasons, e.g. ``"client 3"``.
    max_norm
        Absolute norm limit, or None for none.
    norm_factor
        Outlier factor (> 0) relative to the median of the others, or None for none.

    Returns
    -------
    kept, reasons
        Indices of accepted updates in increasing order, and one message per rejected
        update in index order, e.g. ``"invalid: client 3: ..."`` or
        ``"client 5: huge-norm: ..."``.
    """
    if len(where) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(where)} labels")
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    if norm_factor is not None and not norm_factor > 0:
        raise ValueError(f"norm_factor must be positive, got {norm_factor}")
    references = [reference] * len(updates) if isinstance(reference, Mapping) else list(reference)
    if len(references) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(references)} references")
    rejected: dict[int, str] = {}
    norms: dict[int, float] = {}
    for i, update in enumerate(updates):
        try:
            check_update(update, references[i], where=where[i])
        except FedtuneError as err:
            rejected[i] = f"invalid: {err}"
            continue
        norms[i] = update_norm(update, references[i])
    for i, norm in norms.items():
        others = [n for j, n in norms.items() if j != i]
        median = float(np.median(others)) if others else float("inf")
        if max_norm is not None and norm > max_norm:
            rejected[i] = f"{where[i]}: over max_norm: norm {norm:.4g} > {max_norm:.4g}"
        elif norm_factor is not None and norm > norm_factor * median:
            rejected[i] = (
                f"{where[i]}: huge-norm: norm {norm:.4g} > {norm_factor:g} × median {median:.4g} "
                "of the others"
            )
    kept = [i for i in range(len(updates)) if i not in rejected]
    return kept, [rejected[i] for i in sorted(rejected)]
