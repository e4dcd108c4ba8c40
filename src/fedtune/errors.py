"""The one exception type users see: it names the file, line or config key at fault."""

from __future__ import annotations


class FedtuneError(ValueError):
    """A problem with the user's input (file, record, config key, CLI argument).

    The CLI prints the message and exits with a non-zero code; the message must
    name where the problem is (``path:line``, ``record 12``, ``model.lora.r``).
    """
