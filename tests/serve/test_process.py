"""``served``: a ``fedtune serve`` child that cannot start is reported with its own error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.errors import FedtuneError
from fedtune.serve.process import served


def test_a_server_that_exits_is_reported_with_its_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    with (
        pytest.raises(FedtuneError, match=r"exited with status [1-9](.|\n)*no-such-run"),
        served([missing], wait_s=120),
    ):
        pytest.fail("the block must not run")


PARENT = """
import subprocess, sys
from fedtune.serve.process import _die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         preexec_fn=_die_with_parent if sys.argv[1] == "tie" else None)
print(child.pid, flush=True)
sys.stdin.read()  # until killed
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
@pytest.mark.parametrize("tie", [True, False])
def test_the_child_dies_with_a_killed_parent(tie: bool) -> None:
    """A bench killed by SIGKILL leaves no server behind; the control (no tie) shows the test can fail."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, "tie" if tie else "free"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(child) is not tie
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
