"""``served``: a ``fedtune serve`` child that cannot start is reported with its own error."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.errors import FedtuneError
from fedtune.serve.process import served


def test_a_server_that_exits_is_reported_with_its_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    with pytest.raises(FedtuneError, match=r"exited with status [1-9](.|\n)*no-such-run"):
        with served([missing], wait_s=120):
            pytest.fail("the block must not run")
