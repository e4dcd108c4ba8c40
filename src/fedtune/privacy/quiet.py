"""Keep dp-accounting's absl warnings out of the logs while ε is computed."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_absl() -> Iterator[None]:
    """Silence dp-accounting's absl warnings inside the block.

    Its RDP logs "failed to converge ... Excluding this order" at every ε asked (e.g. z=1,
    q=0.1), dozens per ε and harmless (the order is left out); they would fill every round's log.
    """
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)
